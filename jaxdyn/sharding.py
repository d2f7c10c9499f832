"""The one place that maps logical axis names to mesh axes (docs/scale-out.md-§2).

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
from jax.experimental import mesh_utils, multihost_utils
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


def _resolve(sizes: list[int], n: int, what: str) -> tuple[int, ...]:
    """Replace the one -1 in `sizes` by what is left of `n` devices; check the product."""
    named = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {named}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices{what} are not divisible by the fixed mesh axes {named}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {named} needs {math.prod(sizes)} devices, {n} are available"
                         f"{what}; use -1 for one axis")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None,
              dcn: Sequence[int] = (1, 1, 1)) -> Mesh:
    """A (data, fsdp, tensor) mesh with `AxisType.Auto` axes; one size may be -1 ("the rest").

    `dcn` = (data, fsdp, tensor) counts of slices (multi-slice TPU) or else processes (e.g.
    GPU hosts, CPU) along each axis: the sizes above are then per
    slice (ICI) and each axis spans ici × dcn devices, the slow links carrying the outer part
    (`mesh_utils.create_hybrid_device_mesh`). Keep model-parallel axes on ICI: dcn=(n, 1, 1).
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = tuple(int(d) for d in dcn)
    if len(dcn) != 3 or min(dcn) < 1:
        raise ValueError(f"mesh dcn sizes must be 3 positive ints (data, fsdp, tensor), got {dcn}")
    auto = (AxisType.Auto,) * 3  # Explicit would turn logical constraints into assertions
    if dcn == (1, 1, 1):
        shape = _resolve([data, fsdp, tensor], len(devices), "")
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    granules = math.prod(dcn)
    if len(devices) % granules:
        raise ValueError(f"{len(devices)} devices cannot form {granules} equal slices "
                         f"(dcn={dict(zip(MESH_AXES, dcn, strict=True))})")
    ici = _resolve([data, fsdp, tensor], len(devices) // granules, " per slice")
    slices = {getattr(d, "slice_index", None) for d in devices}
    by_process = None in slices or len(slices) != granules  # GPU hosts, CPU: one per process
    try:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                   process_is_granule=by_process)
    except ValueError as e:
        unit = "processes" if by_process else "slices"
        raise ValueError(f"cannot build an ICI {ici} x DCN {dcn} mesh: {e}; the product of the "
                         f"dcn sizes must equal the number of {unit}") from e
    return Mesh(arr, MESH_AXES, axis_types=auto)


def mesh_devices(data: int, fsdp: int, tensor: int, dcn: Sequence[int] = (1, 1, 1)
                 ) -> list[jax.Device]:
    """The devices a mesh of these sizes uses: all when one size is -1, else the first
    data·fsdp·tensor (times the dcn counts), as the trainer's `mesh` block documents."""
    if -1 in (data, fsdp, tensor):
        return list(jax.devices())
    return list(jax.devices())[:math.prod((data, fsdp, tensor)) * math.prod(dcn)]


def mesh_from_config(m: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from a config's `mesh` block (data, fsdp, tensor and optional dcn_*)."""
    dcn = tuple(int(m.get(f"dcn_{a}", 1)) for a in MESH_AXES)
    return make_mesh(m.data, m.fsdp, m.tensor, devices=devices, dcn=dcn)


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


def batch_multiple(mesh: Mesh) -> int:
    """How many ways the `batch` rule splits a batch on `mesh` (rows are padded to a multiple)."""
    return _axis_size(mesh, dict(RULES)["batch"])


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a tree of arrays is placed on (their `NamedSharding`s), or None (host arrays,
    single-device placement)."""
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            return sh.mesh
    return None


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array every process holds whole (each device gets its
    slice; multi-host safe). Device arrays are resharded with `device_put`."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on the host, also where it spans processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def rules_context():
    """Context that makes the rules visible to `nn.with_logical_constraint` while tracing."""
    return nn.logical_axis_rules(RULES)
