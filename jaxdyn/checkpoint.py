"""All orbax-checkpoint code lives here (JAX practices spec §7).

- `save_params`/`load_params`: parameter-only checkpoints (conversion output, exports).
- `Checkpointer`: training state + data-iterator state + run metadata per step, kept K at a
  time, async; orbax writes to a temporary folder and commits by rename, so a save killed
  half-way never hides the previous good step (`latest_step` skips incomplete ones).
- `load_model`: (ModelConfig, params, tokenizer folder) from a training workdir or an import.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdyn.model import ModelConfig


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


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `{state, data, meta}` per step."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """State onto the shapes/dtypes/shardings of `abstract_state` (any mesh)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out.state, out.data, out.meta

    def restore_params(self, step: int) -> Any:
        """Only the model parameters of a step (for inference), without optimizer targets."""
        out = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
        return out.state["params"]["params"]

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def load_model(path: str) -> tuple[ModelConfig, Any, str]:
    """(cfg, params, tokenizer_dir) from a `conversion import` folder or a training workdir."""
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} is neither a training workdir nor an imported "
                                "checkpoint (no model_config.json); import a Hugging Face "
                                "folder with `python -m conversion import HF_DIR OUT_DIR`")
    cfg = ModelConfig.load(cfg_path)
    if os.path.isdir(os.path.join(path, "params")):
        return cfg, load_params(os.path.join(path, "params")), path
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint under {path}/checkpoints")
    params = ckpt.restore_params(step)
    ckpt.close()
    tok_dir = os.path.join(path, "tokenizer")
    return cfg, params, tok_dir if os.path.isdir(tok_dir) else path
