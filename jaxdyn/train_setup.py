"""Set-up pieces of `jaxdyn.train`: mesh, tokenizer, data, init-checkpoint checks and loading,
run files, fail-fast switches and preemption. Each raises a named error before anything is
compiled or written to the workdir.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdyn import configlib, distributed, flops, sharding
from jaxdyn.checkpoint import load_params, params_shapes
from jaxdyn.model import ModelConfig, dense_to_routed, init_params, stack_layers, unstack_layers
from jaxdyn.model.transfer import FREE_FIELDS


class CheckpointMismatchError(ValueError):
    """`init.checkpoint` holds a model that does not fit the configured one."""


def make_mesh(cfg: mlc.ConfigDict) -> jax.sharding.Mesh:
    """cfg.mesh over all devices when an axis is -1, else over the first data·fsdp·tensor."""
    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    devices = jax.devices() if -1 in sizes else jax.devices()[:math.prod(sizes)]
    mesh = sharding.make_mesh(*sizes, devices=devices)
    rows = cfg.train.batch_size // cfg.train.grad_accum
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
        raise configlib.ConfigValueError(
            f"micro-batch train.batch_size/train.grad_accum={rows} is not divisible by the "
            f"data x fsdp mesh size {split}; change train.batch_size or cfg.mesh")
    return mesh


def apply_debug_switches(cfg: mlc.ConfigDict) -> None:
    """JAX practices §11: opt-in NaN debugging and strict rank promotion; assert threefry."""
    if cfg.debug.debug_nans:
        jax.config.update("jax_debug_nans", True)
    if cfg.debug.strict_rank_promotion:
        jax.config.update("jax_numpy_rank_promotion", "raise")
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("jax_threefry_partitionable must be on (sharding-independent RNG)")


def make_tokenizer_for(cfg: mlc.ConfigDict, workdir: str):
    """The configured tokenizer; a BPE one is trained on the train split once per workdir."""
    from jaxdyn.data import DataConfig, load_documents
    from jaxdyn.tokenizer import make_tokenizer

    texts = None
    directory = os.path.join(workdir, "tokenizer")
    if cfg.tokenizer.kind == "bpe" and not os.path.isdir(directory):
        texts = load_documents(DataConfig(**cfg.data.to_dict()), "train")
    return make_tokenizer(cfg.tokenizer.kind, directory=directory, texts=texts,
                          vocab_size=cfg.tokenizer.vocab_size,
                          checkpoint_dir=cfg.init.checkpoint or None)


def make_data(cfg: mlc.ConfigDict, tok, mesh) -> tuple[Any, list[dict]]:
    """(train iterator of this process's micro-batches, validation batches)."""
    from jaxdyn.data import DataConfig, make_eval_batches, make_train_iterator

    dc = DataConfig(**cfg.data.to_dict())
    n_proc = jax.process_count()
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n_proc:
        raise configlib.ConfigValueError(f"micro-batch {micro} must be divisible by the "
                                         f"{n_proc} processes")
    it = make_train_iterator(dc, tok, seq_len=cfg.train.seq_len, batch_size=micro // n_proc,
                             seed=cfg.train.seed, process_index=jax.process_index(),
                             process_count=n_proc)
    evals = make_eval_batches(dc, tok, seq_len=cfg.train.seq_len, batch_size=micro // n_proc,
                              max_batches=cfg.eval.batches)
    return it, evals


def accum_sharding(mesh) -> NamedSharding:
    """[grad_accum, b, T] batches: micro-batch axis whole, rows split like `batch_sharding`."""
    return NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh).spec))


def stack_batches(it, accum: int, mesh) -> dict[str, jax.Array]:
    """`accum` micro-batches from the iterator as global [accum, b, T] device arrays."""
    local = [next(it) for _ in range(accum)]
    sh = accum_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.stack([b[k] for b in local]))
            for k in local[0]}


# ----------------------------------------------------------------------------- init checkpoint


