"""Causal (generation) mode of a routed layer: compute on the selected tokens, compact caches
(docs/features/routing.md §7).

Dimension legend: B batch, T length, D width, k bucket capacity, S cache slots, K kv heads,
Hd head dim.

A causal router decides per token (d = 1: process). The selected tokens (d = 1 and valid) are
gathered into a static capacity *bucket* with the routing primitive (`route.select`,
`route.gather`, `route.scatter`), the layer runs on the bucket only and the gated update is
scattered back. The number of selected tokens is data-dependent, so the bucket is chosen inside
jit: `nn.switch` over the capacities {0, T/2^(n−1), …, T/2, T} (n = `causal_buckets`, rounded
up per `capacity_multiple`); the largest per-row count decides. Every branch has a static
shape, all compile into one program and only the chosen one runs; bucket 0 skips the layer.
Prefill and full-sequence calls bucket the tokens of each row; cached decoding (T = 1) buckets
the rows whose token was selected (batch 1: skip or run).

A routed layer's cache is either the full layout of `init_layer_cache` (K/V `[B, S, K, Hd]`,
`written [B, S]`, slot = position in the row) or, when `cache_fraction` < 1, the compact one:

    k, v      [B, S_c, K, Hd]  K after RoPE at the token's original position
    slot      [B, S_c] int32   the row slot (cache index) the entry was written from
    ptr       [B] int32        entries held (slots 0..ptr−1, in slot order)
    overflow  [B] int32        selected tokens dropped because the row's cache was full

with S_c = ceil(cache_fraction·S). A query at row slot q sees entry s iff s < ptr and
slot[s] <= q (the one attention mask rule with key positions = `slot`). Overflow policy: a row
whose cache is full treats further selected tokens as d = 0 (the layer is skipped for them
exactly as if the router had said so) and counts them in `overflow`; `cache_overflow` sums the
counters of a model cache. Entries written from slots >= the call's `index` are dropped first,
so a cache can be rewound like the full layout.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxdyn.model.block import init_layer_cache
from jaxdyn.model.config import ModelConfig
from jaxdyn.model.flash import MaskSpec
from jaxdyn.model.routing.options import capacity_k, routing_opts
from jaxdyn.model.routing.route import gather, lerp, scatter, select

i32 = jnp.int32
COMPACT_KEYS = ("k", "v", "slot", "ptr", "overflow")


# ----------------------------------------------------------------------------- cache layouts


def cache_fraction(opt: dict[str, Any]) -> float:
    """S_c / S of a routed layer's cache: the option, or min(1, 2γ) for "auto"."""
    f = opt["cache_fraction"]
    return min(1.0, 2.0 * opt["capacity"]) if f == "auto" else float(f)


def compact_slots(fraction: float, max_len: int) -> int:
    """S_c = ceil(fraction·S), at least 1 and at most S."""
    return min(max_len, max(1, math.ceil(fraction * max_len - 1e-9)))


def init_routed_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    """An empty routed-layer cache: compact when `cache_fraction` < 1, else the full layout."""
    frac = cache_fraction(routing_opts(cfg))
    if frac >= 1.0:
        return init_layer_cache(cfg, batch, max_len, dtype)
    S = compact_slots(frac, max_len)
    shape = (batch, S, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "slot": jnp.zeros((batch, S), i32), "ptr": jnp.zeros((batch,), i32),
            "overflow": jnp.zeros((batch,), i32)}


def is_compact(cache: dict) -> bool:
    return "ptr" in cache


