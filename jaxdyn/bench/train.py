"""Suite `train`: one optimizer step (forward, backward, AdamW with clipping) of jaxdyn's
trainer step vs a transformers PyTorch AdamW step on the same config, batch and machine.

jaxdyn runs `jaxdyn.train.make_train_step` jitted with the state donated, exactly as the
trainer does; the reference is `model(input_ids, labels=...)`, `loss.backward()`, global-norm
clipping and `torch.optim.AdamW.step()`. MFU = model FLOPs (3× forward, docs/training.md)
÷ time ÷ the matmul peak measured in this run. Target: jaxdyn ≥ 1.2× the PyTorch tokens/s on CPU.
"""

from __future__ import annotations

import contextlib

import jax

from jaxdyn import sharding
from jaxdyn.bench import common
from jaxdyn.model import init_params
from jaxdyn.train import create_train_state, flops, make_train_step, schema
from jaxdyn.train.setup import accum_sharding, make_mesh

TRAIN_TARGET = 1.2


def jaxdyn_step(cfg, ctx: dict, repeats: int, profile_dir: str | None = None) -> dict:
    """Time the trainer's step on `cfg`; returns the timing dict plus flops and memory."""
    mesh = make_mesh(cfg)
    mcfg = schema.model_config(cfg)
    params = jax.jit(lambda r: init_params(mcfg, r))(jax.random.key(1))  # one compile, not eager
    state = create_train_state(cfg, jax.random.key(0), params=params, mesh=mesh)
    batch = jax.device_put(common.random_batch(cfg), accum_sharding(mesh))
    with jax.set_mesh(mesh), sharding.rules_context():
        step = jax.jit(make_train_step(cfg), donate_argnums=0)
        t, state = common.time_stateful(lambda s: step(s, batch)[0], state, repeats)
        if profile_dir:
            with jax.profiler.trace(profile_dir):
                state = common.block(step(state, batch)[0])
    f_tok = flops.train_flops_per_token(mcfg, cfg.train.seq_len)
    return {**t, "flops_per_token": f_tok["model"],
            "dense_flops_per_token": f_tok["dense_equivalent"], "state": state, "mesh": mesh}


def torch_step(mcfg, batch: int, seq_len: int, repeats: int) -> dict:
    """Time a transformers PyTorch AdamW step (same lr/betas/eps/decay/clip as configs)."""
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

    return common.time_fn(step, repeats)


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    cfg = common.train_config(p)
    mcfg = schema.model_config(cfg)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    peak = ctx["peaks"].get("peak_flops_measured")
    j = jaxdyn_step(cfg, ctx, p.repeats, ctx.get("profile"))
    mem, src = common.peak_memory_bytes()
    name = f"train B{cfg.train.batch_size}xT{cfg.train.seq_len}"
    jx = {"suite": "train", "name": name, "impl": "jaxdyn",
          "tokens_per_s": tokens / j["best_s"], "step_ms": 1e3 * j["best_s"],
          "mfu": common.mfu(j["flops_per_token"], tokens / j["best_s"], peak),
          "mfu_vendor": common.mfu(j["flops_per_token"], tokens / j["best_s"],
                                   ctx["peaks"].get("peak_flops_vendor")),
          "flops_per_token": j["flops_per_token"], "peak_mem_bytes": mem,
          "compile_s": j["warmup_s"],
          "notes": f"{mcfg.dtype}, remat={mcfg.remat_policy}, scan={mcfg.scan_layers}; "
                   f"mem: {src}"}
    if ctx.get("profile"):
        jx["profile"] = ctx["profile"]
    rows = [jx]
    if p.torch and common.torch_available():
        t = torch_step(mcfg, cfg.train.batch_size, cfg.train.seq_len, p.repeats)
        ref = {"suite": "train", "name": name, "impl": "torch",
               "tokens_per_s": tokens / t["best_s"], "step_ms": 1e3 * t["best_s"],
               "mfu": common.mfu(j["flops_per_token"], tokens / t["best_s"], peak),
               "peak_mem_bytes": common.rss_peak_bytes(),
               "notes": "transformers + torch.optim.AdamW, clip 1.0; mem: rss"}
        rows.append(ref)
        common.torch_ratio_target(jx, ref, TRAIN_TARGET)
    del j
    return rows
