"""Set-up pieces of `jaxdyn.train.loop`: mesh, tokenizer, data, init-checkpoint checks and loading,
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

from jaxdyn import distributed, sharding
from jaxdyn.checkpoint import load_params, params_shapes
from jaxdyn.config import loader as configlib
from jaxdyn.model import ModelConfig, dense_to_routed, init_params, stack_layers, unstack_layers
from jaxdyn.model.routing.transfer import FREE_FIELDS
from jaxdyn.train import flops


class CheckpointMismatchError(ValueError):
    """`init.checkpoint` holds a model that does not fit the configured one."""


def make_mesh(cfg: mlc.ConfigDict) -> jax.sharding.Mesh:
    """cfg.mesh over all devices when an axis is -1, else over the first data·fsdp·tensor
    (times the dcn_* slice counts for a multi-slice / multi-process hybrid mesh)."""
    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    n = math.prod(sizes) * math.prod(m.get(f"dcn_{a}", 1) for a in sharding.MESH_AXES)
    devices = jax.devices() if -1 in sizes else jax.devices()[:n]
    mesh = sharding.mesh_from_config(m, devices=devices)
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
    from jaxdyn.data.tokenizer import make_tokenizer

    directory = os.path.join(workdir, "tokenizer")
    make = lambda texts: make_tokenizer(cfg.tokenizer.kind, directory=directory, texts=texts,
                                        vocab_size=cfg.tokenizer.vocab_size,
                                        checkpoint_dir=cfg.init.checkpoint or None)
    if cfg.tokenizer.kind != "bpe" or os.path.isdir(directory):
        return make(None)
    # BPE is trained once, by process 0; the others load its folder (a shared workdir).
    if distributed.is_main_process():
        tok = make(load_documents(DataConfig(**cfg.data.to_dict()), "train"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdyn: tokenizer trained")
    return tok if distributed.is_main_process() else make(None)


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
    rows, i = micro // n_proc, jax.process_index()  # each process: its rows of a global batch
    evals = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
             for batch in make_eval_batches(dc, tok, seq_len=cfg.train.seq_len,
                                            batch_size=micro, max_batches=cfg.eval.batches)]
    return it, evals


# ----------------------------------------------------------------------------- multi-process


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective; one process: [obj])."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
    padded = np.zeros(n, np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def gather_data_state(state: dict) -> dict:
    """The iterator states of all processes for one checkpoint (orbax's JSON item is written
    by process 0 only): one process -> its state; several -> {"processes": [...]}."""
    states = _allgather_json(state)
    return states[0] if len(states) == 1 else {"processes": states}


def restore_data_state(it, saved: dict) -> list[str]:
    """Put this process's iterator where the checkpoint left it. With another process count
    positions cannot be mapped (documents are split by process), so the data restarts at the
    next epoch boundary after the furthest process; returns the note to log."""
    states = saved.get("processes", [saved])
    if len(states) == jax.process_count():
        it.restore(states[jax.process_index()])
        return []
    epoch = max(int(st["epoch"]) for st in states) + 1
    it.restore({**it.state(), "epoch": epoch, "doc": 0, "offset": 0})
    return [f"data: checkpoint from {len(states)} processes resumed on "
            f"{jax.process_count()}; data order restarts at epoch {epoch}"]


def host_params(tree: Any) -> Any:
    """numpy copy of a (possibly cross-host sharded) tree on every process (collective)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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
    """(cfg, param shapes, loader) of an import folder or a training workdir. `loader(target)`
    reads the params; a target tree of sharded ShapeDtypeStructs makes orbax read each
    device's slice straight into its shard (no full copy on any device)."""
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"init.checkpoint {path!r} has no model_config.json; import a "
                                "Hugging Face folder with `python -m conversion import`")
    icfg = ModelConfig.load(cfg_path)
    if os.path.isdir(os.path.join(path, "params")):
        return icfg, params_shapes(os.path.join(path, "params")), \
            lambda target=None: load_params(os.path.join(path, "params"), target)
    from jaxdyn.checkpoint import load_model, model_params_shapes

    return icfg, model_params_shapes(path), \
        lambda target=None: load_model(path, target=target)[1]


def _sharded_target(shapes: Any, dtype, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s),
                        shapes, shardings)


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


def initial_params(cfg: mlc.ConfigDict, rng: jax.Array,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[Any, list[str]]:
    """(params, report): random, or loaded from `init.checkpoint` (same architecture, either
    layer layout) or transferred from a dense import into a routed model.

    With `mesh`, params are created in their rules-table shardings: random init runs under
    `jit(out_shardings=...)` and checkpoints are restored by orbax onto sharded
    ShapeDtypeStruct targets, so no device ever holds a full copy of a sharded tensor.
    `mesh` defaults to the one made current by `jax.set_mesh` (none: plain host/device 0)."""
    mcfg = configlib.model_config(cfg)
    if mesh is None and not jax.sharding.get_mesh().empty:
        mesh = jax.sharding.get_mesh()
    p_sh = sharding.param_shardings(mcfg, mesh) if mesh is not None else None
    if not cfg.init.checkpoint:
        if mesh is None:
            return init_params(mcfg, rng), ["init: random (no init.checkpoint)"]
        with jax.set_mesh(mesh):
            params = jax.jit(lambda r: init_params(mcfg, r), out_shardings=p_sh)(rng)
        return params, ["init: random (no init.checkpoint)"]
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
    if mesh is None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), relayout(load()))
    elif shape_of(shapes) == shape_of(want):  # same layer layout: read shards in place
        params = load(_sharded_target(shapes, dtype, p_sh))
    else:  # other layout: read in the stored layout's shardings, relayout on the devices
        stored = mcfg.replace(scan_layers=not mcfg.scan_layers)
        raw = load(_sharded_target(shapes, dtype, sharding.param_shardings(stored, mesh)))
        with jax.set_mesh(mesh):
            params = jax.jit(relayout, out_shardings=p_sh)(raw)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return params, [f"init from {cfg.init.checkpoint}: loaded {len(jax.tree.leaves(params))} "
                    f"tensors ({n / 1e6:.2f}M params); new parameters: none"]


def dense_transfer_source(cfg: mlc.ConfigDict) -> tuple[ModelConfig, Any] | None:
    """(dense config, dense params) when this run transfers a dense `init.checkpoint` into a
    routed model, else None. Reads the checkpoint once more (the trainer logs the dense
    first-batch loss from it, routing spec §5, and frees it again)."""
    mcfg = configlib.model_config(cfg)
    if not cfg.init.checkpoint or mcfg.arch == "dense":
        return None
    icfg, _, load = _source(cfg.init.checkpoint)
    if icfg.arch != "dense":
        return None
    return icfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(icfg.param_dtype)), load())


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
