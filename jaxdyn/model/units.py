"""The scan-unit registry: what `nn.scan` repeats for each architecture, and its hooks.

A *scan unit* is the homogeneous body of the decoder stack: one dense layer for
`arch="dense"`, an n-layer superblock for MoD, a (decision, dynamic) pair for DTF. Units share
one surface, `(x, cache, ctx) -> (x, (cache, aux))`, and register themselves here
(`register_unit`), so the decoder, the cache and generation never special-case an architecture.

Extensions of the trunk reach inside the stack through `with_hooks(unit_cls)`: the same unit
(same parameter names) that also applies an adapter after its body and keeps the output of one
unit (the tap that extra heads read). See `jaxdyn.model.decoder` for the extension points.

Dimension legend: B batch, T length, D width, U units.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.block import DecoderLayer, init_layer_cache
from jaxdyn.model.config import ConfigError, ModelConfig
from jaxdyn.model.routing.options import layers_per_unit

# Variable collections stacked along the scan / vmap axis: the parameters and the LoRA
# factors that mirror them (`jaxdyn.model.lora`).
STACKED = {"params": 0, "lora": 0}


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """How an architecture's scan unit is built and what its cache looks like."""

    make: Callable[..., nn.Module]  # (cls, cfg, routing_mode, **module kwargs) -> unit
    module: type[nn.Module]
    init_cache: Callable[[ModelConfig, int, int, Any], Any]  # one unit's cache


UNITS: dict[str, UnitSpec] = {
    "dense": UnitSpec(make=lambda cls, cfg, mode, **kw: cls(cfg, **kw), module=DecoderLayer,
                      init_cache=init_layer_cache),
}


def register_unit(arch: str, spec: UnitSpec) -> None:
    UNITS[arch] = spec


def unit_spec(cfg: ModelConfig) -> UnitSpec:
    spec = UNITS[cfg.arch]
    n = layers_per_unit(cfg)
    if cfg.num_layers % n:
        raise ConfigError(f"arch={cfg.arch!r} needs num_layers divisible by {n}, "
                          f"got {cfg.num_layers}")
    return spec


def num_units(cfg: ModelConfig) -> int:
    """U: how many scan units the decoder stacks (L / layers per unit)."""
    unit_spec(cfg)  # validates the layer count
    return cfg.num_layers // layers_per_unit(cfg)


def remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.dots_with_no_batch_dims_saveable,
        "minimal": cp.save_only_these_names("qkv", "attn_out"),
        "offload": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("qkv", "attn_out"),
            offload_src="device", offload_dst="pinned_host"),
    }[name]


@functools.cache
def with_hooks(unit_cls: type[nn.Module]) -> type[nn.Module]:
    """`unit_cls` (same parameters) with the trunk's per-unit hooks.

    Surface: `((x, tapped), cache, ctx, (i, adapter_xs)) -> ((x, tapped), (cache, aux))`.
    After the unit body, `adapter.after_unit(x, adapter_xs, ctx["cond"])` updates x when the
    adapter is set and conditioning is present; `tapped` keeps the output of unit `tap`.
    """

    class Hooked(unit_cls):
        adapter: Any = None
        tap: int = -1

        def __call__(self, carry, cache, ctx, xs):
            x_BTD, tapped_BTD = carry
            i, adapter_xs = xs
            y_BTD, (cache, aux) = super().__call__(x_BTD, cache, ctx)
            if self.adapter is not None and ctx.get("cond") is not None:
                y_BTD = self.adapter.after_unit(y_BTD, adapter_xs, ctx["cond"])
            if self.tap >= 0:
                tapped_BTD = jnp.where(i == self.tap, y_BTD, tapped_BTD)
            return (y_BTD, tapped_BTD), (cache, aux)

    Hooked.__name__ = Hooked.__qualname__ = f"Hooked{unit_cls.__name__}"
    return Hooked


def flatten_aux(aux: dict[str, Any]) -> dict[str, float]:
    """Per-unit aux metrics [U] -> `router/layer_{i}/name` plus the mean `router/name`.

    Each MoD/DTF scan unit holds one routed layer, so `layer_{i}` is the i-th routed layer
    (model layer 2i+1); the weighted aux losses are logged as their mean, `router/loss_name`.
    """
    out = {}
    for name, v in aux.get("metrics", {}).items():
        v = np.asarray(v, np.float64).reshape(-1)
        for i, x in enumerate(v):
            out[f"router/layer_{i}/{name}"] = float(x)
        out[f"router/{name}"] = float(v.mean())
    for name, v in aux.get("losses", {}).items():
        out[f"router/loss_{name}"] = float(np.mean(np.asarray(v, np.float64)))
    return out
