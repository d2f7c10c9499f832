"""Blockwise online-softmax attention in plain JAX: O(T·block) memory, forward and backward.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, q/k a query/key block (bq, bk rows),
nq/nk the number of query/key blocks.

The maths is FlashAttention's (Dao et al., 2022; FlashAttention-2, Dao, 2023): the softmax of a
query row is accumulated over key blocks with a running max m, a running sum l and an
unnormalised output acc, rescaled whenever m grows. Only the output and the per-row
log-sum-exp L = m + log l are kept for the backward pass (`jax.custom_vjp`), which recomputes
every tile's probabilities p = exp(s − L) block by block; autodiff through a plain scan would
keep every tile's probabilities instead and lose the memory bound.

The mask is one rule for every caller (docs/attention.md): query q sees key k iff
`k_pos <= q_pos and q_seg == k_seg and k_seg != 0`. Tiles with no visible key (above the causal
diagonal, between two documents, all padding) are skipped with `lax.cond`. Query rows that see
no key at all come out as zeros (and pass zero gradient).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


class MaskSpec(NamedTuple):
    """Per query and per key: a position (order) and a segment id; see the module docstring."""

    q_pos_BT: jax.Array
    q_seg_BT: jax.Array
    k_pos_BS: jax.Array
    k_seg_BS: jax.Array


def visible(spec: MaskSpec) -> jax.Array:
    """The dense [B, T, S] boolean mask of the rule (reference path and tests only)."""
    return ((spec.k_pos_BS[:, None, :] <= spec.q_pos_BT[:, :, None])
            & (spec.q_seg_BT[:, :, None] == spec.k_seg_BS[:, None, :])
            & (spec.k_seg_BS[:, None, :] != 0))


def _pad_to(x: jax.Array, size: int, axis: int = 1, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, n: int) -> jax.Array:
    """[B, n·b, ...] -> [n, B, b, ...] (the leading axis is scanned over)."""
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, n, L // n, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
    """[n, B, b, ...] -> [B, n·b, ...]."""
    n, B, b = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * b, *x.shape[3:])


def _scan(f, init, xs):
    """`lax.scan`, or one direct call when there is a single step (no while loop to compile)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], y)
    return lax.scan(f, init, xs)


def _tile_mask(qp_Bq, qs_Bq, kp_Bk, ks_Bk) -> jax.Array:
    """[B, q, k] visibility of one tile."""
    return ((kp_Bk[:, None, :] <= qp_Bq[:, :, None]) & (qs_Bq[:, :, None] == ks_Bk[:, None, :])
            & (ks_Bk[:, None, :] != 0))


def _logits(q_BqKGH, k_BkKH, scale: float) -> jax.Array:
    """fp32 scaled logits [B, K, G, q, k]."""
    return jnp.einsum("bqkgh,bskh->bkgqs", q_BqKGH, k_BkKH, preferred_element_type=f32) * scale


