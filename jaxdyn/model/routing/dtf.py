"""Dynamic Transformer (DTF / SDT) pair: a Decision layer and a Dynamic layer
(docs/features/routing.md).

Dimension legend: B batch, T length, D width, d_i PriorFFN width, k capacity, S cache slots.

Following the DTF thesis (Wieser, "Dynamic Transformers"), the Decision layer's actual update
Δ = Block_dec(H) − H is compared with "no change" (D_st = mean_D Δ²) and with a cheap
PriorFFN prediction Δ̂ (D_ch = mean_D (Δ − Δ̂)²). Expected-event CE = D_st − D_ch + log o_ce
and unexpected-event CU = D_st − m_cu·MA_W(sg D_st) give S_CE = σ(softplus(β_ce)·CE),
S_CU = σ(softplus(β_cu)·CU) and the gate G = S_CE OR S_CU. Each row routes its top-k tokens by G
through the Dynamic layer, whose update is scaled by G. A causal router P(sg(H_post)) learns
the top-k mask for generation.

Parameters: `dec/…`, `dyn/…` (DecoderLayer trees), `prior_norm/scale`, `prior/w1|w3|w2`,
`beta_ce`, `beta_cu`, `o_ce`, `m_cu` (fp32 scalars, inits: routing options `<name>_init`),
`predictor/fc1|fc2`. MA_W uses the fixed W = routing `ma_window` (a training config resolves it
to min(ma_window, train.seq_len)), never the call's T, so cached decoding equals the forward.
Aux losses (already weighted): `prior` (0.05), `causal_router` (0.01).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxdyn.model.block import DecoderLayer, init_layer_cache
from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import Norm, dtype_of, flat_dot, param_init
from jaxdyn.model.routing.causal import causal_routed, init_routed_cache
from jaxdyn.model.routing.options import DTF_SCALARS, prior_width, routed_k, routing_opts
from jaxdyn.model.routing.route import (
    CausalPredictor,
    causal_router_terms,
    check_mode,
    masked_mean,
    masked_stats,
    moving_average,
    route,
    token_validity,
    topk_mask,
)
from jaxdyn.model.units import UnitSpec, register_unit

f32 = jnp.float32
sg = lax.stop_gradient
PRIOR_NORM_EPS = 1e-6  # Qwen2's value, used for every family (docs/features/routing.md)


class PriorFFN(nn.Module):
    """Bias-free SwiGLU `W2(SiLU(W1 u) ⊙ W3 u)`, W1, W3: D→d_i, W2: d_i→D, init N(0, 0.02²)."""

    cfg: ModelConfig
    width: int  # d_i

    @nn.compact
    def __call__(self, u_BTD: jax.Array) -> jax.Array:
        D, di = self.cfg.hidden_size, self.width
        dt, pdt = dtype_of(self.cfg.dtype), dtype_of(self.cfg.param_dtype)
        w1 = self.param("w1", param_init(("embed", "mlp")), (D, di), pdt).astype(dt)
        w3 = self.param("w3", param_init(("embed", "mlp")), (D, di), pdt).astype(dt)
        w2 = self.param("w2", param_init(("mlp", "embed")), (di, D), pdt).astype(dt)
        u = u_BTD.astype(dt)
        h_BTF = jax.nn.silu(flat_dot(u, w1)) * flat_dot(u, w3)
        return flat_dot(h_BTF, w2)


def _cached_ma(dst_BT: jax.Array, cache: dict, ctx: dict[str, Any], window: int,
               padding: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MA of sg(D_st) over the cached history plus this chunk; returns (ma_BT, dst_BS, seg_BS).

    Slots after the chunk are ignored by causality of the cumulative-sum MA, so computing it over
    the whole [B, S] buffer and slicing the chunk equals the full-sequence forward.
    """
    B, T = dst_BT.shape
    index = ctx["index"]
    seg_BT = ctx.get("seg_BT")
    if seg_BT is None:  # continue the previous token's segment (1 at the start)
        prev_B1 = lax.dynamic_slice_in_dim(cache["seg"], jnp.maximum(index - 1, 0), 1, axis=1)
        seg_BT = jnp.broadcast_to(jnp.where(index > 0, prev_B1, 1), (B, T))
    dst_BS = lax.dynamic_update_slice_in_dim(cache["dst"], dst_BT.astype(f32), index, axis=1)
    seg_BS = lax.dynamic_update_slice_in_dim(cache["seg"], seg_BT.astype(jnp.int32), index,
                                             axis=1)
    ma_BS = moving_average(dst_BS, window, seg_BS, padding)
    return lax.dynamic_slice_in_dim(ma_BS, index, T, axis=1), dst_BS, seg_BS


