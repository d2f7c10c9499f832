"""Training: `python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR`.

`main` parses flags and calls `train_and_evaluate(cfg, workdir)`. The pieces are importable:
`create_train_state(cfg, rng)` builds the state, `make_train_step(cfg)` the pure step (jit it
with shardings from a mesh), `make_eval_step(cfg)` the validation step. Rerunning the same
command in the same workdir resumes from the newest checkpoint, data position included.
"""

from __future__ import annotations

import math
import os
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

from jaxdyn import distributed, sharding
from jaxdyn.checkpoint import Checkpointer
from jaxdyn.config import loader as configlib
from jaxdyn.model import build, param_count
from jaxdyn.model.loss import lm_loss
from jaxdyn.multitoken import train_hooks as mtp_train
from jaxdyn.train import flops
from jaxdyn.train.metrics import MetricsWriter
from jaxdyn.train.optim import init_lora, make_optimizer, make_schedule, merge_lora, trainable_mask
from jaxdyn.train.setup import (
    CheckpointMismatchError,
    Preemption,
    accum_sharding,
    apply_debug_switches,
    check_init_checkpoint,
    dense_transfer_source,
    gather_data_state,
    host_params,
    make_data,
    make_mesh,
    make_tokenizer_for,
    restore_data_state,
    stack_batches,
    write_run_files,
)

__all__ = ["CheckpointMismatchError", "NonFiniteLossError", "TrainState", "create_train_state",
           "evaluate", "main", "make_eval_step", "make_train_step", "train_and_evaluate"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; nothing is saved after it."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any  # {"params": model params, "lora": LoRA factors or {}}
    opt_state: Any
    nonfinite_step: jax.Array  # first step whose loss was NaN/Inf; -1 while all are finite
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def state_shardings(cfg: mlc.ConfigDict, mesh, tree: Any, tx, opt_state: Any) -> TrainState:
    """Shardings of a TrainState: params by the logical-axis rules, optimizer moments like the
    params they mirror, LoRA factors and scalars replicated."""
    rep = sharding.replicated(mesh)
    tree_sh = {"params": mtp_train.param_shardings(cfg, mesh),
               "lora": jax.tree.map(lambda _: rep, tree["lora"])}
    masked = lambda x: isinstance(x, optax.MaskedNode)  # other LR groups' slots (lr_groups)
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, opt_state, tree_sh,
                                   transform_non_params=lambda _: rep, is_leaf=masked)
    return TrainState(step=rep, params=tree_sh, opt_state=opt_sh, nonfinite_step=rep, tx=tx)


def create_train_state(cfg: mlc.ConfigDict, rng: jax.Array, *, params: Any = None,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """Fresh state of a finalized config: `params` (else random / `init.checkpoint`), LoRA
    factors, optimizer state; placed on `mesh` by the sharding rules (default: cfg.mesh)."""
    mesh = mesh or make_mesh(cfg)
    k_init, k_lora = jax.random.split(rng)
    if params is None:
        # params are created/read straight into their shardings
        params = mtp_train.initial_params(cfg, k_init, mesh)[0]
    lc = cfg.train.lora
    tree = {"params": params, "lora": init_lora(params, lc, k_lora) if lc.enabled else {}}
    tx, _ = make_optimizer(cfg.train, tree)
    sh = state_shardings(cfg, mesh, tree, tx, jax.eval_shape(tx.init, tree))
    tree = {"params": sharding.shard_params(tree["params"], sh.params["params"]),
            "lora": jax.device_put(tree["lora"], sh.params["lora"])}
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(tree)
    scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), sh.step)
    return TrainState(step=scalar(0), params=tree, opt_state=opt_state,
                      nonfinite_step=scalar(-1), tx=tx)


def abstract_train_state(cfg: mlc.ConfigDict, rng: jax.Array, mesh) -> TrainState:
    """Shapes, dtypes and shardings of `create_train_state` (a restore target); allocates
    nothing and reads no init checkpoint."""
    lc = cfg.train.lora

    def tree_of(r):
        params = mtp_train.init_params(cfg, r)
        return {"params": params, "lora": init_lora(params, lc, r) if lc.enabled else {}}

    tree = jax.eval_shape(tree_of, rng)
    tx, _ = make_optimizer(cfg.train, tree)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=scalar, params=tree, opt_state=jax.eval_shape(tx.init, tree),
                       nonfinite_step=scalar, tx=tx)
    sh = state_shardings(cfg, mesh, tree, tx, state.opt_state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, sh)


