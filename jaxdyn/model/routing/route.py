"""The routing primitive and the router pieces shared by MoD and DTF (docs/features/routing.md).

Dimension legend: B batch, T length, D width, k capacity (tokens routed per row), S cache slots.

`route` is the one static-shape top-k routing implementation (expert-choice routing of
Mixture-of-Depths, Raposo et al., 2024): every row selects exactly k tokens with `lax.top_k`,
the indices are sorted so positional causality is lower-triangular in gathered order, the block
runs on the k gathered tokens only (original positions for RoPE, selected-to-selected mask) and
the gated update is scattered back; unselected tokens pass through bit-exactly.

The causal (generation) mode reuses the same select → gather → block → scatter steps on the
tokens its per-token decisions pick (`jaxdyn.model.routing.causal`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import dtype_of, param_init

f32 = jnp.float32
# (x_BkD, pos_Bk, seg_Bk | None) -> y_BkD: an ordinary pre-norm decoder layer, residuals included.
BlockFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class RouteInfo(NamedTuple):
    idx_Bk: jax.Array  # sorted selected token indices per row
    valid_Bk: jax.Array  # False where a row had fewer than k valid tokens (slot contributes 0)
    mask_BT: jax.Array  # bool top-k mask (valid selected tokens only)


def lerp(x_BTD: jax.Array, y_BTD: jax.Array, w_BT: jax.Array) -> jax.Array:
    """x + w·(y − x), written as w·y + (1 − w)·x in fp32 so w = 1 gives y and w = 0 gives x
    bit-exactly (the γ = 1, gate ≡ 1 model then equals the dense one exactly)."""
    w = w_BT.astype(f32)[..., None]
    return (w * y_BTD.astype(f32) + (1.0 - w) * x_BTD.astype(f32)).astype(x_BTD.dtype)


def topk_indices(score_BT: jax.Array, valid_BT: jax.Array | None, k: int) -> jax.Array:
    """Per-row top-k over valid tokens (padding only fills rows with < k valid), sorted."""
    s_BT = score_BT.astype(f32)
    if valid_BT is not None:
        s_BT = jnp.where(valid_BT, s_BT, -jnp.inf)
    _, idx_Bk = lax.top_k(s_BT, k)
    return jnp.sort(idx_Bk, axis=-1)  # mandatory: unsorted indices leak the future


def _scatter_rows(base_BT: jax.Array, idx_Bk: jax.Array, val_Bk: jax.Array) -> jax.Array:
    """Per-row `base[b, idx[b]] = val[b]` (vmapped: rows can never mix)."""
    return jax.vmap(lambda b, i, v: b.at[i].set(v))(base_BT, idx_Bk, val_Bk)


def topk_mask(score_BT: jax.Array, valid_BT: jax.Array | None, k: int) -> jax.Array:
    """Bool [B,T] mask of the per-row top-k valid tokens (targets of the router losses)."""
    idx_Bk = topk_indices(score_BT, valid_BT, k)
    sel_Bk = jnp.ones(idx_Bk.shape, bool)
    if valid_BT is not None:
        sel_Bk = jnp.take_along_axis(valid_BT, idx_Bk, axis=1)
    return _scatter_rows(jnp.zeros(score_BT.shape, bool), idx_Bk, sel_Bk)


class Selection(NamedTuple):
    """k tokens picked per row, with what the block needs to know about them."""

    idx_Bk: jax.Array  # sorted selected token indices per row
    valid_Bk: jax.Array  # False where a row had fewer than k valid tokens (slot contributes 0)
    pos_Bk: jax.Array  # original positions (RoPE)
    seg_Bk: jax.Array | None  # segment ids, 0 for invalid slots; None: one document, no padding
    gate_Bk: jax.Array  # fp32 gate values


def select(score_BT: jax.Array, gate_BT: jax.Array, pos_BT: jax.Array,
           valid_BT: jax.Array | None, seg_BT: jax.Array | None, k: int) -> Selection:
    """The k top-scored valid tokens of each row (sorted) and their positions, segments, gates.

    `valid_BT=None` and `seg_BT=None` mean "no padding, one document per row": the gathered
    tokens then get `seg=None` so the block may use the `is_causal` fast path.
    """
    B = score_BT.shape[0]
    idx_Bk = topk_indices(score_BT, valid_BT, k)
    take = lambda a_BT: jnp.take_along_axis(a_BT, idx_Bk, axis=1)
    valid_Bk = jnp.ones((B, k), bool) if valid_BT is None else take(valid_BT)
    if seg_BT is not None:
        seg_Bk = jnp.where(valid_Bk, take(seg_BT), 0)  # seg 0 = never attended
    elif valid_BT is not None:
        seg_Bk = valid_Bk.astype(jnp.int32)
    else:
        seg_Bk = None
    return Selection(idx_Bk, valid_Bk, take(pos_BT), seg_Bk, take(gate_BT.astype(f32)))


def _onehot(idx_Bk: jax.Array, T: int) -> jax.Array:
    return idx_Bk[:, :, None] == jnp.arange(T)[None, None, :]


def gather(x_BTD: jax.Array, sel: Selection, dispatch: str = "gather") -> jax.Array:
    """The selected tokens [B, k, D] (`dispatch="onehot"`: a [B,k,T] einsum, same values)."""
    if dispatch == "onehot":  # [B,k,T] dispatch/combine einsums (TPU-friendly), same maths
        disp_BkT = _onehot(sel.idx_Bk, x_BTD.shape[1]).astype(x_BTD.dtype)
        return jnp.einsum("bkt,btd->bkd", disp_BkT, x_BTD, precision=lax.Precision.HIGHEST)
    return jnp.take_along_axis(x_BTD, sel.idx_Bk[:, :, None], axis=1)


def scatter(x_BTD: jax.Array, sel: Selection, x_BkD: jax.Array, y_BkD: jax.Array,
            dispatch: str = "gather") -> tuple[jax.Array, jax.Array]:
    """x with the gated updates `lerp(x_k, y_k, g·valid)` of the selected tokens put back
    (unselected tokens bit-exact), and the bool mask [B, T] of valid selected tokens."""
    B, T, _ = x_BTD.shape
    new_BkD = lerp(x_BkD, y_BkD, sel.gate_Bk * sel.valid_Bk)
    if dispatch == "onehot":
        hot_BkT = _onehot(sel.idx_Bk, T)
        sel_BT = jnp.any(hot_BkT & sel.valid_Bk[:, :, None], axis=1)
        comb_BTD = jnp.einsum("bkt,bkd->btd", hot_BkT.astype(x_BTD.dtype), new_BkD,
                              precision=lax.Precision.HIGHEST)
        return jnp.where(sel_BT[..., None], comb_BTD.astype(x_BTD.dtype), x_BTD), sel_BT
    y_BTD = _scatter_rows(x_BTD, sel.idx_Bk, new_BkD)
    return y_BTD, _scatter_rows(jnp.zeros((B, T), bool), sel.idx_Bk, sel.valid_Bk)


def route(x_BTD: jax.Array, score_BT: jax.Array, gate_BT: jax.Array, pos_BT: jax.Array,
          valid_BT: jax.Array | None, seg_BT: jax.Array | None, k: int, block: BlockFn,
          dispatch: str = "gather") -> tuple[jax.Array, RouteInfo]:
    """Run `block` on the k top-scored tokens of each row and scatter the gated update back
    (`select` → `gather` → block → `scatter`; the causal mode reuses the same three steps).

    Gradients reach `gate_BT` and the block; the top-k indices are not differentiated.
    """
    sel = select(score_BT, gate_BT, pos_BT, valid_BT, seg_BT, k)
    x_BkD = gather(x_BTD, sel, dispatch)
    y_BkD = block(x_BkD, sel.pos_Bk, sel.seg_Bk)
    y_BTD, sel_BT = scatter(x_BTD, sel, x_BkD, y_BkD, dispatch)
    return y_BTD, RouteInfo(sel.idx_Bk, sel.valid_Bk, sel_BT)


class CausalPredictor(nn.Module):
    """`Linear(D→D/2, no bias) → SiLU → Linear(D/2→1, no bias)` in fp32: the per-token causal
    router of MoD (Raposo et al., 2024, §3.5) used for generation. Returns logits c [B,T]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D = self.cfg.hidden_size
        pdt = dtype_of(self.cfg.param_dtype)
        w1 = self.param("fc1", param_init(("embed", "mlp")), (D, max(1, D // 2)), pdt)
        w2 = self.param("fc2", param_init(("mlp", "norm")), (max(1, D // 2), 1), pdt)
        h = jax.nn.silu(jnp.einsum("btd,dh->bth", x_BTD.astype(f32), w1.astype(f32)))
        return jnp.einsum("bth,ho->bto", h, w2.astype(f32))[..., 0]


def segment_starts(seg_BT: jax.Array) -> jax.Array:
    """Index of the first token of each token's contiguous segment run [B,T]."""
    B, T = seg_BT.shape
    t_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    change_BT = jnp.concatenate(
        [jnp.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
    return lax.cummax(jnp.where(change_BT, t_BT, 0), axis=1)


def moving_average(v_BT: jax.Array, window: int, seg_BT: jax.Array | None = None,
                   padding: str = "replicate") -> jax.Array:
    """Causal MA_W over the current and W−1 previous tokens of the same row/segment (§4.3).

    Via a cumulative sum S: MA_t = (S_t − S_{lo−1} + (W − n)·v_start) / W with
    lo = max(start, t−W+1) and n = t − lo + 1; "replicate" pads the left edge with the first
    value of the segment, "available" divides by n instead. W does not depend on T, so MA_t
    depends on tokens <= t only (KV-cached decoding reproduces it exactly).
    """
    B, T = v_BT.shape
    v = v_BT.astype(f32)
    t_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    start_BT = jnp.zeros((B, T), jnp.int32) if seg_BT is None else segment_starts(seg_BT)
    S_BT = jnp.cumsum(v, axis=1)
    lo_BT = jnp.maximum(start_BT, t_BT - window + 1)
    before_BT = jnp.take_along_axis(S_BT, jnp.maximum(lo_BT - 1, 0), axis=1)
    total_BT = S_BT - jnp.where(lo_BT > 0, before_BT, 0.0)
    n_BT = (t_BT - lo_BT + 1).astype(f32)
    if padding == "available":
        return total_BT / n_BT
    first_BT = jnp.take_along_axis(v, start_BT, axis=1)
    return (total_BT + (window - n_BT) * first_BT) / window


# ----------------------------------------------------------------------------- losses/metrics


def bce_with_logits(logit: jax.Array, target: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy from logits (stable form)."""
    x = logit.astype(f32)
    return jax.nn.softplus(x) - x * target.astype(f32)


def masked_mean(v_BT: jax.Array, w_BT: jax.Array) -> jax.Array:
    return jnp.sum(v_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def masked_stats(name: str, v_BT: jax.Array, w_BT: jax.Array,
                 which: tuple[str, ...] = ("mean", "std", "min", "max")) -> dict[str, jax.Array]:
    """mean/std/min/max of v over tokens with weight w > 0 (valid tokens)."""
    v = v_BT.astype(f32)
    mean = masked_mean(v, w_BT)
    out = {"mean": mean,
           "std": jnp.sqrt(masked_mean(jnp.square(v - mean), w_BT)),
           "min": jnp.min(jnp.where(w_BT > 0, v, jnp.inf), initial=jnp.inf),
           "max": jnp.max(jnp.where(w_BT > 0, v, -jnp.inf), initial=-jnp.inf)}
    return {f"{name}_{s}": out[s] for s in which}


def causal_router_terms(c_BT: jax.Array, m_BT: jax.Array,
                        w_BT: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BCE of the causal router c against the top-k mask m, plus acc/precision/recall."""
    m = m_BT.astype(f32)
    loss = masked_mean(bce_with_logits(c_BT, m), w_BT)
    pred = (c_BT >= 0).astype(f32)
    tp = jnp.sum(pred * m * w_BT)
    return loss, {
        "causal_loss": loss,
        "causal_acc": masked_mean((pred == m).astype(f32), w_BT),
        "causal_precision": tp / jnp.maximum(jnp.sum(pred * w_BT), 1.0),
        "causal_recall": tp / jnp.maximum(jnp.sum(m * w_BT), 1.0),
    }


def token_validity(ctx: dict[str, Any], B: int, T: int) -> tuple[jax.Array | None, jax.Array]:
    """(valid_BT or None when there is no padding info, fp32 weights [B,T] for means)."""
    seg_BT = ctx.get("seg_BT")
    if seg_BT is None:
        return None, jnp.ones((B, T), f32)
    valid_BT = seg_BT != 0
    return valid_BT, valid_BT.astype(f32)


def check_mode(routing_mode: str, cache: Any) -> None:
    if routing_mode not in ("topk", "causal"):
        raise ValueError(f"routing_mode={routing_mode!r}; supported: 'topk', 'causal'")
    if routing_mode == "topk" and cache is not None:
        raise ValueError("routing_mode='topk' is non-causal and cannot use a KV cache; "
                         "build the model with routing_mode='causal' for cached generation")
