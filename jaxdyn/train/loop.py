"""The training loop: `train_and_evaluate(cfg, workdir)`.

Rerunning the same command in the same workdir resumes from the newest checkpoint, data
position included. A workdir is safe (`jaxdyn.train.workdir`): one trainer at a time, one model
per workdir, nothing written through a symlink out of it, and nothing written at all by a run
that is refused or has nothing left to train. The loop is objective-agnostic: what is trained
(the model, its parameters, loss, data, trainable set and closing sample) comes from
`train.objective` (`jaxdyn.train.objectives`); everything else (mesh and sharding rules,
gradient accumulation, checkpoints, resume, preemption, metrics, validation) is the same for
every run.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
from tqdm import tqdm

from jaxdyn import distributed, sharding
from jaxdyn.checkpoint import Checkpointer
from jaxdyn.config import paths
from jaxdyn.config.loader import inside
from jaxdyn.model import param_count
from jaxdyn.model.lora import merge_lora
from jaxdyn.model.units import flatten_aux
from jaxdyn.train import flops, schema
from jaxdyn.train.init import check_init_checkpoint, dense_transfer_source, initial_params
from jaxdyn.train.metrics import MetricsWriter, last_logged, read_metrics
from jaxdyn.train.objectives import LanguageModel, make_objective
from jaxdyn.train.optim import trainable_mask
from jaxdyn.train.setup import (
    Preemption,
    accum_sharding,
    apply_debug_switches,
    gather_data_state,
    host_params,
    make_mesh,
    make_tokenizer_for,
    restore_data_state,
    stack_batches,
    write_run_files,
)
from jaxdyn.train.state import (
    abstract_train_state,
    create_train_state,
    trainable_rules,
)
from jaxdyn.train.step import evaluate, make_eval_step, make_train_step
from jaxdyn.train.workdir import (
    WorkdirLock,
    check_run_paths,
    check_same_run,
    check_workdir_url,
    committed_step,
    nothing_to_train,
    refuse_url,
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; nothing is saved after it."""


