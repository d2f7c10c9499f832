"""Training: `python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR`.

`main` parses flags and calls `train_and_evaluate(cfg, workdir)`; the pieces (state creation,
the jitted step, evaluation) are importable and tested on their own.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from tqdm import tqdm

from jaxdyn import configlib, distributed, flops, sharding
from jaxdyn.checkpoint import Checkpointer, load_model
from jaxdyn.loss import lm_loss
from jaxdyn.metrics import MetricsWriter, flatten_aux
from jaxdyn.model import ModelConfig, build, init_params, param_count
from jaxdyn.optim import init_lora, make_optimizer, merge_lora, trainable_fraction


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; nothing is saved after it."""


class CheckpointMismatchError(ValueError):
    """`init.checkpoint` holds a model that does not fit the configured one."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # micro-steps taken (optimizer steps x grad_accum)
    params: Any  # {"params": model params, "lora": LoRA factors or {}}
    opt_state: Any


# ----------------------------------------------------------------------------- state


def initial_params(cfg: mlc.ConfigDict, mcfg: ModelConfig, rng) -> tuple[Any, list[str]]:
    """Random params, or params from `init.checkpoint` (a dense import; routed archs transfer)."""
    if not cfg.init.checkpoint:
        return init_params(mcfg, rng), []
    icfg, iparams, _ = load_model(cfg.init.checkpoint)
    if mcfg.arch != "dense" and icfg.arch == "dense":
        from jaxdyn.model.transfer import dense_to_routed

        params, report = dense_to_routed(icfg, iparams, mcfg, rng)
        return params, [str(report)]
    fresh = init_params(mcfg, rng)
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), fresh)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), iparams)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise CheckpointMismatchError(
            f"init.checkpoint {cfg.init.checkpoint!r} holds a {icfg.family}/{icfg.arch} model "
            f"(D={icfg.hidden_size}, L={icfg.num_layers}, V={icfg.vocab_size}, scan="
            f"{icfg.scan_layers}) that does not match the configured {mcfg.family}/{mcfg.arch} "
            f"(D={mcfg.hidden_size}, L={mcfg.num_layers}, V={mcfg.vocab_size}); set the model "
            "fields to the checkpoint's model_config.json")
    n = len(jax.tree.leaves(iparams))
    return jax.tree.map(jnp.asarray, iparams), [f"loaded {n} tensors from "
                                                 f"{cfg.init.checkpoint}; new parameters: none"]


def create_train_state(cfg: mlc.ConfigDict, mcfg: ModelConfig, mesh, rng):
    """(state, tx, schedule, report) with params/opt-state placed by the sharding rules."""
    k_init, k_lora = jax.random.split(rng)
    params, report = initial_params(cfg, mcfg, k_init)
    with jax.set_mesh(mesh):
        params = sharding.shard_params(params, sharding.param_shardings(mcfg, mesh))
    lora = init_lora(params, cfg.train.lora, k_lora) if cfg.train.lora.enabled else {}
    tree = {"params": params, "lora": lora}
    tx, schedule = make_optimizer(cfg.train, tree)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(tree)
    return TrainState(jnp.zeros((), jnp.int32), tree, opt_state), tx, schedule, report


# ----------------------------------------------------------------------------- steps


def loss_fn(tree, batch, model, cfg: mlc.ConfigDict):
    """LM loss + the mean over units of each weighted auxiliary loss."""
    params = merge_lora(tree["params"], tree["lora"], cfg.train.lora)
    out = model.apply({"params": params}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], compute_logits=False)
    lm, stats = lm_loss(out.hidden, out.unembed, batch["tokens"], batch["segment_ids"],
                        chunk=cfg.train.loss_chunk, z_loss=cfg.train.z_loss)
    aux_loss = sum((jnp.mean(v) for v in out.aux["losses"].values()), jnp.zeros((), jnp.float32))
    return lm + aux_loss, (stats, out.aux)


def make_train_step(cfg: mlc.ConfigDict, mcfg: ModelConfig, tx, schedule):
    model = build(mcfg)
    accum = int(cfg.train.grad_accum)

    def step(state: TrainState, batch):
        (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, model, cfg)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "nll": stats["nll"], "accuracy": stats["accuracy"],
                   "tokens": stats["tokens"], "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step // accum), "aux": aux}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(cfg: mlc.ConfigDict, mcfg: ModelConfig):
    model = build(mcfg)

    def eval_step(tree, batch):
        _, (stats, aux) = loss_fn(tree, batch, model, cfg)
        return stats["nll"] * stats["tokens"], stats["tokens"], aux

    return eval_step


def evaluate(eval_fn, tree, batches, mesh) -> dict[str, float]:
    total, count, aux = 0.0, 0.0, None
    for b in batches:
        s, n, aux = eval_fn(tree, sharding.shard_batch(b, mesh))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    if aux is not None:
        out.update({"val/" + k: v for k, v in flatten_aux(jax.device_get(aux)).items()})
    return out


# ----------------------------------------------------------------------------- data


def make_data(cfg: mlc.ConfigDict, workdir: str):
    """(tokenizer, train iterator, eval batches); errors name the dataset problem."""
    from jaxdyn.data import DataConfig, load_documents, make_eval_batches, make_train_iterator
    from jaxdyn.tokenizer import make_tokenizer

    dc = DataConfig(**{**cfg.data.to_dict(),
                       "cache_dir": cfg.data.cache_dir or os.path.join(workdir, "cache")})
    texts = None
    if cfg.tokenizer.kind == "bpe":
        texts = load_documents(dc, "train")
    tok = make_tokenizer(cfg.tokenizer.kind, directory=os.path.join(workdir, "tokenizer"),
                         texts=texts, vocab_size=cfg.tokenizer.vocab_size,
                         checkpoint_dir=cfg.init.checkpoint or None)
    n_proc = jax.process_count()
    if cfg.train.batch_size % n_proc:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                         f"{n_proc} processes")
    per_proc = cfg.train.batch_size // n_proc
    it = make_train_iterator(dc, tok, seq_len=cfg.train.seq_len, batch_size=per_proc,
                             seed=cfg.train.seed, process_index=jax.process_index(),
                             process_count=n_proc)
    evals = make_eval_batches(dc, tok, seq_len=cfg.train.seq_len, batch_size=per_proc,
                              max_batches=cfg.eval.batches)
    return tok, it, evals


# ----------------------------------------------------------------------------- loop


def validate(cfg: mlc.ConfigDict, mcfg: ModelConfig) -> None:
    if cfg.train.seq_len > mcfg.max_position_embeddings:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds the model's "
                         f"max_position_embeddings={mcfg.max_position_embeddings}; lower "
                         "train.seq_len or raise model.max_position_embeddings")
    if cfg.train.steps < 1 or cfg.train.batch_size < 1:
        raise ValueError("train.steps and train.batch_size must be >= 1")


def write_run_files(workdir: str, cfg, mcfg: ModelConfig, mesh) -> None:
    if not distributed.is_main_process():
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    mcfg.save(os.path.join(workdir, "model_config.json"))
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    run = {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
           "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
           "mesh": dict(mesh.shape), "git": git, "argv": sys.argv}
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump(run, f, indent=2)


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def train_and_evaluate(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Train per `cfg` in `workdir`, resuming from its latest checkpoint; returns last metrics."""
    workdir = os.path.abspath(workdir)
    mcfg0 = configlib.model_config(cfg)
    validate(cfg, mcfg0)
    os.makedirs(workdir, exist_ok=True)
    tok, it, eval_batches = make_data(cfg, workdir)
    mcfg = configlib.model_config(cfg, vocab_size=tok.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    state, tx, schedule, report = create_train_state(cfg, mcfg, mesh,
                                                     jax.random.key(cfg.train.seed))
    for line in report:
        print(line)
    write_run_files(workdir, cfg, mcfg, mesh)
    if distributed.is_main_process():
        tok.save(os.path.join(workdir, "tokenizer"))

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                        cfg.checkpoint.async_save)
    accum = int(cfg.train.grad_accum)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(start, state)
        it.restore(data_state)
        print(f"resumed from step {start} in {ckpt.directory}")
    start = start or 0
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.log.tensorboard,
                           wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
                           config=cfg.to_dict())
    n_params = param_count(state.params["params"])
    frac = trainable_fraction(state.params, cfg.train)
    print(f"model: {mcfg.family}/{mcfg.arch}, {n_params / 1e6:.2f}M params, trainable "
          f"{100 * frac:.2f}%, mesh {dict(mesh.shape)}")

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), sharding.rules_context():
        step_fn = jax.jit(make_train_step(cfg, mcfg, tx, schedule),
                          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                          donate_argnums=0)
        eval_fn = jax.jit(make_eval_step(cfg, mcfg))
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * accum
    f_tok = flops.train_flops_per_token(mcfg, cfg.train.seq_len)["model"]
    peak = flops.measure_peak_flops(jnp.dtype(mcfg.dtype))
    preempt = Preemption()
    last: dict[str, float] = {}
    last_good = f"step {start}" if start else "none"
    t_last, step_last = time.perf_counter(), start
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               disable=not distributed.is_main_process(), dynamic_ncols=True)
    try:
        with jax.set_mesh(mesh), sharding.rules_context():
            for step in bar:
                for _ in range(accum):
                    state, m = step_fn(state, sharding.shard_batch(next(it), mesh))
                done = step + 1
                is_log = done % cfg.log.every == 0 or done == cfg.train.steps
                is_save = done % cfg.checkpoint.every == 0 or done == cfg.train.steps
                is_eval = done % cfg.eval.every == 0 or done == cfg.train.steps
                if is_log or is_save or preempt.requested:
                    loss = float(m["loss"])
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {loss} at step {done}; nothing was saved after it; the "
                            f"last good checkpoint is {last_good} in {ckpt.directory}")
                if is_log:
                    dt = time.perf_counter() - t_last
                    tps = tokens_per_step * (done - step_last) / max(dt, 1e-9)
                    host = jax.device_get({k: v for k, v in m.items() if k != "aux"})
                    last = {f"train/{k}": float(v) for k, v in host.items()}
                    last["train/tokens_per_sec"] = tps
                    last["train/mfu"] = flops.mfu(f_tok, tps, peak, jax.device_count())
                    last.update({"train/" + k: v for k, v in
                                 flatten_aux(jax.device_get(m["aux"])).items()})
                    writer.write(done, "train", last)
                    bar.set_postfix(loss=f"{last['train/loss']:.3f}", tok_s=f"{tps:,.0f}")
                    t_last, step_last = time.perf_counter(), done
                if is_eval:
                    val = evaluate(eval_fn, state.params, eval_batches, mesh)
                    writer.write(done, "val", val)
                    last.update(val)
                if is_save or preempt.requested:
                    ckpt.save(done, state, it.state(), {"step": done, "loss": last.get(
                        "train/loss")})
                    last_good = f"step {done}"
                if preempt.requested:
                    ckpt.wait()
                    print(f"preempted: saved step {done}; rerun the same command to resume")
                    break
    finally:
        preempt.restore()
        ckpt.close()
        writer.close()
        bar.close()
    if not preempt.requested and distributed.is_main_process():
        print_sample(cfg, mcfg, state, tok, workdir)
    return last


