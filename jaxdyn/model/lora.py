"""LoRA (Hu et al., 2021) as a low-rank path inside the projections: y = x·W + s·(x·A)·B.

The factors live in their own variable collection, `lora`, which mirrors the module paths of
the kernels it adapts (`lora/layers/attn/q/{a,b}`, stacked like the parameters by
`nn.scan`/`nn.vmap`), and `Proj` adds the low-rank path when its factors are present. Nothing
is merged during training; `merge_lora` folds the factors into the kernels once, for export
and inference. A: [in, r] ~ N(0, 1/in), B: [r, out] = 0 at init, so training starts at W;
s = alpha / r is applied to B by `scaled` before `apply`.

Dimension legend: r rank; `in`/`out` are the flattened input/output dims of a kernel
(e.g. q: D -> N·Hd, o: N·Hd -> D); leading stacked axes ([U], [n-1, …]) come first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdyn.config.errors import ConfigError

# Projection module names a LoRA may target, and how many leading kernel dims are inputs.
INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def init_lora(params: Any, targets: Sequence[str], rank: int, rng: jax.Array) -> dict:
    """Factors for every kernel whose module name is in `targets`, as a nested tree that
    mirrors the parameter paths (`{"layers": {"attn": {"q": {"a", "b"}}}}`)."""
    bad = sorted(set(targets) - set(INPUT_DIMS))
    if bad:
        raise ConfigError(f"train.lora.targets {bad} are not projections; choose from "
                          f"{sorted(INPUT_DIMS)}")
    out: dict = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(rng, max(len(flat), 1))
    for (path, w), k in zip(flat, keys, strict=True):
        names = [_key(p) for p in path]
        if len(names) < 2 or names[-1] != "kernel" or names[-2] not in targets:
            continue
        n_in = INPUT_DIMS[names[-2]]
        n_out = 2 if names[-2] in ("q", "k", "v") else 1
        lead = w.shape[:w.ndim - n_in - n_out]  # stacked axes: [U], [n-1], [n-1, depth]
        d_in = math.prod(w.shape[len(lead):len(lead) + n_in])
        d_out = math.prod(w.shape[len(lead) + n_in:])
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node["a"] = jax.random.normal(k, (*lead, d_in, rank), jnp.float32) / math.sqrt(d_in)
        node["b"] = jnp.zeros((*lead, rank, d_out), jnp.float32)
    if not out:
        raise ConfigError(f"train.lora.targets={list(targets)} matched no kernel; use module "
                          f"names such as {', '.join(INPUT_DIMS)}")
    return out


def scaled(lora: dict, alpha: float, rank: int) -> dict:
    """The factors as the model applies them: B multiplied by s = alpha / rank."""
    s = alpha / rank
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * s if _key(p[-1]) == "b" else x, lora)


def from_flat(lora: dict) -> dict:
    """Factors stored by releases before 0.2 (`{"layers.attn.q.kernel": {"a", "b"}}`) as the
    nested tree of today."""
    if not lora or all(isinstance(v, dict) and "a" not in v for v in lora.values()):
        return lora
    out: dict = {}
    for key, ab in lora.items():
        node = out
        for name in key.split(".")[:-1]:  # drop the trailing "kernel"
            node = node.setdefault(name, {})
        node.update(ab)
    return out


def merge_lora(params: Any, lora: dict, alpha: float, rank: int) -> Any:
    """Base params with every LoRA update folded into its kernel (export, inference)."""
    if not lora:
        return params
    lora = from_flat(lora)
    s = alpha / rank

    def merge(path, w):
        node = lora
        for name in [_key(p) for p in path][:-1]:
            if not isinstance(node, dict) or name not in node:
                return w
            node = node[name]
        if _key(path[-1]) != "kernel" or "a" not in node:
            return w
        ab = jnp.matmul(node["a"], node["b"])
        return (w + s * ab.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)
