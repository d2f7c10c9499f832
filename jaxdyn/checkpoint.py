"""All orbax-checkpoint code lives here (docs/training.md).

- `save_params` / `load_params` / `params_shapes`: parameter-only checkpoints (conversion output,
  exports) and their shapes without reading any array.
- `Checkpointer`: per step `{state, data, meta}` (training state, data-iterator state, run
  metadata), newest K kept, async. orbax writes `<step>.orbax-checkpoint-tmp` and commits by
  rename, so a save killed half-way never hides the previous step (`latest_step` skips it).
- `load_model`: (ModelConfig, params, tokenizer folder) from an import or a training workdir.
Nothing here pickles: arrays go to tensorstore, the rest to JSON.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdyn.data.tokenizer import load_tokenizer
from jaxdyn.model import ModelConfig
from jaxdyn.model.lora import merge_lora

STATE, DATA, META = "state", "data", "meta"


def _quiet_orbax() -> None:
    # Reading one item of a step folder logs a harmless "metadata file does not exist".
    logging.getLogger("absl").setLevel(max(logging.getLogger("absl").level, logging.ERROR))


def save_params(path: str, params: Any) -> None:
    """Write a params pytree atomically (orbax commits by rename) and wait for it."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
        ckptr.wait_until_finished()


def load_params(path: str, target: Any | None = None) -> Any:
    """Read params; `target` (arrays or ShapeDtypeStructs with shardings) fixes layout/dtype."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return ckptr.restore(path, abstract)


def params_shapes(path: str) -> Any:
    """Tree of `jax.ShapeDtypeStruct` of a parameter checkpoint, reading no array data."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.abspath(path)).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `{state, data, meta}` per step."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        """Newest committed step (uncommitted `*.orbax-checkpoint-tmp` folders are ignored)."""
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self.mngr.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
            META: ocp.args.JsonSave(meta)}), force=True)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them got a preemption notice (multi-host)."""
        return bool(self.mngr.reached_preemption(step))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """State onto the shapes/dtypes/shardings of `abstract_state` (arrays or
        ShapeDtypeStructs, any mesh), plus the iterator state and the metadata."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.mngr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore(),
            META: ocp.args.JsonRestore()}))
        return out[STATE], out[DATA], out[META]

    def restore_meta(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(**{
            META: ocp.args.JsonRestore()}))[META]

    def _state_tree(self, step: int) -> Any:
        _quiet_orbax()
        item = os.path.join(self.directory, str(step), STATE)
        return item, ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree

    def params_shapes(self, step: int) -> Any:
        """ShapeDtypeStructs of a step's model params, reading no array data."""
        tree = self._state_tree(step)[1]["params"]["params"]
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)

    def restore_params(self, step: int, target: Any | None = None) -> tuple[Any, Any]:
        """(model params, LoRA factors) of a step, skipping the optimizer state (never read).

        `target`: ShapeDtypeStructs with shardings for the model params (each device reads
        only its slice; LoRA factors are then replicated on the same mesh); default: all on
        the first device."""
        item, tree = self._state_tree(step)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if target is not None:
            leaf = jax.tree.leaves(target)[0]
            rest = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
        struct = lambda m, sh, dt=None: jax.ShapeDtypeStruct(tuple(m.shape), dt or m.dtype,
                                                              sharding=sh)
        restore = jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)
        if target is None:
            restore["params"] = jax.tree.map(lambda m: struct(m, dev), tree["params"])
        else:
            restore["params"] = {k: jax.tree.map(lambda m: struct(m, rest), v)
                                 for k, v in tree["params"].items() if k != "params"}
            restore["params"]["params"] = jax.tree.map(
                lambda m, t: struct(m, t.sharding, t.dtype), tree["params"]["params"], target)
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)
                            if isinstance(x, jax.ShapeDtypeStruct) else ocp.RestoreArgs(),
                            restore)
        ckptr = ocp.PyTreeCheckpointer()
        out = ckptr.restore(item, args=ocp.args.PyTreeRestore(item=restore, restore_args=args))
        return out["params"]["params"], out["params"].get("lora") or {}

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def _workdir_ckpt(path: str) -> tuple[Checkpointer, int]:
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no finished checkpoint under {path}/checkpoints")
    return ckpt, step


def model_params_shapes(path: str) -> Any:
    """Param ShapeDtypeStructs of an import folder or a training workdir, reading no arrays."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return params_shapes(os.path.join(path, "params"))
    ckpt, step = _workdir_ckpt(path)
    try:
        return ckpt.params_shapes(step)
    finally:
        ckpt.close()


def load_model(path: str, target: Any | None = None) -> tuple[ModelConfig, Any, str]:
    """(cfg, params, tokenizer_dir) from a `conversion import` folder (`model_config.json` +
    `params/`) or a training workdir (its latest checkpoint; LoRA factors merged in).
    `target`: sharded ShapeDtypeStructs (see `load_params`) to read params shard by shard."""
    path = os.path.abspath(path)
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} is neither a training workdir nor an imported "
                                "checkpoint (no model_config.json); import a Hugging Face "
                                "folder with `python -m conversion import HF_DIR OUT_DIR`")
    cfg = ModelConfig.load(cfg_path)
    if os.path.isdir(os.path.join(path, "params")):
        return cfg, load_params(os.path.join(path, "params"), target), path
    ckpt, step = _workdir_ckpt(path)
    try:
        params, lora = ckpt.restore_params(step, target)
        meta = ckpt.restore_meta(step)
    finally:
        ckpt.close()
    if lora:
        params = merge_lora(params, lora, meta["lora_alpha"], meta["lora_rank"])
    tok_dir = os.path.join(path, "tokenizer")
    return cfg, params, tok_dir if os.path.isdir(tok_dir) else path


def load_for_inference(path: str) -> tuple[ModelConfig, Any, Any]:
    """(cfg, params, tokenizer) of an import folder or a training workdir. Hugging Face
    folders are converted by the command lines (`jaxdyn.cli`), or once with
    `python -m conversion import HF_DIR OUT_DIR`."""
    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
            os.path.join(path, "model_config.json")):
        raise FileNotFoundError(f"{path!r} looks like a Hugging Face folder; convert it with "
                                "`python -m conversion import HF_DIR OUT_DIR` (the jaxdyn "
                                "commands do this on the fly)")
    cfg, params, tok_dir = load_model(path)
    return cfg, params, load_tokenizer(tok_dir)
