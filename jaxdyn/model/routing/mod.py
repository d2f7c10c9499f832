"""Mixture-of-Depths superblock (Raposo et al., 2024; docs/features/routing.md).

Dimension legend: B batch, T length, D width, k capacity, S cache slots, K kv heads, Hd head dim.

Scan unit j holds n = `route_every` layers, nj … nj+n−1; the one at `route_offset` is routed,
the others are dense (default n = 2, offset 1: (dense 2j, routed 2j+1), the paper's
every-other-layer MoD; n = 1 routes every layer). The routed layer's input h (the raw residual
stream) is scored by a linear router r = h·w (no bias, no norm, w ~ N(0, 0.02²)); each row sends
its top-k tokens through the layer and scales their update by the gate σ(r) ("sigmoid",
default), r ("raw", the paper) or 1 ("ones"). A causal predictor P(sg(h)) learns the top-k mask
for generation (`routing_mode="causal"`).

Parameters: `dense/…` (`dense_1/…`, … for n > 2), `routed/…` (DecoderLayer trees), `router/w`
[D], `predictor/fc1|fc2`; `routing_options.unit_slots` names each layer's position.
Aux losses (already weighted): `router_bce` (0.01), `router_z` (1e-4), `causal_router` (0.01).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdyn.model.block import DecoderLayer, init_layer_cache
from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import dtype_of, param_init
from jaxdyn.model.routing.causal import causal_routed, init_routed_cache
from jaxdyn.model.routing.options import routed_k, routing_opts, unit_slots
from jaxdyn.model.routing.route import (
    CausalPredictor,
    bce_with_logits,
    causal_router_terms,
    check_mode,
    masked_mean,
    masked_stats,
    route,
    token_validity,
    topk_mask,
)
from jaxdyn.model.units import UnitSpec, register_unit

f32 = jnp.float32


class Router(nn.Module):
    """Linear token scorer r_BT = x·w in fp32 (MoD: no bias, no norm)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        w_D = self.param("w", param_init(("norm",)), (self.cfg.hidden_size,),
                         dtype_of(self.cfg.param_dtype))
        return jnp.einsum("btd,d->bt", x_BTD.astype(f32), w_D.astype(f32))


class MoDUnit(nn.Module):
    """n-layer superblock with one routed layer; surface `(x, cache, ctx) -> (x, (cache, aux))`."""

    cfg: ModelConfig
    routing_mode: str = "topk"  # "topk" (training, teacher forcing) | "causal" (generation)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cache: dict | None, ctx: dict[str, Any]):
        cfg, opt = self.cfg, routing_opts(self.cfg)
        check_mode(self.routing_mode, cache)
        B, T, _ = x_BTD.shape
        k = routed_k(opt, T)
        valid_BT, w_BT = token_validity(ctx, B, T)

        slots = unit_slots(cfg)
        o = slots["routed"]
        by_pos = {p: name for name, p in slots.items()}
        new_cache = {}

        def dense(h_BTD, p):
            name = by_pos[p]
            h_BTD, (new_cache[name], _) = DecoderLayer(cfg, name=name)(
                h_BTD, None if cache is None else cache[name], ctx)
            return h_BTD

        h_BTD = x_BTD
        for p in range(o):
            h_BTD = dense(h_BTD, p)
        routed = DecoderLayer(cfg, name="routed")
        r_BT = Router(cfg, name="router")(h_BTD)
        gate_BT = {"sigmoid": jax.nn.sigmoid, "raw": lambda r: r,
                   "ones": jnp.ones_like}[opt["gate"]](r_BT)
        c_BT = CausalPredictor(cfg, name="predictor")(jax.lax.stop_gradient(h_BTD))

        if self.routing_mode == "topk":
            def block(x_BkD, pos_Bk, seg_Bk):
                sub = {"pos_BT": pos_Bk, "seg_BT": seg_Bk, "index": None}
                return routed(x_BkD, None, sub)[0]

            y_BTD, info = route(h_BTD, r_BT, gate_BT, ctx["pos_BT"], valid_BT,
                                ctx.get("seg_BT"), k, block, opt["dispatch"])
            m_BT, c_routed = info.mask_BT, None
            sel_frac = masked_mean(m_BT.astype(f32), w_BT)
        else:
            d_BT = c_BT >= 0  # σ(c) >= 0.5
            self.sow("intermediates", "decision", d_BT)  # no-op unless the caller asks
            y_BTD, c_routed = causal_routed(routed, h_BTD, gate_BT, d_BT, valid_BT,
                                            None if cache is None else cache["routed"], ctx, opt,
                                            self.is_initializing())
            m_BT = topk_mask(r_BT, valid_BT, k)  # targets for the (eval) metrics only
            sel_frac = masked_mean(d_BT.astype(f32), w_BT)

        self.sow("intermediates", "routing", {"gate": gate_BT, "topk": m_BT})  # visualize
        m = jax.lax.stop_gradient(m_BT.astype(f32))
        aux_bce = masked_mean(bce_with_logits(r_BT, m), w_BT)
        z_loss = masked_mean(jnp.square(r_BT), w_BT)
        causal_loss, causal_metrics = causal_router_terms(c_BT, m, w_BT)
        metrics = {"selected_frac": sel_frac, "aux_bce": aux_bce, "z_loss": z_loss,
                   **masked_stats("router_logit", r_BT, w_BT, ("mean", "std")),
                   **masked_stats("gate", gate_BT, w_BT, ("mean", "std")),
                   **causal_metrics}
        losses = {"router_bce": opt["router_bce_weight"] * aux_bce,
                  "router_z": opt["z_loss_weight"] * z_loss,
                  "causal_router": opt["causal_loss_weight"] * causal_loss}
        for p in range(o + 1, len(slots)):
            y_BTD = dense(y_BTD, p)
        new_cache = None if cache is None else {**new_cache, "routed": c_routed}
        return y_BTD, (new_cache, {"losses": losses, "metrics": metrics})


def init_mod_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    """One superblock's cache: ordinary dense caches and a routed one (compact when
    `cache_fraction` < 1, `jaxdyn.model.routing.causal`)."""
    return {name: (init_routed_cache if name == "routed" else init_layer_cache)(
        cfg, batch, max_len, dtype) for name in unit_slots(cfg)}


register_unit("mod", UnitSpec(
    make=lambda cls, cfg, mode, **kw: cls(cfg, routing_mode=mode, **kw),
    module=MoDUnit, init_cache=init_mod_cache))
