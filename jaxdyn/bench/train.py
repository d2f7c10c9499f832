"""Suite `train`: one optimizer step (forward, backward, AdamW with clipping) of jaxdyn's
trainer step vs a transformers PyTorch AdamW step on the same config, batch and machine.

jaxdyn runs `jaxdyn.train.make_train_step` jitted with the state donated, exactly as the
trainer does; the reference is `model(input_ids, labels=...)`, `loss.backward()`, global-norm
clipping and `torch.optim.AdamW.step()`. MFU = model FLOPs (3× forward, docs/training.md)
÷ time ÷ the matmul peak measured in this run (and ÷ the vendor peak where one exists). The two
steps are timed in interleaved rounds (`jaxdyn.bench.protocol`); tokens/s is from the median
round. Target: jaxdyn ≥ 1.0× the PyTorch tokens/s on CPU.
"""

from __future__ import annotations

import contextlib

import jax

from jaxdyn import sharding
from jaxdyn.bench import common, protocol
from jaxdyn.model import init_params
from jaxdyn.train import create_train_state, flops, make_train_step, schema
from jaxdyn.train.setup import accum_sharding, make_mesh

TRAIN_TARGET = 1.0


def jaxdyn_step(cfg, profile_dir: str | None = None):
    """The trainer's step on `cfg` as a no-argument callable (the state is donated and carried
    from call to call, as in training), after one traced step when `profile_dir` is given."""
    mesh = make_mesh(cfg)
    mcfg = schema.model_config(cfg)
    params = jax.jit(lambda r: init_params(mcfg, r))(jax.random.key(1))  # one compile, not eager
    box = [create_train_state(cfg, jax.random.key(0), params=params, mesh=mesh)]
    batch = jax.device_put(common.random_batch(cfg), accum_sharding(mesh))
    with jax.set_mesh(mesh), sharding.rules_context():
        step = jax.jit(make_train_step(cfg), donate_argnums=0)

    def call():
        with jax.set_mesh(mesh), sharding.rules_context():
            box[0] = step(box[0], batch)[0]
        return box[0]

    if profile_dir:
        common.block(call())  # compile outside the trace
        with jax.profiler.trace(profile_dir):
            common.block(call())
    return call


def torch_step(mcfg, batch: int, seq_len: int):
    """A transformers PyTorch AdamW step (same lr/betas/eps/decay/clip as configs) as a
    no-argument callable."""
    import torch

    common.torch_threads()
    model = common.hf_model(mcfg, dtype="float32").train()
    amp = mcfg.dtype == "bfloat16"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mcfg.vocab_size, (batch, seq_len), generator=g)

    def step():
        cm = torch.autocast("cuda" if torch.cuda.is_available() else "cpu",
                            dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with cm:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    cfg = common.train_config(p)
    mcfg = schema.model_config(cfg)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    f_tok = flops.train_flops_per_token(mcfg, cfg.train.seq_len)["model"]
    fns = {"jaxdyn": jaxdyn_step(cfg, ctx.get("profile"))}
    if p.torch and common.torch_available():
        fns["torch"] = torch_step(mcfg, cfg.train.batch_size, cfg.train.seq_len)
    times = protocol.interleave(fns, p.repeats)
    mem, src = common.peak_memory_bytes()
    name = f"train B{cfg.train.batch_size}xT{cfg.train.seq_len}"
    notes = {"jaxdyn": f"{mcfg.dtype}, remat={mcfg.remat_policy}, scan={mcfg.scan_layers}; "
                       f"mem: {src}",
             "torch": "transformers + torch.optim.AdamW, clip 1.0; mem: rss"}
    rows = [common.timed_row("train", name, impl, t, tokens, f_tok, ctx["peaks"],
                             peak_mem_bytes=mem if impl == "jaxdyn" else common.rss_peak_bytes(),
                             notes=notes[impl])
            for impl, t in times.items()]
    if ctx.get("profile"):
        rows[0]["profile"] = ctx["profile"]
    if len(rows) == 2:
        common.torch_ratio_target(rows[0], rows[1], TRAIN_TARGET)
    return rows