class DTFUnit(nn.Module):
    """(decision, dynamic) pair; surface `(x, cache, ctx) -> (x, (cache, aux))`."""

    cfg: ModelConfig
    routing_mode: str = "topk"  # "topk" (training, teacher forcing) | "causal" (generation)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cache: dict | None, ctx: dict[str, Any]):
        cfg, opt = self.cfg, routing_opts(self.cfg)
        check_mode(self.routing_mode, cache)
        B, T, D = x_BTD.shape
        k = routed_k(opt, T)
        valid_BT, w_BT = token_validity(ctx, B, T)
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        # Decision layer and its update (the thesis's "posterior" H_post).
        h_BTD = x_BTD
        hp_BTD, (c_dec, _) = DecoderLayer(cfg, name="dec")(
            h_BTD, None if cache is None else cache["dec"], ctx)
        delta_BTD = hp_BTD.astype(f32) - h_BTD.astype(f32)
        prior_in = sg(h_BTD) if opt["prior_detach_input"] else h_BTD
        u_BTD = Norm("rms", PRIOR_NORM_EPS, dt, pdt, name="prior_norm")(prior_in)
        width = prior_width(D, opt["prior_width_factor"])
        dhat_BTD = PriorFFN(cfg, width, name="prior")(u_BTD).astype(f32)

        # Surprises, criteria and gate: fp32, not detached (LM → G → β, o_ce, m_cu, prior, dec).
        d_st_BT = jnp.mean(jnp.square(delta_BTD), axis=-1)
        d_ch_BT = jnp.mean(jnp.square(delta_BTD - dhat_BTD), axis=-1)
        scalar = {n: self.param(n, param_init((), nn.initializers.constant(opt[f"{n}_init"])),
                                (), f32)
                  for n in DTF_SCALARS}
        new_cache = None
        if cache is None:
            ma_BT = moving_average(sg(d_st_BT), opt["ma_window"], ctx.get("seg_BT"),
                                   opt["ma_padding"])
        else:
            ma_BT, dst_BS, seg_BS = _cached_ma(sg(d_st_BT), cache, ctx, opt["ma_window"],
                                               opt["ma_padding"])
            new_cache = {"dst": dst_BS, "seg": seg_BS}
        ce_BT = d_st_BT - d_ch_BT + jnp.log(scalar["o_ce"] + 1e-10)
        cu_BT = d_st_BT - scalar["m_cu"] * ma_BT
        beta_ce, beta_cu = jax.nn.softplus(scalar["beta_ce"]), jax.nn.softplus(scalar["beta_cu"])
        s_ce_BT = jax.nn.sigmoid(beta_ce * ce_BT)
        s_cu_BT = jax.nn.sigmoid(beta_cu * cu_BT)
        g_BT = s_ce_BT if opt["gate"] == "ce" else s_ce_BT + s_cu_BT - s_ce_BT * s_cu_BT

        router_in = hp_BTD if opt["causal_router_input"] == "post" else h_BTD
        c_BT = CausalPredictor(cfg, name="predictor")(sg(router_in))
        dyn = DecoderLayer(cfg, name="dyn")
        if self.routing_mode == "topk":
            def block(x_BkD, pos_Bk, seg_Bk):
                return dyn(x_BkD, None, {"pos_BT": pos_Bk, "seg_BT": seg_Bk, "index": None})[0]

            y_BTD, info = route(hp_BTD, g_BT, g_BT, ctx["pos_BT"], valid_BT, ctx.get("seg_BT"),
                                k, block, opt["dispatch"])
            m_BT = info.mask_BT
            sel_frac = masked_mean(m_BT.astype(f32), w_BT)
        else:
            d_BT = c_BT >= 0  # σ(c) >= 0.5
            self.sow("intermediates", "decision", d_BT)  # no-op unless the caller asks
            y_BTD, c_dyn = causal_routed(dyn, hp_BTD, g_BT, d_BT, valid_BT,
                                         None if cache is None else cache["dyn"], ctx, opt,
                                         self.is_initializing())
            if cache is not None:
                new_cache.update(dec=c_dec, dyn=c_dyn)
            m_BT = topk_mask(g_BT, valid_BT, k)  # targets for the (eval) metrics only
            sel_frac = masked_mean(d_BT.astype(f32), w_BT)

        self.sow("intermediates", "routing", {"gate": g_BT, "topk": m_BT})  # visualize
        self.sow("intermediates", "gate_terms", {  # the §4.3 terms, for reference tests
            "h": h_BTD, "h_post": hp_BTD, "dhat": dhat_BTD, "d_st": d_st_BT, "d_ch": d_ch_BT,
            "ma": ma_BT, "ce": ce_BT, "cu": cu_BT, "s_ce": s_ce_BT, "s_cu": s_cu_BT, "g": g_BT})

        # Prior loss: the prior predicts the Decision layer's update (input H not detached).
        if opt["prior_loss_form"] == "thesis":
            err_BTD = h_BTD.astype(f32) + dhat_BTD - sg(hp_BTD.astype(f32))
        else:
            err_BTD = dhat_BTD - sg(delta_BTD)
        prior_loss = masked_mean(jnp.mean(jnp.square(err_BTD), axis=-1), w_BT)
        causal_loss, causal_metrics = causal_router_terms(c_BT, sg(m_BT.astype(f32)), w_BT)
        metrics = {"selected_frac": sel_frac, "prior_loss": prior_loss,
                   **masked_stats("S_CE", s_ce_BT, w_BT), **masked_stats("S_CU", s_cu_BT, w_BT),
                   **masked_stats("G", g_BT, w_BT),
                   "D_st_mean": masked_mean(d_st_BT, w_BT),
                   "D_ch_mean": masked_mean(d_ch_BT, w_BT),
                   "beta_ce_raw": scalar["beta_ce"], "beta_ce_eff": beta_ce,
                   "beta_cu_raw": scalar["beta_cu"], "beta_cu_eff": beta_cu,
                   "o_ce": scalar["o_ce"], "m_cu": scalar["m_cu"], **causal_metrics}
        losses = {"prior": opt["prior_loss_weight"] * prior_loss,
                  "causal_router": opt["causal_loss_weight"] * causal_loss}
        return y_BTD, (new_cache, {"losses": losses, "metrics": metrics})


def init_dtf_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    """One pair's cache: layer caches plus the D_st history and segment ids for the causal MA."""
    return {"dec": init_layer_cache(cfg, batch, max_len, dtype),
            "dyn": init_routed_cache(cfg, batch, max_len, dtype),
            "dst": jnp.zeros((batch, max_len), f32),
            "seg": jnp.zeros((batch, max_len), jnp.int32)}


register_unit("dtf", UnitSpec(
    make=lambda cls, cfg, mode, **kw: cls(cfg, routing_mode=mode, **kw),
    module=DTFUnit, init_cache=init_dtf_cache))