def _forward(q_BTNH, k_BSKH, v_BSKH, spec: MaskSpec, scale: float, bq: int, bk: int):
    """(out [B,T,N,H] in q's dtype, lse [B,K,G,T] fp32; -inf where a row sees nothing)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk
    q = _blocks(_pad_to(q_BTNH, Tp).reshape(B, Tp, K, G, H), nq)
    qp, qs = _blocks(_pad_to(spec.q_pos_BT, Tp), nq), _blocks(_pad_to(spec.q_seg_BT, Tp), nq)
    k, v = _blocks(_pad_to(k_BSKH, Sp), nk), _blocks(_pad_to(v_BSKH, Sp), nk)
    kp, ks = _blocks(_pad_to(spec.k_pos_BS, Sp), nk), _blocks(_pad_to(spec.k_seg_BS, Sp), nk)

    def one_query_block(args):
        q_BqKGH, qp_Bq, qs_Bq = args

        def step(carry, kblock):
            k_BkKH, v_BkKH, kp_Bk, ks_Bk = kblock
            mask_Bqk = _tile_mask(qp_Bq, qs_Bq, kp_Bk, ks_Bk)

            def compute(carry):
                m_BKGq, l_BKGq, acc_BKGqH = carry
                s = jnp.where(mask_Bqk[:, None, None], _logits(q_BqKGH, k_BkKH, scale), -jnp.inf)
                m_new = jnp.maximum(m_BKGq, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m_BKGq - m_safe)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_BkKH.dtype), v_BkKH,
                                preferred_element_type=f32)
                l_new = alpha * l_BKGq + jnp.sum(p, axis=-1)
                return m_new, l_new, alpha[..., None] * acc_BKGqH + pv

            if nk == 1:  # one tile: no loop, no skip test (compiles like a dense kernel)
                return compute(carry), None
            return lax.cond(jnp.any(mask_Bqk), compute, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), -jnp.inf, f32), jnp.zeros((B, K, G, bq), f32),
                jnp.zeros((B, K, G, bq, H), f32))
        (m, total, acc), _ = _scan(step, init, (k, v, kp, ks))
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        out_BKGqH = jnp.where(seen[..., None], acc / total[..., None], 0.0)
        lse_BKGq = jnp.where(seen, m + jnp.log(total), -jnp.inf)
        out_BqNH = jnp.einsum("bkgqh->bqkgh", out_BKGqH).reshape(B, bq, N, H)
        return out_BqNH.astype(q_BTNH.dtype), lse_BKGq

    if nq == 1:
        out, lse = jax.tree.map(lambda x: x[None], one_query_block((q[0], qp[0], qs[0])))
    else:
        out, lse = lax.map(one_query_block, (q, qp, qs))  # [nq,B,bq,N,H], [nq,B,K,G,bq]
    out_BTNH = _unblock(out)[:, :T]
    lse_BKGT = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Tp)[..., :T]
    return out_BTNH, lse_BKGT


def _backward(q_BTNH, k_BSKH, v_BSKH, spec: MaskSpec, out_BTNH, lse_BKGT, dout_BTNH,
              scale: float, bq: int, bk: int):
    """dq, dk, dv by recomputing each visible tile from q, k and L (FlashAttention-2 order:
    outer loop over key blocks accumulating dk/dv, dq accumulated in place)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk
    # D_i = sum_h dO_ih · O_ih (the softmax-Jacobian term), fp32 [B, K, G, T].
    delta = jnp.einsum("btkgh,btkgh->bkgt", dout_BTNH.reshape(B, T, K, G, H).astype(f32),
                       out_BTNH.reshape(B, T, K, G, H).astype(f32))
    q = _blocks(_pad_to(q_BTNH, Tp).reshape(B, Tp, K, G, H), nq)
    do = _blocks(_pad_to(dout_BTNH, Tp).reshape(B, Tp, K, G, H), nq)
    # Pad L with 0 (not -inf): padded rows are masked anyway and exp(s − 0) never overflows there.
    lse = jnp.moveaxis(_pad_to(jnp.where(jnp.isneginf(lse_BKGT), 0.0, lse_BKGT), Tp, axis=3)
                       .reshape(B, K, G, nq, bq), 3, 0)
    dlt = jnp.moveaxis(_pad_to(delta, Tp, axis=3).reshape(B, K, G, nq, bq), 3, 0)
    qp, qs = _blocks(_pad_to(spec.q_pos_BT, Tp), nq), _blocks(_pad_to(spec.q_seg_BT, Tp), nq)
    k, v = _blocks(_pad_to(k_BSKH, Sp), nk), _blocks(_pad_to(v_BSKH, Sp), nk)
    kp, ks = _blocks(_pad_to(spec.k_pos_BS, Sp), nk), _blocks(_pad_to(spec.k_seg_BS, Sp), nk)

    def one_key_block(dq_nBqKGH, kblock):
        k_BkKH, v_BkKH, kp_Bk, ks_Bk = kblock

        def step(carry, i):
            dq_all, dk_BkKH, dv_BkKH = carry
            mask_Bqk = _tile_mask(qp[i], qs[i], kp_Bk, ks_Bk)

            def compute(carry):
                dq_all, dk_BkKH, dv_BkKH = carry
                q_BqKGH, do_BqKGH = q[i], do[i]
                s = _logits(q_BqKGH, k_BkKH, scale)
                p = jnp.where(mask_Bqk[:, None, None], jnp.exp(s - lse[i][..., None]), 0.0)
                dv_BkKH = dv_BkKH + jnp.einsum("bkgqs,bqkgh->bskh", p, do_BqKGH,
                                               preferred_element_type=f32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_BqKGH, v_BkKH, preferred_element_type=f32)
                ds = p * (dp - dlt[i][..., None]) * scale
                dk_BkKH = dk_BkKH + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_BqKGH,
                                               preferred_element_type=f32)
                dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_BkKH, preferred_element_type=f32)
                return dq_all.at[i].add(dq_i), dk_BkKH, dv_BkKH

            if nq == 1:
                return compute(carry), None
            return lax.cond(jnp.any(mask_Bqk), compute, lambda c: c, carry), None

        init = (dq_nBqKGH, jnp.zeros((B, bk, K, H), f32), jnp.zeros((B, bk, K, H), f32))
        (dq_nBqKGH, dk_BkKH, dv_BkKH), _ = _scan(step, init, jnp.arange(nq))
        return dq_nBqKGH, (dk_BkKH, dv_BkKH)

    dq0 = jnp.zeros((nq, B, bq, K, G, H), f32)
    dq, (dk, dv) = _scan(one_key_block, dq0, (k, v, kp, ks))
    dq_BTNH = _unblock(dq).reshape(B, Tp, N, H)[:, :T]
    return (dq_BTNH.astype(q_BTNH.dtype), _unblock(dk)[:, :S].astype(k_BSKH.dtype),
            _unblock(dv)[:, :S].astype(v_BSKH.dtype))


