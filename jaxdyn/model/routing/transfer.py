"""Build MoD / DTF parameters from a pretrained dense jaxdyn model (docs/features/routing.md).

Dimension legend: L dense layers, n layers per unit, U = L/n routed units, D width.

| target (unit j)                              | source            |
|----------------------------------------------|-------------------|
| `embed`, `final_norm`, `unembed`             | the same tensors  |
| MoD sub-layer at position p (`dense…`, `routed`) | layer n·j + p (default n = 2: 2j / 2j+1) |
| DTF `dec/…` (Block_dec) / `dyn/…` (Block_dyn) | layer 2j / 2j+1   |
| router, predictor, prior(+norm), β, o_ce, m_cu | fresh init       |

`routing_options.unit_slots` is the one table of sub-layer positions (shared with the export).

Every pretrained tensor is consumed exactly once and every non-new target parameter assigned,
else `TransferError` lists the offenders. Either layout (scanned `layers/…` [L, …] or unrolled
`layers_{i}/…`) is accepted and produced; `stack_layers`/`unstack_layers` convert between them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.decoder import init_params
from jaxdyn.model.routing.options import unit_slots

ROUTED_ARCHS = ("mod", "dtf")
# Per routed arch: sub-trees of a unit that are new (fresh init).
NEW = {"mod": ("router", "predictor"),
       "dtf": ("prior_norm", "prior", "beta_ce", "beta_cu", "o_ce", "m_cu", "predictor")}
# Config fields that may differ between the dense source and the routed target.
FREE_FIELDS = {"arch", "routing", "scan_layers", "remat_policy", "attention_impl",
               "attention_block", "dtype", "param_dtype"}
_LAYER = re.compile(r"layers_(\d+)$")


class TransferError(ValueError):
    """Dense → routed transfer would drop, duplicate or leave out parameters."""


@dataclasses.dataclass
class TransferReport:
    loaded: list[str]  # target paths filled from the dense checkpoint
    sources: dict[str, str]  # target path -> dense path it came from
    new: list[str]  # target paths freshly initialised

    def __str__(self) -> str:
        kinds = sorted({p.split("/", 1)[1] if _LAYER.match(p.split("/")[0]) else p
                        for p in self.new})
        return (f"loaded {len(self.loaded)} tensors; new parameters ({len(self.new)} tensors): "
                f"{', '.join(kinds)}")


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned `layers/…` [U, …] → unrolled `layers_{i}/…`; unrolled trees pass unchanged."""
    if "layers" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Unrolled `layers_{i}/…` → scanned `layers/…` [U, …]; scanned trees pass unchanged."""
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER.match(k)))
    if not idx:
        return dict(params)
    if idx != list(range(len(idx))):
        raise TransferError(f"unrolled layers are not numbered 0..{len(idx) - 1}: {idx}")
    out = {k: v for k, v in params.items() if not _LAYER.match(k)}
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"layers_{i}"] for i in idx])
    return out


def _check_configs(dense_cfg: ModelConfig, routed_cfg: ModelConfig) -> None:
    if dense_cfg.arch != "dense":
        raise TransferError(f"source must be a dense model, got arch={dense_cfg.arch!r}")
    if routed_cfg.arch not in ROUTED_ARCHS:
        raise TransferError(f"target arch={routed_cfg.arch!r}; supported: {ROUTED_ARCHS}")
    a, b = dense_cfg.to_dict(), routed_cfg.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k not in FREE_FIELDS and a[k] != b[k]}
    if diff:
        raise TransferError(f"dense and routed configs differ in {diff} (dense, routed)")


def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def dense_to_routed(dense_cfg: ModelConfig, dense_params: dict[str, Any],
                    routed_cfg: ModelConfig, rng: jax.Array) -> tuple[dict, TransferReport]:
    """Routed parameters (layout of `routed_cfg.scan_layers`) and a report of what was loaded.

    Dense tensors are cast to the routed `param_dtype`; new parameters get their documented
    init (docs/features/routing.md).
    """
    _check_configs(dense_cfg, routed_cfg)
    arch = routed_cfg.arch
    slots = unit_slots(routed_cfg)
    n = len(slots)
    src = traverse_util.flatten_dict(unstack_layers(dense_params))
    n_src_layers = sum(1 for k in {p[0] for p in src} if _LAYER.match(k))
    if n_src_layers != dense_cfg.num_layers:
        raise TransferError(f"dense params hold {n_src_layers} layers, config says "
                            f"{dense_cfg.num_layers}")
    fresh = init_params(routed_cfg.replace(scan_layers=False), rng)
    tgt = traverse_util.flatten_dict(fresh)

    out, used, sources = {}, Counter(), {}
    new, unassigned, mismatched = [], [], []
    for path, init_val in tgt.items():
        m = _LAYER.match(path[0])
        if m and path[1] in NEW[arch]:
            out[path] = init_val
            new.append(_join(path))
            continue
        if m and path[1] in slots:
            j = int(m.group(1))
            s_path = (f"layers_{n * j + slots[path[1]]}",) + path[2:]
        else:
            s_path = path
        if s_path not in src:
            unassigned.append(_join(path))
            continue
        val = src[s_path]
        used[s_path] += 1
        if tuple(val.shape) != tuple(init_val.shape):
            mismatched.append(f"{_join(path)} {tuple(init_val.shape)} <- {_join(s_path)} "
                              f"{tuple(val.shape)}")
            continue
        out[path] = jnp.asarray(val).astype(init_val.dtype)
        sources[_join(path)] = _join(s_path)

    unused = sorted(_join(p) for p in src if used[p] == 0)
    twice = sorted(_join(p) for p, n in used.items() if n > 1)
    problems = [(unassigned, "target parameters with no dense source"),
                (unused, "dense tensors not consumed"),
                (twice, "dense tensors consumed more than once"),
                (mismatched, "shape mismatches")]
    msg = "; ".join(f"{what}: {items}" for items, what in problems if items)
    if msg:
        raise TransferError(f"dense -> {arch} transfer failed: {msg}")

    params = traverse_util.unflatten_dict(out)
    if routed_cfg.scan_layers:
        params = stack_layers(params)
    report = TransferReport(loaded=sorted(sources), sources=sources, new=sorted(new))
    logging.getLogger(__name__).info("dense -> %s transfer: %s", arch, report)
    return params, report


def tree_paths(params: dict[str, Any]) -> list[str]:
    """Flat `a/b/c` paths of a parameter tree (handy for LR-group regexes and reports)."""
    return sorted(_join(p) for p in traverse_util.flatten_dict(params))


def same_tree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Exact equality of two parameter trees (structure, shapes and values)."""
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
