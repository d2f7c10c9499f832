"""The one place that maps logical axis names to mesh axes (JAX practices spec §1-§2).

Layers only name logical axes (`embed`, `heads`, ...); this module turns them into
`NamedSharding`s for a `("data", "fsdp", "tensor")` mesh. Axes are `AxisType.Auto` on purpose:
with Explicit axes, Linen's logical constraints become assertions.

A dimension that the mesh axis does not divide (e.g. 2 KV heads on tensor=4) is replicated
instead of failing, so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes); the single rules table of the project.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),  # routed blocks gather/scatter along it, so it stays whole per device
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 meaning "the remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {named()}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes "
                             f"{named()}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {named()} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available; use -1 for one axis")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (replicate those dimensions)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return P(*[a if dim % _axis_size(mesh, a) == 0 else None
               for dim, a in zip(shape, entries, strict=True)])


def logical_to_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of boxed (logically partitioned) values or ShapeDtypeStructs."""
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, RULES)
    # Read the raw values: `nn.unbox` would add sharding constraints under an active mesh.
    shapes = jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, boxed_tree,
                          is_leaf=lambda b: isinstance(b, nn.Partitioned))
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(x.shape, s, mesh)),
                        mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def param_shardings(cfg, mesh: Mesh) -> Any:
    """Shardings of a model's parameters, derived from their logical axes without allocating."""
    from jaxdyn.model import abstract_params  # local import: sharding must not pull the model
    return logical_to_sharding(abstract_params(cfg), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over data x fsdp along the batch axis, sequence whole."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's own slice of the batch (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def shard_params(params: Any, shardings: Any) -> Any:
    """Place host/device parameters onto their shardings (each device gets only its slice)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        x.shape, s, lambda idx: np.asarray(x[idx])) if isinstance(x, np.ndarray)
        else jax.device_put(x, s), params, shardings)


def rules_context():
    """Context that makes the rules visible to `nn.with_logical_constraint` while tracing."""
    return nn.logical_axis_rules(RULES)
