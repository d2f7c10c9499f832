"""All orbax-checkpoint code lives here (JAX practices spec §7).

`save_params`/`load_params` handle parameter-only checkpoints (conversion output, exports);
the training-state manager builds on the same module.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
