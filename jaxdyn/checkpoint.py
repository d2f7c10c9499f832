"""All orbax-checkpoint code lives here (docs/training.md).

- `save_params` / `load_params` / `params_shapes`: parameter-only checkpoints (conversion output,
  exports) and their shapes without reading any array.
- `Checkpointer`: per step `{state, data, meta}` (training state, data-iterator state, run
  metadata), newest K kept, async. orbax writes `<step>.orbax-checkpoint-tmp` and commits by
  rename, so a save killed half-way never hides the previous step (`latest_step` skips it).
  A committed step can still be damaged afterwards (a truncated or deleted file, a disk
  error): `restore_latest` restores the newest step that reads back whole, sets the damaged
  newer ones aside as `damaged-<step>-<time>` (never deleted; orbax ignores the name) and says
  so; if no step reads back, nothing is moved and `CheckpointDamagedError` lists why.
- `load_model`: (ModelConfig, params, tokenizer folder) from an import or a training workdir
  (the newest step whose parameters read back; a damaged newer one is skipped with a warning);
  with a `mesh`, every tensor is read shard by shard straight into its rules-table sharding
  (`stored_shardings`, `sharded_target`), as training does with `init.checkpoint`.
Nothing here pickles: arrays go to tensorstore, the rest to JSON.
Every path may be local or on an object store (`gs://…`, `s3://…`; `jaxdyn.config.paths`):
orbax reads and writes those through epath and tensorstore's gcs/s3 drivers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdyn import sharding
from jaxdyn.config import paths
from jaxdyn.data.tokenizer import load_tokenizer
from jaxdyn.model import ModelConfig, param_shardings
from jaxdyn.model.lora import merge_lora

STATE, DATA, META = "state", "data", "meta"


class CheckpointDamagedError(ValueError):
    """No committed checkpoint step of a folder can be read back."""


def _quiet_failed_read() -> None:
    """After a failed restore, reads still in flight finish on orbax's closed asyncio loop and
    Python prints one "Event loop is closed" traceback each (unraisable, harmless). Drop exactly
    those; every other unraisable exception still goes to the previous hook."""
    prev = sys.unraisablehook
    if getattr(prev, "_jaxdyn", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is "
                "closed"):
            prev(u)

    hook._jaxdyn = True
    sys.unraisablehook = hook


def _why(e: BaseException) -> str:
    """One line for a failed restore (orbax/tensorstore messages run over many lines)."""
    _quiet_failed_read()
    first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
    return f"{type(e).__name__}: {first[:160]}"


def _quiet_orbax() -> None:
    # Reading one item of a step folder logs a harmless "metadata file does not exist".
    logging.getLogger("absl").setLevel(max(logging.getLogger("absl").level, logging.ERROR))


def save_params(path: str, params: Any) -> None:
    """Write a params pytree atomically (orbax commits by rename) and wait for it."""
    path = paths.absolute(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
        ckptr.wait_until_finished()


def load_params(path: str, target: Any | None = None) -> Any:
    """Read params; `target` (arrays or ShapeDtypeStructs with shardings) fixes layout/dtype."""
    path = paths.absolute(path)
    if not paths.isdir(path):
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return ckptr.restore(path, abstract)


def params_shapes(path: str) -> Any:
    """Tree of `jax.ShapeDtypeStruct` of a parameter checkpoint, reading no array data."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(paths.absolute(path)).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `{state, data, meta}` per step."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = paths.absolute(directory)
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

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict, list[str]]:
        """(step, state, data_state, meta, notes) of the newest step that restores whole.

        Newer committed steps that fail to restore (truncated/missing files, missing metadata,
        an empty step folder) are set aside as `damaged-<step>-<UTC time>` in this folder, only
        once an older step restored (so a failure that is not damage, e.g. another model's
        shapes, moves nothing); `notes` says what happened. No step restores ->
        `CheckpointDamagedError` naming each step and its error; nothing is moved."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
                failed.append((step, _why(e)))
                continue
            notes = [self._set_aside(s, why) for s, why in failed]
            if failed:
                self.mngr.reload()
                notes.append(f"resumed from step {step}, the newest intact checkpoint")
            return step, state, data, meta, notes
        raise CheckpointDamagedError(self._none_intact(failed))

    def _none_intact(self, failed: list[tuple[int, str]]) -> str:
        steps = "; ".join(f"step {s}: {why}" for s, why in failed) or "no committed step"
        return (f"no checkpoint in {self.directory} can be restored ({steps}); if the model or "
                "config changed, use a new workdir; if the files are damaged, move the folder "
                "aside to start over (nothing was moved or deleted)")

    def _set_aside(self, step: int, why: str) -> str:
        """Rename a damaged step folder out of orbax's view (process 0; never deleted)."""
        src = paths.join(self.directory, str(step))
        dst = paths.join(self.directory,
                         f"damaged-{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
        if jax.process_index() == 0:  # an object store copies, then deletes, the objects
            paths.move_tree(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxdyn: damaged step {step} set aside")
        msg = f"warning: checkpoint step {step} is damaged ({why}); kept aside as {dst}"
        print(msg, file=sys.stderr)
        return msg

    def restore_meta(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(**{
            META: ocp.args.JsonRestore()}))[META]

    def _state_tree(self, step: int) -> Any:
        _quiet_orbax()
        item = paths.join(self.directory, str(step), STATE)
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


def _workdir_ckpt(path: str) -> Checkpointer:
    ckpt = Checkpointer(paths.join(path, "checkpoints"), async_save=False)
    if ckpt.latest_step() is None:
        ckpt.close()
        raise FileNotFoundError(f"no finished checkpoint under {path}/checkpoints; train first "
                                f"(python -m jaxdyn.train ... --workdir {path})")
    return ckpt


def _newest_readable(ckpt: Checkpointer, read) -> tuple[int, Any]:
    """(step, read(step)) for the newest step `read` succeeds on; older steps are tried when
    a newer one is damaged, with a warning (read-only: nothing is moved)."""
    failed: list[tuple[int, str]] = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            out = read(step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            failed.append((step, _why(e)))
            continue
        for s, why in failed:
            print(f"warning: checkpoint step {s} in {ckpt.directory} is damaged ({why}); "
                  f"using step {step}", file=sys.stderr)
        return step, out
    raise CheckpointDamagedError(ckpt._none_intact(failed))


def _model_config(path: str) -> ModelConfig:
    """The model config of an import folder or a training workdir."""
    cfg_path = paths.join(path, "model_config.json")
    if not paths.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} is neither a training workdir nor an imported "
                                "checkpoint (no model_config.json); import a Hugging Face "
                                "folder with `python -m conversion import HF_DIR OUT_DIR`")
    return ModelConfig.from_dict(json.loads(paths.read_bytes(cfg_path)))


def model_params_shapes(path: str) -> Any:
    """Param ShapeDtypeStructs of an import folder or a training workdir, reading no arrays."""
    path = paths.absolute(path)
    if paths.isdir(paths.join(path, "params")):
        return params_shapes(paths.join(path, "params"))
    ckpt = _workdir_ckpt(path)
    try:
        return _newest_readable(ckpt, ckpt.params_shapes)[1]
    finally:
        ckpt.close()


def sharded_target(shapes: Any, shardings: Any, dtype: Any = None) -> Any:
    """ShapeDtypeStructs carrying `shardings` (and `dtype`, default each stored one): an orbax
    restore onto them reads each device's slice straight into its shard, no full copy."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s),
                        shapes, shardings)


def stored_shardings(cfg: ModelConfig, shapes: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a stored parameter tree of `cfg`'s model: the rules table's
    (`param_shardings`) for the model's own tensors, replicated for anything else (feature
    subtrees such as multi-token heads or adapters); dimensions a mesh axis does not divide
    stay whole (`sharding.fit_spec`)."""
    rules = {jax.tree_util.keystr(k): s for k, s in
             jax.tree_util.tree_flatten_with_path(param_shardings(cfg, mesh))[0]}

    def one(keypath, x):
        spec = getattr(rules.get(jax.tree_util.keystr(keypath)), "spec", None)
        if spec is None or len(spec) > len(x.shape):
            spec = jax.sharding.PartitionSpec()
        return jax.sharding.NamedSharding(mesh, sharding.fit_spec(x.shape, spec, mesh))

    return jax.tree_util.tree_map_with_path(one, shapes)


def load_model(path: str, target: Any | None = None, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[ModelConfig, Any, str]:
    """(cfg, params, tokenizer_dir) from a `conversion import` folder (`model_config.json` +
    `params/`) or a training workdir (its latest checkpoint; LoRA factors merged in).
    `target`: sharded ShapeDtypeStructs (see `load_params`) to read params shard by shard;
    `mesh` (without `target`): the stored tensors in their `stored_shardings` on it."""
    path = paths.absolute(path)
    if mesh is not None and target is None:
        cfg = _model_config(path)
        shapes = model_params_shapes(path)
        shardings = stored_shardings(cfg, shapes, mesh)
        cfg, params, tok_dir = load_model(path, sharded_target(shapes, shardings))
        return cfg, jax.device_put(params, shardings), tok_dir  # LoRA-merged: re-placed
    cfg = _model_config(path)
    if paths.isdir(paths.join(path, "params")):
        return cfg, load_params(paths.join(path, "params"), target), path
    ckpt = _workdir_ckpt(path)
    try:
        _, (params, lora, meta) = _newest_readable(
            ckpt, lambda s: (*ckpt.restore_params(s, target), ckpt.restore_meta(s)))
    finally:
        ckpt.close()
    if lora:
        params = merge_lora(params, lora, meta["lora_alpha"], meta["lora_rank"])
    tok_dir = paths.join(path, "tokenizer")
    return cfg, params, tok_dir if paths.isdir(tok_dir) else path


def load_for_inference(path: str, mesh: jax.sharding.Mesh | None = None
                       ) -> tuple[ModelConfig, Any, Any]:
    """(cfg, params, tokenizer) of an import folder or a training workdir, the params sharded
    over `mesh` by the rules table when one is given. Hugging Face folders are converted by
    the command lines (`jaxdyn.cli`), or once with `python -m conversion import HF_DIR OUT_DIR`."""
    if paths.exists(paths.join(path, "config.json")) and not paths.exists(
            paths.join(path, "model_config.json")):
        raise FileNotFoundError(f"{path!r} looks like a Hugging Face folder; convert it with "
                                "`python -m conversion import HF_DIR OUT_DIR` (the jaxdyn "
                                "commands do this on the fly)")
    cfg, params, tok_dir = load_model(path, mesh=mesh)
    return cfg, params, load_tokenizer(tok_dir)