def loss_fn(tree, batch: dict, model, tc) -> tuple[jax.Array, tuple[dict, dict]]:
    """LM loss + Σ over aux losses of their mean over scan units; (loss, (stats, aux))."""
    params = merge_lora(tree["params"], tree["lora"], tc.lora.alpha, tc.lora.rank)
    out = model.apply({"params": params}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], compute_logits=False)
    lm, stats = lm_loss(out.hidden, out.unembed, batch["tokens"], batch["segment_ids"],
                        chunk=tc.loss_chunk, z_loss=tc.z_loss)
    aux_loss = sum((jnp.mean(v) for v in out.aux["losses"].values()), jnp.zeros((), jnp.float32))
    return lm + aux_loss, (stats, out.aux)


def make_train_step(cfg: mlc.ConfigDict):
    """`step(state, batch) -> (state, metrics)`; batch leaves are [grad_accum, b, T] and the
    micro-batch gradients are averaged in a scan. Metrics are scalars (aux: per unit [U])."""
    model = mtp_train.train_model(cfg)  # CausalLM, or MultiTokenLM for an `mtp` block
    tc = mlc.FrozenConfigDict(cfg.train)
    schedule = make_schedule(tc)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def micro(carry, mb):
            (loss, (stats, aux)), g = grad_fn(state.params, mb, model, tc)
            out = {"loss": loss, "nll": stats["nll"], "accuracy": stats["accuracy"],
                   "tokens": stats["tokens"], "aux": aux}
            return jax.tree.map(jnp.add, carry, g), out

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, outs = jax.lax.scan(micro, zeros, batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        m = jax.tree.map(lambda x: jnp.mean(x, axis=0), outs)
        m["tokens"] = jnp.sum(outs["tokens"])
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = jax.tree.leaves(trainable_mask(state.params, tc))
        m["grad_norm"] = optax.tree.norm(
            [g for g, k in zip(jax.tree.leaves(grads), keep, strict=True) if k])
        m["param_norm"] = optax.tree.norm(params)
        m["lr"] = schedule(state.step)
        bad = (state.nonfinite_step < 0) & ~jnp.isfinite(m["loss"])
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         nonfinite_step=jnp.where(bad, state.step + 1, state.nonfinite_step),
                         tx=state.tx)
        return new, m

    return step


def make_eval_step(cfg: mlc.ConfigDict, routing_mode: str = "topk"):
    """`eval_step(tree, batch) -> (nll sum, target count, aux)` for one [b, T] batch.

    Routed models evaluate in `routing_mode` "topk" (teacher forcing, as trained) or "causal"
    (the causal routers decide, as in generation; routing spec §7)."""
    model = mtp_train.train_model(cfg, routing_mode)  # CausalLM, or MultiTokenLM for `mtp`
    tc = mlc.FrozenConfigDict(cfg.train)

    def eval_step(tree, batch):
        _, (stats, aux) = loss_fn(tree, batch, model, tc)
        return stats["nll"] * stats["tokens"], stats["tokens"], aux

    return eval_step


def evaluate(eval_fn, tree, batches: list[dict], mesh, prefix: str = "val") -> dict[str, float]:
    """Token-weighted validation loss and perplexity, aux metrics averaged over batches, as
    `{prefix}/loss`, `{prefix}/ppl`, `{prefix}/<aux>`."""
    total, count, auxes = 0.0, 0.0, []
    for b in batches:
        s, n, aux = jax.device_get(eval_fn(tree, sharding.shard_batch(b, mesh)))
        total, count = total + float(s), count + float(n)
        auxes.append(mtp_train.flat_metrics(aux))
    loss = total / max(count, 1.0)
    out = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0))}
    for k in auxes[0] if auxes else ():
        out[f"{prefix}/{k}"] = float(np.mean([a[k] for a in auxes]))
    return out