def cache_overflow(cache: Any) -> jax.Array:
    """Selected tokens dropped for lack of cache room, summed over the routed layers of a model
    cache (per row [B]; zeros for full-layout caches)."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            if "overflow" in node and "ptr" in node:
                o = node["overflow"]
                found.append(o.reshape(-1, o.shape[-1]).sum(0))  # stacked units [U, B]
            else:
                for v in node.values():
                    visit(v)

    visit(cache)
    if not found:
        return jnp.zeros((), i32)
    return sum(found)


def prepare(cache: dict, sel_BT: jax.Array, index: jax.Array
            ) -> tuple[dict, jax.Array, jax.Array, jax.Array]:
    """Before a call at row slot `index`: (cache, selected tokens that will write, their row
    slots [B, T], their destination cache slots [B, T]).

    Full layout: slots index..index+T−1 are cleared (`written` False) and a selected token
    writes its own slot. Compact: entries from slots >= index are dropped, selected tokens take
    the next free slots in order, and those beyond S_c become d = 0 (counted in `overflow`).
    """
    B, T = sel_BT.shape
    q_slot_BT = jnp.broadcast_to(index + jnp.arange(T, dtype=i32), (B, T))
    if not is_compact(cache):
        written = lax.dynamic_update_slice_in_dim(cache["written"], jnp.zeros((B, T), bool),
                                                  index, axis=1)
        return {**cache, "written": written}, sel_BT, q_slot_BT, q_slot_BT
    S = cache["k"].shape[1]
    held_BS = (jnp.arange(S)[None] < cache["ptr"][:, None]) & (cache["slot"] < index)
    ptr_B = jnp.sum(held_BS, axis=1, dtype=i32)  # slots increase: the kept entries are a prefix
    rank_BT = jnp.cumsum(sel_BT, axis=1, dtype=i32)  # 1-based among this call's selected
    fits_BT = sel_BT & (rank_BT <= (S - ptr_B)[:, None])
    dropped_B = jnp.sum(sel_BT, axis=1, dtype=i32) - jnp.sum(fits_BT, axis=1, dtype=i32)
    cache = {**cache, "ptr": ptr_B, "overflow": cache["overflow"] + dropped_B}
    return cache, fits_BT, q_slot_BT, ptr_B[:, None] + rank_BT - 1


def writer(q_slot_Bn: jax.Array, write_Bn: jax.Array, dest_Bn: jax.Array):
    """The `ctx["kv_write"]` of `Attention` for n tokens at row slots `q_slot_Bn`: tokens with
    `write_Bn` store K/V at cache slot `dest_Bn`; the mask lets each query see the entries
    written from row slots <= its own."""

    def write(cache: dict, k_BnKH: jax.Array, v_BnKH: jax.Array) -> tuple[dict, MaskSpec]:
        B, S = cache["k"].shape[:2]
        rows = jnp.arange(B)[:, None]
        dest = jnp.where(write_Bn, dest_Bn, S)  # out of range: dropped
        put = lambda buf, new: buf.at[rows, dest].set(new.astype(buf.dtype), mode="drop")
        new = {**cache, "k": put(cache["k"], k_BnKH), "v": put(cache["v"], v_BnKH)}
        q_seg = jnp.ones(q_slot_Bn.shape, i32)
        if is_compact(cache):
            new["slot"] = put(cache["slot"], q_slot_Bn)
            new["ptr"] = cache["ptr"] + jnp.sum(write_Bn, axis=1, dtype=i32)
            held_BS = jnp.arange(S)[None] < new["ptr"][:, None]
            return new, MaskSpec(q_slot_Bn, q_seg, new["slot"], held_BS.astype(i32))
        new["written"] = put(cache["written"], jnp.ones(write_Bn.shape, bool))
        k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=i32), (B, S))
        return new, MaskSpec(q_slot_Bn, q_seg, k_pos_BS, new["written"].astype(i32))

    return write


def _merge_rows(cache: dict, sub: dict, rows_k: jax.Array, dest_k: jax.Array) -> dict:
    """Put the rows of a sub-batch cache back: per row only the one slot a decode step can
    write (`dest_k`, clipped; unchanged when nothing was written) and the per-row counters."""
    S = cache["k"].shape[1]
    d_k = jnp.clip(dest_k, 0, S - 1)
    j_k = jnp.arange(rows_k.shape[0])
    out = {}
    for name, buf in cache.items():
        if buf.ndim == 1:
            out[name] = buf.at[rows_k].set(sub[name])
        else:
            out[name] = buf.at[rows_k, d_k].set(sub[name][j_k, d_k])
    return out


# ----------------------------------------------------------------------------- buckets


def bucket_sizes(n: int, total: int, multiple: int = 1) -> tuple[int, ...]:
    """Capacities {0} ∪ {total/2^i : i < n} (rounded up to `multiple`, capped at total)."""
    return tuple(sorted({0, total} | {capacity_k(2.0 ** -i, total, multiple)
                                      for i in range(n)}))


def pick_bucket(sizes: tuple[int, ...], count: jax.Array) -> jax.Array:
    """Index of the smallest capacity >= count (count <= sizes[-1])."""
    return jnp.searchsorted(jnp.asarray(sizes, i32), count.astype(i32), side="left")


# ----------------------------------------------------------------------------- the layer


def causal_routed(layer: nn.Module, x_BTD: jax.Array, gate_BT: jax.Array, d_BT: jax.Array,
                  valid_BT: jax.Array | None, cache: dict | None, ctx: dict[str, Any],
                  opt: dict[str, Any], initializing: bool = False
                  ) -> tuple[jax.Array, dict | None]:
    """x + d·g·(layer(x) − x) with the causal decisions d; returns (y, new cache).

    `causal_compute="selected"` runs the layer on a bucket of the selected tokens (module doc);
    `"masked"` (reference) runs it on all T tokens with the keys restricted to d = 1 tokens
    and masks the update (batch-1 decoding skips the layer with `nn.cond`).
    """
    sel_BT = d_BT if valid_BT is None else d_BT & valid_BT
    q_slot_BT = dest_BT = None
    if cache is not None:
        cache, sel_BT, q_slot_BT, dest_BT = prepare(cache, sel_BT, ctx["index"])
    if opt["causal_compute"] == "masked":
        return _masked(layer, x_BTD, gate_BT, sel_BT, cache, ctx, q_slot_BT, dest_BT)
    B, T, _ = x_BTD.shape
    if cache is not None and T == 1:
        return _row_buckets(layer, x_BTD, gate_BT, sel_BT, cache, ctx, q_slot_BT, dest_BT, opt,
                            initializing)
    sizes = bucket_sizes(opt["causal_buckets"], T, opt["capacity_multiple"])
    seg_BT = ctx.get("seg_BT") if cache is None else None
    score_BT = jnp.zeros((B, T), jnp.float32)

    def branch(k: int):
        def run(mdl, x_BTD, cache):
            if k == 0:
                return x_BTD, cache
            s = select(score_BT, gate_BT, ctx["pos_BT"], sel_BT, seg_BT, k)
            x_BkD = gather(x_BTD, s, opt["dispatch"])
            sub = {"pos_BT": s.pos_Bk, "seg_BT": s.seg_Bk, "index": None}
            if cache is not None:
                take = lambda a_BT: jnp.take_along_axis(a_BT, s.idx_Bk, axis=1)
                sub = {"pos_BT": s.pos_Bk, "seg_BT": None, "index": ctx["index"],
                       "kv_write": writer(take(q_slot_BT), s.valid_Bk, take(dest_BT))}
            y_BkD, (cache, _) = mdl(x_BkD, cache, sub)
            return scatter(x_BTD, s, x_BkD, y_BkD, opt["dispatch"])[0], cache
        return run

    if initializing:  # every branch must see the same parameters: create them on all T
        return branch(T)(layer, x_BTD, cache)
    count = jnp.max(jnp.sum(sel_BT, axis=1, dtype=i32))
    return nn.switch(pick_bucket(sizes, count), [branch(k) for k in sizes], layer, x_BTD, cache)


def _row_buckets(layer, x_BTD, gate_BT, sel_BT, cache, ctx, q_slot_BT, dest_BT, opt,
                 initializing):
    """Cached decoding of one token per row: the rows whose token was selected form a sub-batch
    (the routing primitive over the batch axis); their cache rows are gathered, and the one slot
    each may write is put back."""
    B = x_BTD.shape[0]
    sizes = bucket_sizes(opt["causal_buckets"], B)
    t = lambda a: jnp.swapaxes(a, 0, 1)  # rows <-> tokens: [B, 1, …] <-> [1, B, …]

    def branch(k: int):
        def run(mdl, x_BTD, cache):
            if k == 0:
                return x_BTD, cache
            s = select(jnp.zeros((1, B), jnp.float32), t(gate_BT), t(ctx["pos_BT"]),
                       t(sel_BT), None, k)
            rows_k = s.idx_Bk[0]
            x_1kD = gather(t(x_BTD), s)
            sub_cache = jax.tree.map(lambda a: a[rows_k], cache)
            w = writer(q_slot_BT[rows_k], t(s.valid_Bk), dest_BT[rows_k])
            y_k1D, (sub_cache, _) = mdl(t(x_1kD), sub_cache, {
                "pos_BT": t(s.pos_Bk), "seg_BT": None, "index": ctx["index"], "kv_write": w})
            cache = _merge_rows(cache, sub_cache, rows_k, dest_BT[rows_k, 0])
            return t(scatter(t(x_BTD), s, x_1kD, t(y_k1D))[0]), cache
        return run

    if initializing:
        return branch(B)(layer, x_BTD, cache)
    count = jnp.sum(sel_BT, dtype=i32)
    return nn.switch(pick_bucket(sizes, count), [branch(k) for k in sizes], layer, x_BTD, cache)


def _masked(layer, x_BTD, gate_BT, sel_BT, cache, ctx, q_slot_BT, dest_BT):
    """The reference path: the layer on all T tokens, keys restricted to selected tokens, the
    update masked (batch-1 decoding skips the layer when d = 0). A full-layout cache is written
    by `Attention` itself (`write_BT`), a compact one by `writer`."""
    if cache is None:
        seg_BT = ctx.get("seg_BT")
        seg_BT = sel_BT.astype(i32) if seg_BT is None else jnp.where(sel_BT, seg_BT, 0)
        y_BTD, _ = layer(x_BTD, None, {**ctx, "seg_BT": seg_BT})
        return lerp(x_BTD, y_BTD, gate_BT * sel_BT), None
    compact = is_compact(cache)
    sub = {**ctx, "kv_write": writer(q_slot_BT, sel_BT, dest_BT)} if compact else ctx

    def run(mdl, x_BTD, cache):
        y_BTD, (cache, _) = mdl(x_BTD, cache, sub, write_BT=None if compact else sel_BT)
        return lerp(x_BTD, y_BTD, gate_BT * sel_BT), cache

    if x_BTD.shape[:2] == (1, 1):
        return nn.cond(sel_BT[0, 0], run, lambda mdl, x, c: (x, c), layer, x_BTD, cache)
    return run(layer, x_BTD, cache)