# Inside an outer `lax.scan` (scanned layers) JAX's partial evaluation splits this forward's
# loops into a saved and a recomputed part and would stack tile-sized values (the per-tile masks
# and probabilities, O(T²)) as residuals. As a checkpoint that saves nothing, only its inputs
# cross that boundary.
_forward_saving_inputs = jax.checkpoint(_forward, static_argnums=(4, 5, 6),
                                        policy=jax.checkpoint_policies.nothing_saveable)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BTNH, k_BSKH, v_BSKH, spec: MaskSpec, scale: float, bq: int, bk: int):
    return _forward(q_BTNH, k_BSKH, v_BSKH, spec, scale, bq, bk)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, spec, scale, bq, bk):
    out_BTNH, lse_BKGT = _forward_saving_inputs(q_BTNH, k_BSKH, v_BSKH, spec, scale, bq, bk)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, spec, out_BTNH, lse_BKGT)


def _flash_bwd(scale, bq, bk, res, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, spec, out_BTNH, lse_BKGT = res
    dq, dk, dv = _backward(q_BTNH, k_BSKH, v_BSKH, spec, out_BTNH, lse_BKGT, dout_BTNH,
                           scale, bq, bk)
    return dq, dk, dv, None  # positions and segment ids are integers: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                        spec: MaskSpec, scale: float, block: int = 512) -> jax.Array:
    """Masked GQA softmax attention, exact up to fp32 rounding, in O(T·block) memory.

    Query head n uses kv head n // (N/K). `block` is clipped to T (queries) and S (keys);
    lengths that are not a multiple of it are padded internally (padding is never attended).
    """
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    bq, bk = max(1, min(block, T)), max(1, min(block, S))
    spec = MaskSpec(*(x.astype(jnp.int32) for x in spec))
    return _flash(q_BTNH, k_BSKH, v_BSKH, spec, float(scale), bq, bk)