def print_sample(cfg, mcfg: ModelConfig, state: TrainState, tok, workdir: str) -> None:
    from jaxdyn.generate import generate
    from jaxdyn.sampling import SamplingConfig

    params = merge_lora(state.params["params"], state.params["lora"], cfg.train.lora)
    prompt = tok.encode(cfg.sample.prompt) or [tok.eos_id]
    res = generate(mcfg, jax.device_get(params), [prompt], cfg.sample.max_new_tokens,
                   SamplingConfig(temperature=cfg.sample.temperature), eos_id=tok.eos_id)
    print(f"\nsample: {cfg.sample.prompt}{tok.decode(res.tokens[0])}\n")
    print(f"checkpoints: {workdir}/checkpoints\nmetrics:     {workdir}/metrics.jsonl\n"
          f"plots:       python -m jaxdyn.plot --workdir {workdir}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.train")
    ap.add_argument("--config", required=True, help="configs/<exp>.py[:preset]")
    ap.add_argument("--workdir", required=True)
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognised arguments {bad}; overrides look like --config.train.lr=3e-4")
    distributed.init()
    cfg = configlib.load_config(args.config, rest)
    np.set_printoptions(precision=4)
    train_and_evaluate(cfg, args.workdir)


if __name__ == "__main__":
    main()