def _source(path: str) -> tuple[ModelConfig, Any, Any]:
    """(cfg, param shapes, loader) of an import folder or a training workdir."""
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"init.checkpoint {path!r} has no model_config.json; import a "
                                "Hugging Face folder with `python -m conversion import`")
    icfg = ModelConfig.load(cfg_path)
    if os.path.isdir(os.path.join(path, "params")):
        return icfg, params_shapes(os.path.join(path, "params")), \
            lambda: load_params(os.path.join(path, "params"))
    from jaxdyn.checkpoint import load_model

    params = load_model(path)[1]
    return icfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), \
        lambda: params


def check_init_checkpoint(cfg: mlc.ConfigDict) -> None:
    """Fail before compiling when `init.checkpoint` cannot initialise the configured model."""
    if not cfg.init.checkpoint:
        return
    path = cfg.init.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init.checkpoint {path!r} is not a folder")
    icfg = ModelConfig.load(os.path.join(path, "model_config.json")) \
        if os.path.exists(os.path.join(path, "model_config.json")) else _source(path)[0]
    mcfg = configlib.model_config(cfg)
    free = set(FREE_FIELDS) if icfg.arch == "dense" else FREE_FIELDS - {"arch", "routing"}
    a, b = icfg.to_dict(), mcfg.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k not in free and a[k] != b[k]}
    if diff:
        raise CheckpointMismatchError(
            f"init.checkpoint {path!r} holds a {icfg.family}/{icfg.arch} model that does not "
            f"match the configured {mcfg.family}/{mcfg.arch}: {diff} (checkpoint, configured); "
            "set those model fields to the checkpoint's model_config.json")


def initial_params(cfg: mlc.ConfigDict, rng: jax.Array) -> tuple[Any, list[str]]:
    """(params, report): random, or loaded from `init.checkpoint` (same architecture, either
    layer layout) or transferred from a dense import into a routed model."""
    mcfg = configlib.model_config(cfg)
    if not cfg.init.checkpoint:
        return init_params(mcfg, rng), ["init: random (no init.checkpoint)"]
    check_init_checkpoint(cfg)
    icfg, shapes, load = _source(cfg.init.checkpoint)
    if mcfg.arch != "dense" and icfg.arch == "dense":
        params, rep = dense_to_routed(icfg, load(), mcfg, rng)
        return params, [f"init from {cfg.init.checkpoint}: {rep}"]
    want = jax.eval_shape(lambda r: init_params(mcfg, r), rng)
    relayout = stack_layers if mcfg.scan_layers else unstack_layers
    got = jax.eval_shape(relayout, shapes)
    shape_of = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
    if shape_of(want) != shape_of(got):
        raise CheckpointMismatchError(f"init.checkpoint {cfg.init.checkpoint!r}: parameter "
                                      "shapes differ from the configured model's")
    dtype = jnp.dtype(mcfg.param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), relayout(load()))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return params, [f"init from {cfg.init.checkpoint}: loaded {len(jax.tree.leaves(params))} "
                    f"tensors ({n / 1e6:.2f}M params); new parameters: none"]


# ----------------------------------------------------------------------------- run files


def write_run_files(workdir: str, cfg: mlc.ConfigDict, mcfg: ModelConfig, mesh, tok,
                    report: list[str], peak: float) -> None:
    """config.json (resolved), model_config.json, run.json (versions, devices, git), tokenizer."""
    if not distributed.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    mcfg.save(os.path.join(workdir, "model_config.json"))
    tok.save(os.path.join(workdir, "tokenizer"))
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    run = {"python": platform.python_version(), "jax": jax.__version__,
           "flax": flax.__version__, "optax": optax.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
           "mesh": dict(mesh.shape), "git": git, "argv": sys.argv, "init": report,
           "peak_flops_measured": peak, "peak_flops_vendor": flops.vendor_peak(),
           "train_flops_per_token": flops.train_flops_per_token(mcfg, cfg.train.seq_len)}
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump(run, f, indent=2)


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {sig: signal.signal(sig, self._handle)
                     for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signum}: saving at the end of this step", file=sys.stderr)

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)