def train_and_evaluate(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Train per `cfg` in `workdir` (resuming from its newest checkpoint); returns the metrics
    of the last logged step (`train/...`, `val/...`). Config, data and init-checkpoint errors
    are raised before anything is written to the workdir or compiled."""
    workdir = os.path.abspath(workdir)
    cfg = configlib.finalize(cfg, workdir=workdir)
    apply_debug_switches(cfg)
    mesh = make_mesh(cfg)
    tok = make_tokenizer_for(cfg, workdir)
    cfg = configlib.finalize(cfg, vocab_size=tok.vocab_size, workdir=workdir)
    mcfg = configlib.model_config(cfg)
    check_init_checkpoint(cfg)
    it, eval_batches = make_data(cfg, tok, mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    rng = jax.random.key(cfg.train.seed)
    start = Checkpointer(ckpt_dir, async_save=False).latest_step() \
        if os.path.isdir(ckpt_dir) else None
    if start is None:
        # params are created/read straight into their shardings
        params, report = mtp_train.initial_params(cfg, jax.random.split(rng)[0], mesh)
        state = create_train_state(cfg, rng, params=params, mesh=mesh)
    else:  # restore onto shapes and shardings only: no init checkpoint read, no random init
        report = [f"resumed from step {start} in {ckpt_dir}"]
        state = abstract_train_state(cfg, rng, mesh)
    peak = flops.measure_peak_flops(jnp.dtype(mcfg.dtype))
    write_run_files(workdir, cfg, mcfg, mesh, tok, report, peak)
    main = distributed.is_main_process()  # only process 0 logs; every process checkpoints
    for line in report if main else ():
        print(line)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    if start is not None:
        state, data_state, _ = ckpt.restore(start, state)
        notes = restore_data_state(it, data_state)  # every process: its own data position
        for line in notes if main else ():
            print(line)
    start = start or 0
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.log.tensorboard,
                           wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
                           config=cfg.to_dict())
    keep = jax.tree.leaves(trainable_mask(state.params, cfg.train))
    n_train = sum(int(x.size) for x, k in zip(jax.tree.leaves(state.params), keep,
                                              strict=True) if k)
    if main:
        print(f"model: {mcfg.family}/{mcfg.arch}, "
              f"{param_count(state.params['params']) / 1e6:.2f}M params "
              f"({n_train / 1e6:.2f}M trainable), mesh {dict(mesh.shape)}, "
              f"{cfg.train.batch_size}x{cfg.train.seq_len} tokens per step")

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    with jax.set_mesh(mesh), sharding.rules_context():
        step_fn = jax.jit(make_train_step(cfg), donate_argnums=0,
                          in_shardings=(state_sh, accum_sharding(mesh)),
                          out_shardings=(state_sh, None))
        eval_fn = jax.jit(make_eval_step(cfg))
        causal_eval_fn = jax.jit(make_eval_step(cfg, "causal")) \
            if mcfg.arch != "dense" and cfg.eval.causal_mode else None
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    f_tok = flops.train_flops_per_token(mcfg, t.seq_len)["model"]
    stop = t.stop_at_step or t.steps
    last: dict[str, float] = {}
    last_good = f"step {start}" if start else "none"
    preempt = Preemption()
    bar = tqdm(total=stop, initial=start, disable=not distributed.is_main_process(),
               dynamic_ncols=True, desc="train")
    t_last, step_last = None, start
    done = start
    try:
        with jax.set_mesh(mesh), sharding.rules_context():
            while done < stop:
                batch = stack_batches(it, t.grad_accum, mesh)
                if done == 0:
                    log_transfer(writer, cfg, eval_fn, state.params, batch, main)
                with jax.transfer_guard("disallow" if cfg.debug.transfer_guard else "allow"):
                    state, m = step_fn(state, batch)
                done += 1
                bar.update(1)
                if t_last is None:  # the first step compiled: time from its end
                    jax.block_until_ready(m["loss"])
                    t_last, step_last = time.perf_counter(), done
                stopping = preempt.requested or ckpt.reached_preemption(done) or done == stop
                is_log = done % cfg.log.every == 0 or stopping
                is_save = done % cfg.checkpoint.every == 0 or stopping
                is_eval = done % cfg.eval.every == 0 or done == t.steps
                if is_log:
                    last = log_train(writer, done, jax.device_get(m), tokens_per_step,
                                     time.perf_counter() - t_last, done - step_last, f_tok,
                                     peak, mesh.size)
                    t_last, step_last = time.perf_counter(), done
                    bar.set_postfix(loss=f"{last['train/loss']:.3f}",
                                    tok_s=f"{last.get('train/tokens_per_sec', 0):,.0f}")
                if (is_log or is_save) and cfg.debug.check_finite:
                    bad = int(jax.device_get(state.nonfinite_step))
                    if bad >= 0:
                        raise NonFiniteLossError(
                            f"loss is not finite at step {bad}; nothing was saved after it; the "
                            f"last good checkpoint is {last_good} in {ckpt.directory} (lower "
                            "train.lr or set train.clip_norm, then rerun to resume)")
                if is_eval:
                    val = evaluate(eval_fn, state.params, eval_batches, mesh)
                    if causal_eval_fn is not None:  # routing spec §7.5: eval reports both
                        val.update(evaluate(causal_eval_fn, state.params, eval_batches, mesh,
                                            "val_causal"))
                    writer.write(done, "val", val)
                    last.update(val)
                if is_save:
                    ckpt.save(done, state, gather_data_state(it.state()), {
                        "step": done, "loss": last.get("train/loss"),
                        "lora_alpha": t.lora.alpha, "lora_rank": t.lora.rank})
                    last_good = f"step {done}"
                if stopping and done < t.steps:
                    ckpt.wait()
                    why = "preempted" if done < stop else "stopped (train.stop_at_step)"
                    print(f"\n{why}: saved step {done}; rerun the same command to resume")
                    break
    finally:
        preempt.restore()
        bar.close()
        ckpt.close()
        writer.close()
    if done == t.steps:
        print_sample(cfg, state, tok)  # collective: every process gathers the params
    if done == t.steps and main:
        print(f"checkpoints: {ckpt_dir}\nmetrics:     {workdir}/metrics.jsonl\n"
              f"plots:       python -m jaxdyn.viz.dashboard --workdir {workdir}")
    return last


def log_transfer(writer: MetricsWriter, cfg: mlc.ConfigDict, eval_fn, tree, batch: dict,
                 main: bool) -> None:
    """Dense → routed transfer: the dense source's and the fresh routed model's LM loss on the
    first training micro-batch, as a `transfer` row at step 0 (nothing for other runs)."""
    src = dense_transfer_source(cfg)
    if src is None:
        return
    icfg, dense = src
    first = jax.tree.map(lambda a: a[0], batch)  # [grad_accum, b, T] -> [b, T]
    tc = mlc.FrozenConfigDict(cfg.train)
    dense_nll = jax.jit(lambda p, b: loss_fn({"params": p, "lora": {}}, b, build(icfg),
                                             tc)[1][0]["nll"])
    s, n, _ = jax.device_get(eval_fn(tree, first))
    row = {"transfer/dense_nll": float(jax.device_get(dense_nll(dense, first))),
           "transfer/routed_nll": float(s) / max(float(n), 1.0)}
    writer.write(0, "transfer", row)
    if main:
        print(f"transfer: first-batch loss dense {row['transfer/dense_nll']:.4f}, routed at "
              f"step 0 {row['transfer/routed_nll']:.4f}")


def log_train(writer: MetricsWriter, step: int, m: dict, tokens_per_step: int, dt: float,
              steps: int, f_tok: float, peak: float, n_devices: int) -> dict[str, float]:
    """Write one `train` row: scalars, throughput/MFU (not for the compile step), aux."""
    row = {f"train/{k}": float(v) for k, v in m.items() if k != "aux"}
    if steps > 0:
        tps = tokens_per_step * steps / max(dt, 1e-9)
        row["train/tokens_per_sec"] = tps
        row["train/mfu"] = flops.mfu(f_tok, tps, peak, n_devices)
    row.update({"train/" + k: v for k, v in mtp_train.flat_metrics(m["aux"]).items()})
    writer.write(step, "train", row)
    return row


def print_sample(cfg: mlc.ConfigDict, state: TrainState, tok) -> None:
    """Greedy continuation of `cfg.sample.prompt` with the final (LoRA-merged) params."""
    if cfg.sample.max_new_tokens < 1:
        return
    from jaxdyn.decode.generate import generate
    from jaxdyn.decode.sampling import SamplingConfig

    lc = cfg.train.lora
    params = merge_lora(state.params["params"], state.params["lora"], lc.alpha, lc.rank)
    params = host_params(params)
    if not distributed.is_main_process():
        return
    prompt = tok.encode(cfg.sample.prompt) or [tok.eos_id]
    res = generate(configlib.model_config(cfg), params, [prompt],
                   cfg.sample.max_new_tokens, SamplingConfig(temperature=cfg.sample.temperature),
                   eos_id=tok.eos_id)
    print(f"\nsample: {cfg.sample.prompt!r} -> {tok.decode(res.tokens[0])!r}\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxdyn.train",
                                 epilog="overrides: --config.train.lr=3e-4 (any config key)")
    ap.add_argument("--config", required=True, help="configs/<exp>.py[:preset]")
    ap.add_argument("--workdir", required=True, help="run folder (resumed when it has one)")
    args, rest = ap.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):  # `--config.a.b=v` or `--config.a.b v`
        item = rest[i]
        if not item.startswith("--config."):
            ap.error(f"unrecognised argument {item!r}; overrides look like --config.train.lr=3e-4")
        if "=" not in item and i + 1 < len(rest):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    distributed.init()
    cfg = configlib.load_config(args.config, overrides)
    train_and_evaluate(cfg, args.workdir)


if __name__ == "__main__":
    main()