def train_and_evaluate(cfg: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Train per `cfg` in `workdir` (resuming from its newest checkpoint); returns the metrics
    of the last logged step (`train/...`, `val/...`). Config, data, init-checkpoint and workdir
    errors (an unsupported URL, another trainer's lock, another model, a symlink out of the
    workdir) are raised before anything is written to the workdir or compiled.

    `workdir` may be on an object store (`gs://…`, `s3://…`): every file then goes there
    (docs/training.md#workdirs-on-object-stores) except the token cache, which stays local
    (`local_cache_dir`)."""
    check_workdir_url(workdir)
    refuse_url("--config.init.checkpoint", cfg.init.checkpoint, "init checkpoints")
    refuse_url("--config.data.cache_dir", cfg.data.cache_dir, "caches")
    workdir = paths.absolute(workdir)  # a URL is kept as it is, never made a local path
    cfg = local_cache_dir(cfg, workdir)
    cfg = schema.finalize(cfg, workdir=workdir)
    apply_debug_switches(cfg)
    mesh = make_mesh(cfg)
    make_objective(cfg)  # an unknown objective or a missing feature block fails here
    check_run_paths(workdir)
    check_same_run(workdir, cfg, schema.model_config(cfg), ignore=("model.vocab_size",))
    with WorkdirLock(workdir, enabled=distributed.is_main_process()):  # released on any exit
        return _train(cfg, workdir, mesh)


def local_cache_dir(cfg: mlc.ConfigDict, workdir: str) -> mlc.ConfigDict:
    """For an object-store workdir, `data.cache_dir` (default `cache`; relative paths count
    from it) is placed under a local folder standing for the URL
    (`paths.local_cache_root`): the token cache is per process and written with local
    temp-file renames, so it stays on each host. Local workdirs: `cfg` unchanged."""
    if not paths.is_url(workdir) or os.path.isabs(cfg.data.cache_dir or ""):
        return cfg
    out = mlc.ConfigDict(cfg.to_dict())
    root = paths.local_cache_root(workdir)
    os.makedirs(root, exist_ok=True)
    out.data.cache_dir = inside(root, cfg.data.cache_dir or "cache")
    return out


def _train(cfg: mlc.ConfigDict, workdir: str, mesh) -> dict[str, float]:
    """`train_and_evaluate` once the workdir is locked."""
    tok = make_tokenizer_for(cfg, workdir)  # on resume: read from the workdir
    cfg = schema.finalize(cfg, vocab_size=tok.vocab_size, workdir=workdir)
    objective = make_objective(cfg)
    mcfg = schema.model_config(cfg)
    check_same_run(workdir, cfg, mcfg)  # the vocabulary size too, now that it is known
    check_init_checkpoint(cfg)
    main = distributed.is_main_process()  # only process 0 logs; every process checkpoints
    start = committed_step(workdir)
    history = read_metrics(workdir)  # a damaged metrics.jsonl is refused here, unwritten
    done_already = nothing_to_train(workdir, start, cfg.train)
    if done_already:
        if main:
            print(done_already)
        return last_logged(history, start)
    t = cfg.train
    it, eval_batches = objective.data(tok, t.batch_size // t.grad_accum, jax.process_index(),
                                      jax.process_count())
    ckpt_dir = paths.join(workdir, "checkpoints")
    rng = jax.random.key(t.seed)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    if start is None:  # params are created/read straight into their shardings
        params, report = initial_params(cfg, objective, jax.random.split(rng)[0], mesh)
        state = create_train_state(cfg, rng, params=params, mesh=mesh, objective=objective)
    else:  # restore onto shapes and shardings only: no init checkpoint read, no random init;
        # the newest step that reads back whole (a damaged newer one is set aside)
        start, state, data_state, _, notes = ckpt.restore_latest(
            abstract_train_state(cfg, rng, mesh, objective))
        report = (notes or [f"resumed from step {start} in {ckpt_dir}"]) \
            + restore_data_state(it, data_state)  # every process: its own data position
    peak = flops.measure_peak_flops(jnp.dtype(mcfg.dtype))
    write_run_files(workdir, cfg, mcfg, mesh, tok, report, peak)  # after a restore succeeded
    for line in report if main else ():
        print(line)
    start = start or 0
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.log.tensorboard,
                           wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
                           config=cfg.to_dict())
    keep = jax.tree.leaves(trainable_mask(state.params, t, trainable_rules(cfg, objective)))
    n_train = sum(int(x.size) for x, k in zip(jax.tree.leaves(state.params), keep,
                                              strict=True) if k)
    if main:
        print(f"model: {mcfg.family}/{mcfg.arch} ({t.objective}), "
              f"{param_count(state.params['params']) / 1e6:.2f}M params "
              f"({n_train / 1e6:.2f}M trainable), mesh {dict(mesh.shape)}, "
              f"{t.batch_size}x{t.seq_len} tokens per step")

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    with jax.set_mesh(mesh), sharding.rules_context():
        step_fn = jax.jit(make_train_step(cfg, objective), donate_argnums=0,
                          in_shardings=(state_sh, accum_sharding(mesh)),
                          out_shardings=(state_sh, None))
        eval_fn = jax.jit(make_eval_step(cfg, objective=objective))
        causal_eval_fn = jax.jit(make_eval_step(cfg, "causal", objective)) \
            if mcfg.arch != "dense" and cfg.eval.causal_mode else None
    tokens_per_step = t.batch_size * t.seq_len
    f_tok = flops.train_flops_per_token(mcfg, t.seq_len)["model"]
    stop = t.stop_at_step or t.steps
    last: dict[str, float] = {}
    last_good = f"step {start}" if start else "none"
    preempt = Preemption()
    bar = tqdm(total=stop, initial=start, disable=not main, dynamic_ncols=True, desc="train")
    t_last, step_last = None, start
    done = start
    try:
        with jax.set_mesh(mesh), sharding.rules_context():
            while done < stop:
                batch = stack_batches(it, t.grad_accum, mesh)
                if done == 0:
                    log_transfer(writer, cfg, eval_fn, state.params, batch, main, mesh)
                with jax.transfer_guard("disallow" if cfg.debug.transfer_guard else "allow"):
                    state, m = step_fn(state, batch)
                done += 1
                bar.update(1)
                if t_last is None:  # the first step compiled: time from its end
                    jax.block_until_ready(m["loss"])
                    t_last, step_last = time.perf_counter(), done
                stopping = preempt.agreed() or ckpt.reached_preemption(done) or done == stop
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
                if is_eval and eval_batches:
                    val = evaluate(eval_fn, state.params, eval_batches, mesh)
                    if causal_eval_fn is not None:  # eval reports both routing modes
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
        print_sample(cfg, objective, state, tok)  # collective: every process gathers params
    if done == t.steps and main:
        print(f"checkpoints: {ckpt_dir}\nmetrics:     {workdir}/metrics.jsonl\n"
              f"pictures:    python -m jaxdyn.viz --workdir {workdir}")
    return last


def log_transfer(writer: MetricsWriter, cfg: mlc.ConfigDict, eval_fn, tree, batch: dict,
                 main: bool, mesh: jax.sharding.Mesh) -> None:
    """Dense → routed transfer: the dense source's and the fresh routed model's LM loss on the
    first training micro-batch, as a `transfer` row at step 0 (nothing for other runs)."""
    src = dense_transfer_source(cfg)
    if src is None:
        return
    icfg, dense = src
    # Replicated over the run's mesh (the checkpoint was read onto one device).
    dense = jax.device_put(dense, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    first = jax.tree.map(lambda a: a[0], batch)  # [grad_accum, b, T] -> [b, T]
    lm = LanguageModel(cfg, icfg)
    dense_nll = jax.jit(lambda p, b: lm.loss(lm.model(), {"params": p}, b,
                                             jax.random.key(0))[1]["nll"])
    stats, _ = jax.device_get(eval_fn(tree, first))
    row = {"transfer/dense_nll": float(jax.device_get(dense_nll(dense, first))),
           "transfer/routed_nll": float(stats["nll"])}
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
    row.update({"train/" + k: v for k, v in flatten_aux(m["aux"]).items()})
    writer.write(step, "train", row)
    return row


def print_sample(cfg: mlc.ConfigDict, objective, state, tok) -> None:
    """The objective's closing sample with the final (LoRA-merged) parameters."""
    if cfg.sample.max_new_tokens < 1:
        return
    lc = cfg.train.lora
    params = host_params(merge_lora(state.params["params"], state.params["lora"], lc.alpha,
                                    lc.rank))
    if not distributed.is_main_process():
        return
    text = objective.sample(params, tok)
    if text is not None:
        print(f"\nsample: {text}\n")
