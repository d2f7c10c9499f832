"""Set-up pieces of the trainer: mesh, tokenizer, batches across processes, run files,
fail-fast switches and preemption. Each raises a named error before anything is compiled or
written to the workdir. Run files are written atomically and never through a symlink out of
the workdir (`jaxdyn.train.workdir.safe_write`).
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
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdyn import distributed, sharding
from jaxdyn.config import paths
from jaxdyn.config.errors import ConfigValueError
from jaxdyn.data import DataConfig, load_documents
from jaxdyn.data.tokenizer import make_tokenizer
from jaxdyn.model import ModelConfig
from jaxdyn.train import flops
from jaxdyn.train.workdir import check_inside, safe_write


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
        raise ConfigValueError(
            f"micro-batch train.batch_size/train.grad_accum={rows} is not divisible by the "
            f"data x fsdp mesh size {split}; change train.batch_size or cfg.mesh")
    return mesh


def apply_debug_switches(cfg: mlc.ConfigDict) -> None:
    """docs/training.md: opt-in NaN debugging and strict rank promotion; assert threefry."""
    if cfg.debug.debug_nans:
        jax.config.update("jax_debug_nans", True)
    if cfg.debug.strict_rank_promotion:
        jax.config.update("jax_numpy_rank_promotion", "raise")
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("jax_threefry_partitionable must be on (sharding-independent RNG)")


def make_tokenizer_for(cfg: mlc.ConfigDict, workdir: str):
    """The configured tokenizer; a BPE one is trained on the train split once per workdir."""
    directory = check_inside(workdir, "tokenizer")
    make = lambda texts: make_tokenizer(cfg.tokenizer.kind, directory=directory, texts=texts,
                                        vocab_size=cfg.tokenizer.vocab_size,
                                        checkpoint_dir=cfg.init.checkpoint or None)
    if cfg.tokenizer.kind != "bpe" or paths.isdir(directory):
        return make(None)
    # BPE is trained once, by process 0; the others load its folder (a shared workdir).
    if distributed.is_main_process():
        tok = make(load_documents(DataConfig(**cfg.data.to_dict()), "train"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdyn: tokenizer trained")
    return tok if distributed.is_main_process() else make(None)


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
    next epoch boundary after the furthest process (the iterator's `restart_after` when it
    has one: the grain pipeline's); returns the note to log."""
    states = saved.get("processes", [saved])
    if len(states) == jax.process_count():
        return it.restore(states[jax.process_index()]) or []
    if hasattr(it, "restart_after"):
        return it.restart_after(states)
    epoch = max(int(st["epoch"]) for st in states) + 1
    it.restore({**it.state(), "epoch": epoch, "row": 0, "index": 0})
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


# ----------------------------------------------------------------------------- run files


def write_run_files(workdir: str, cfg: mlc.ConfigDict, mcfg: ModelConfig, mesh, tok,
                    report: list[str], peak: float) -> None:
    """config.json (resolved), model_config.json, run.json (versions, devices, git), tokenizer.
    The trainer writes them once the run is set up (on resume: after the restore), so a rerun
    refused earlier leaves the workdir's record of its run as it was."""
    if not distributed.is_main_process():
        return
    paths.makedirs(workdir)
    safe_write(workdir, "config.json", cfg.to_json_best_effort(indent=2))
    safe_write(workdir, "model_config.json", json.dumps(mcfg.to_dict(), indent=2, sort_keys=True))
    tok.save(check_inside(workdir, "tokenizer"))
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
           "peak_flops_measured": peak, "peak_flops_vendor": flops.vendor_peak(mcfg.dtype),
           "train_flops_per_token": flops.train_flops_per_token(mcfg, cfg.train.seq_len)}
    safe_write(workdir, "run.json", json.dumps(run, indent=2))


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

    def agreed(self) -> bool:
        """True on every process once any process got the signal (a collective when several
        processes run): they all save the same step and leave together, instead of one
        waiting in a collective for a peer that already left."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([int(self.requested)], np.int32))
        return bool(np.max(flags))

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)
