"""DynaMo's joint selection on device (`grid.select` inside jit) and a decode loop whose whole
step — forward, selection, sampling, state update — is one jitted function.

The co-occurrence tables become device arrays (`DeviceTables`): each order's sorted keys are
stored as K int32 id columns (the key order ((a·V + b)·V + c) is the lexicographic order of the
tuples, so no 64-bit integers are needed without `jax_enable_x64`) and looked up by a
vectorised lexicographic binary search (`lookup`, the `searchsorted` of `CooccurTables.count`).
For every n = n_max .. 2 the grid, penalty, renormalisation, static threshold, blur and Otsu
threshold (same 256-bin histogram as `grid.otsu_threshold`) run at static shapes [k]*n; the
first n whose survivor set is non-empty is used (back-off), n = 1 takes head 1's plain sample.

Randomness: the host draws one `rng.random()` per sampled tuple (`Generator.choice` takes the
cdf's `searchsorted(u, side="right")`). The device takes that uniform as an input, and
`generate_multitoken_device` pre-draws the host loop's stream `default_rng(seed).random()` and
hands the i-th draw to the i-th sampling event in the host's order (rows in order, steps in
order), so both emit the same tokens for a fixed seed. Grid arithmetic is float64 under
`jax_enable_x64`, else float32 (the host is float64): then a value within float32 rounding of a
threshold, an Otsu bin edge, a cdf step or an arg-max tie may resolve differently.

Dimension legend: B batch, n heads in a grid, k top-k per head, K n-gram order, N table rows,
Q queries, W penalty window, T block slots, V vocabulary, U pre-drawn uniforms, C steps per
call.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.config import ModelConfig
from jaxdyn.multitoken.cooccur import CooccurTables
from jaxdyn.multitoken.decode import (
    MTPResult,
    _padded_prompts,
    init_mtp_cache,
    multitoken_step,
    plain_sampling,
)
from jaxdyn.multitoken.grid import DynamoOptions

BINS = 256  # Otsu histogram bins, as grid.otsu_threshold
TRACES: collections.Counter = collections.Counter()  # trace counts per jitted function


def _float():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class DeviceTables(NamedTuple):
    """Co-occurrence tables as device arrays (a pytree; orders 2 .. max_order)."""

    unigram_V: jax.Array  # counts (float)
    cols: tuple  # per order K: [K, N+1] int32 sorted id tuples, last row a sentinel (V, ..)
    counts: tuple  # per order K: [N+1] counts (float), sentinel 0
    totals: jax.Array  # [max_order + 1] N_K (float; index 0 unused)


def device_tables(tables: CooccurTables, max_order: int | None = None) -> DeviceTables:
    """Move `tables` (orders 2 .. max_order, default all) to device arrays."""
    order = max_order or tables.max_order
    if order > tables.max_order:
        raise ValueError(f"order {order} not in these tables (max_order={tables.max_order})")
    V, ft = tables.vocab_size, _float()
    cols, counts = [], []
    for K in range(2, order + 1):
        keys = np.asarray(tables.keys[K], np.int64)
        c_KN = np.stack([(keys // V ** (K - 1 - j)) % V for j in range(K)]).astype(np.int32)
        cols.append(jnp.asarray(np.concatenate([c_KN, np.full((K, 1), V, np.int32)], 1)))
        counts.append(jnp.asarray(np.r_[np.asarray(tables.counts[K], np.float64), 0.0], ft))
    totals = np.array([0.0] + [tables.totals[K] for K in range(1, order + 1)], np.float64)
    return DeviceTables(jnp.asarray(np.asarray(tables.unigram, np.float64), ft), tuple(cols),
                        tuple(counts), jnp.asarray(totals, ft))


def lookup(cols_KN: jax.Array, counts_N: jax.Array, q_KQ: jax.Array) -> jax.Array:
    """Counts of the query tuples (columns of `q_KQ`) in a sorted table; 0 when absent.

    Leftmost-insertion binary search (`searchsorted(keys, q)`) with lexicographic comparison of
    the id columns, then an equality check, exactly as `CooccurTables.count`."""
    K, N = cols_KN.shape
    Q = q_KQ.shape[1]

    def less(row_KQ):
        lt, eq = jnp.zeros((Q,), bool), jnp.ones((Q,), bool)
        for j in range(K):
            lt = lt | (eq & (row_KQ[j] < q_KQ[j]))
            eq = eq & (row_KQ[j] == q_KQ[j])
        return lt

    def body(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) // 2
        go = lo < hi
        lt = less(cols_KN[:, jnp.minimum(mid, N - 1)])
        return jnp.where(go & lt, mid + 1, lo), jnp.where(go & ~lt, mid, hi)

    lo, _ = jax.lax.fori_loop(0, int(N).bit_length() + 1, body,
                              (jnp.zeros((Q,), jnp.int32), jnp.full((Q,), N, jnp.int32)))
    i = jnp.minimum(lo, N - 1)
    found = jnp.all(cols_KN[:, i] == q_KQ, axis=0)
    return jnp.where(found, counts_N[i], 0)


def count(tables: DeviceTables, ngrams_QK: jax.Array) -> jax.Array:
    """`CooccurTables.count` on device: occurrences of each n-gram (0 outside the table's V)."""
    g = jnp.asarray(ngrams_QK, jnp.int32)
    V, K = tables.unigram_V.shape[0], g.shape[1]
    inside = jnp.all((g >= 0) & (g < V), axis=1)
    if K == 1:
        return jnp.where(inside, tables.unigram_V[jnp.clip(g[:, 0], 0, V - 1)], 0)
    q_KQ = jnp.where(inside[None, :], g.T, 0)
    return jnp.where(inside, lookup(tables.cols[K - 2], tables.counts[K - 2], q_KQ), 0)


def grid_ratio(tables: DeviceTables, ids_nk: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """ρ over the grid [k]*n of n id lists (`CooccurTables.grid_ratio`)."""
    n, k = ids_nk.shape
    V = tables.unigram_V.shape[0]
    tup_Qn = jnp.stack(jnp.meshgrid(*ids_nk, indexing="ij"), -1).reshape(-1, n)
    p_n = (count(tables, tup_Qn) + smoothing) / (tables.totals[n] + smoothing * float(V) ** n)
    denom = jnp.ones(tup_Qn.shape[0], p_n.dtype)
    for h in range(n):
        uni_k = count(tables, ids_nk[h][:, None])
        denom = denom * ((uni_k + smoothing) / (tables.totals[1] + smoothing * V))[
            jnp.arange(k ** n) // k ** (n - 1 - h) % k]
    ok = denom > 0
    return jnp.where(ok, p_n / jnp.where(ok, denom, 1.0), 0.0).reshape((k,) * n)


def joint_grid(ids_nk: jax.Array, f_nk: jax.Array, tables: DeviceTables, opts: DynamoOptions,
               recent_W: jax.Array) -> jax.Array:
    """Penalised `J_raw` [k]*n (`grid.joint_grid`); `recent_W` padded with -1."""
    n, k = ids_nk.shape
    g = jnp.ones((k,) * n, _float())
    for h in range(n):
        shape = [1] * n
        shape[h] = k
        g = g * f_nk[h].astype(g.dtype).reshape(shape)
    g = g * grid_ratio(tables, ids_nk, opts.smoothing) ** opts.alpha_c
    if opts.repetition_penalty != 1.0:
        bad = jnp.zeros(g.shape, bool)
        for a in range(n):
            shape = [1] * n
            shape[a] = k
            hit_k = jnp.any(ids_nk[a][:, None] == recent_W[None, :], axis=1)
            bad = bad | hit_k.reshape(shape)
            for b in range(a + 1, n):
                shape_ab = [1] * n
                shape_ab[a], shape_ab[b] = k, k
                bad = bad | (ids_nk[a][:, None] == ids_nk[b][None, :]).reshape(shape_ab)
        g = jnp.where(bad, g / opts.repetition_penalty, g)
    return g


def blur(x: jax.Array) -> jax.Array:
    """Separable [1, 2, 1]/4 smoothing on every axis, edge-replicate padding (`grid.blur`)."""
    y = x
    for ax in range(y.ndim):
        p = jnp.pad(y, [(1, 1) if a == ax else (0, 0) for a in range(y.ndim)], mode="edge")
        n = y.shape[ax]
        sl = lambda lo, p=p, ax=ax, n=n: jax.lax.slice_in_dim(p, lo, lo + n, axis=ax)
        y = 0.25 * sl(0) + 0.5 * sl(1) + 0.25 * sl(2)
    return y


def otsu_threshold(values: jax.Array, mask: jax.Array, bins: int = BINS) -> jax.Array:
    """`grid.otsu_threshold` of `values[mask]` (same bins, numpy's histogram binning rule)."""
    v, m = values.ravel(), mask.ravel()
    lo = jnp.min(jnp.where(m, v, jnp.inf))
    hi = jnp.max(jnp.where(m, v, -jnp.inf))
    span = jnp.where(hi > lo, hi - lo, 1.0)
    edges = jnp.linspace(lo, lo + span, bins + 1).at[-1].set(lo + span)
    idx = ((v - lo) * (bins / span)).astype(jnp.int32)
    idx = jnp.clip(idx, 0, bins - 1)  # numpy: the last edge goes to the last bin
    idx = jnp.where(v < edges[idx], idx - 1, idx)  # numpy's float correction of the index
    idx = jnp.where((v >= edges[jnp.minimum(idx + 1, bins)]) & (idx != bins - 1), idx + 1, idx)
    hist = jnp.zeros(bins, v.dtype).at[jnp.clip(idx, 0, bins - 1)].add(m.astype(v.dtype))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = jnp.cumsum(hist)[:-1]
    m0 = jnp.cumsum(hist * centres)[:-1]
    total, mtot = jnp.sum(hist), jnp.sum(hist * centres)
    w1 = total - w0
    ok = (w0 > 0) & (w1 > 0)
    mu0 = m0 / jnp.where(ok, w0, 1.0)
    mu1 = (mtot - m0) / jnp.where(ok, w1, 1.0)
    between = jnp.where(ok, w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    best = jnp.argmax(between >= jnp.max(between) * (1 - 1e-9))
    return jnp.where(hi > lo, centres[best], 0.0)


def _survivors(ids_nk, f_nk, tables, recent_W, opts, n):
    """(any survivor, sampling weights [k^n]) of the n-head grid of one row."""
    J = joint_grid(ids_nk[:n], f_nk[:n], tables, opts, recent_W)
    tau = opts.threshold ** (n - 1)
    if opts.mode == "paper":
        ok = jnp.any(J >= tau)
        keep = J >= opts.threshold
    else:
        total = jnp.sum(J)
        ok = total > 0
        J = J / jnp.where(ok, total, 1.0)
        keep = J > tau
    ok = ok & jnp.any(keep)
    if opts.adaptive:
        masked = J * keep
        sm = blur(masked) if opts.blur else masked
        keep = keep & (J > otsu_threshold(sm, sm > 0))
    return ok, (J * keep).ravel()


def _draw(w_Q: jax.Array, u: jax.Array, greedy: bool) -> jax.Array:
    """Flat index: arg-max, or `Generator.choice(p=w/Σw)` given its uniform u."""
    if greedy:
        return jnp.argmax(w_Q)
    cdf = jnp.cumsum(w_Q / jnp.sum(w_Q))
    cdf = cdf / cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u.astype(cdf.dtype), side="right"),
                       w_Q.shape[0] - 1)


def select_rows(ids_nBk: jax.Array, f_nBk: jax.Array, fb_B: jax.Array, recent_BW: jax.Array,
                tables: DeviceTables, opts: DynamoOptions,
                uniforms: Callable[[jax.Array], jax.Array]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`grid.select` for every row: (tokens [B, n_top] padded with 0, count m [B], back-offs
    [B]). `uniforms(samples_B)` gives each row's uniform, knowing which rows sample."""
    n_top = min(opts.n_max, ids_nBk.shape[0])
    B = fb_B.shape[0]
    fall_tok = jnp.zeros((B, n_top), jnp.int32).at[:, 0].set(fb_B.astype(jnp.int32))
    if (opts.mode == "ours" and opts.threshold >= 1.0) or n_top < 2:
        return fall_tok, jnp.ones((B,), jnp.int32), jnp.full((B,), max(n_top - 1, 0), jnp.int32)
    ids_Bnk, f_Bnk = jnp.swapaxes(ids_nBk, 0, 1), jnp.swapaxes(f_nBk, 0, 1)
    grids = [jax.vmap(functools.partial(_survivors, tables=tables, opts=opts, n=n))(
        ids_Bnk, f_Bnk, recent_W=recent_BW) for n in range(n_top, 1, -1)]
    m_B = jnp.ones((B,), jnp.int32)
    for n, (ok_B, _) in zip(range(n_top, 1, -1), grids, strict=True):
        m_B = jnp.where((m_B == 1) & ok_B, n, m_B)
    backoffs_B = jnp.where(m_B == 1, n_top - 1, n_top - m_B).astype(jnp.int32)
    greedy = opts.temperature == 0
    u_B = jnp.zeros((B,), _float()) if greedy else uniforms(m_B > 1)
    tok_B = fall_tok
    k = ids_nBk.shape[2]
    for n, (_, w_BQ) in zip(range(n_top, 1, -1), grids, strict=True):
        flat_B = jax.vmap(functools.partial(_draw, greedy=greedy))(w_BQ, u_B)
        i_nB = jnp.stack([flat_B // k ** (n - 1 - h) % k for h in range(n)])
        t_nB = jnp.take_along_axis(ids_nBk[:n], i_nB[..., None], 2)[..., 0].astype(jnp.int32)
        t_Bn = jnp.pad(t_nB.T, ((0, 0), (0, n_top - n)))
        tok_B = jnp.where((m_B == n)[:, None], t_Bn, tok_B)
    return tok_B, m_B, backoffs_B


@functools.partial(jax.jit, static_argnames=("opts",))
def _select_jit(ids_nBk, f_nBk, fb_B, recent_BW, u_B, tables, opts):
    TRACES["select"] += 1
    return select_rows(ids_nBk, f_nBk, fb_B, recent_BW, tables, opts, lambda s_B: u_B)


def select_device(ids_nk: np.ndarray, f_nk: np.ndarray, fallback: int, tables: DeviceTables,
                  recent: np.ndarray, opts: DynamoOptions, u: float = 0.0
                  ) -> tuple[list[int], dict]:
    """`grid.select` for one row on device. `u`: the uniform `grid.select`'s generator would
    draw for the tuple (`rng.random()`); unused at temperature 0 and on back-off to n = 1."""
    recent = np.asarray(recent, np.int64).ravel()
    W = max(1 << (len(recent) - 1).bit_length(), 16)  # bucketed: few compiles
    rec = np.full((1, W), -1, np.int32)
    rec[0, W - len(recent):] = recent
    tok, m, bo = _select_jit(jnp.asarray(ids_nk, jnp.int32)[:, None],
                             jnp.asarray(f_nk, jnp.float32)[:, None],
                             jnp.asarray([fallback], jnp.int32), jnp.asarray(rec),
                             jnp.asarray([u], _float()), tables, opts)
    m = int(m[0])
    return [int(t) for t in np.asarray(tok[0, :m])], {"n": m, "backoffs": int(bo[0])}


# ----------------------------------------------------------------------------- decoding


class _State(NamedTuple):
    """Per-row decode state kept on device between steps."""

    block_BT: jax.Array  # next forward's tokens (the tokens just emitted)
    pos_BT: jax.Array
    valid_BT: jax.Array
    last_B: jax.Array  # last valid slot of the block
    adv: jax.Array  # slots the global cache index advances by after this block
    index: jax.Array  # cache write index for this block
    cache: dict
    seen_BV: jax.Array
    it: jax.Array  # the host loop's `forwards` counter (0 at prefill and the first step)
    recent_BW: jax.Array  # last W context tokens, -1 padded
    last_tok_B: jax.Array  # last context token (done rows re-feed it)
    ctx_len_B: jax.Array
    out_len_B: jax.Array
    done_B: jax.Array
    u_next: jax.Array  # index of the next unused uniform


@functools.lru_cache(maxsize=16)
def device_steps(cfg: ModelConfig, n_heads: int, head_depth: int, opts: DynamoOptions,
                 eos_id: int | None, steps_per_call: int):
    """(prefill, decode), jitted: prefill runs the prompt forward and its selection; decode
    runs `steps_per_call` steps (forward + selection + sampling + state update) in one
    `lax.scan`, skipping steps once every row is done. Each returns the new state and, per
    step, (tokens [B, n], kept [B], back-offs [B], active [B], ran)."""
    fwd = multitoken_step(cfg, n_heads, head_depth, plain_sampling(opts))
    n = n_heads
    n_top = min(opts.n_max, n)

    def one(params, tables, u_U, max_new, rng, s: _State):
        cache = dict(s.cache, index=s.index)
        ids, f, fb, cache, seen = fwd(params, s.block_BT, s.pos_BT, s.valid_BT, s.last_B,
                                      cache, s.seen_BV, rng, s.it)
        active_B = ~s.done_B

        def uniforms(samples_B):
            use_B = samples_B & active_B
            j_B = s.u_next + jnp.cumsum(use_B, dtype=jnp.int32) - use_B
            return u_U[jnp.minimum(j_B, u_U.shape[0] - 1)]

        recent_BW = s.recent_BW if opts.penalty_window > 0 else jnp.full_like(s.recent_BW, -1)
        tok_Bm, m_B, bo_B = select_rows(ids, f, fb, recent_BW, tables, opts, uniforms)
        used = jnp.sum(active_B & (m_B > 1), dtype=jnp.int32) if opts.temperature != 0 else 0
        tok_Bn = jnp.pad(tok_Bm, ((0, 0), (0, n - n_top)))
        # _finish: keep up to the length limit and through the first EOS
        room_B = max_new - s.out_len_B
        kept_B = jnp.minimum(m_B, room_B)
        slot_n = jnp.arange(n)
        if eos_id is not None:
            eos_Bn = (tok_Bn == eos_id) & (slot_n[None] < m_B[:, None])
            first_B = jnp.min(jnp.where(eos_Bn, slot_n[None], n), axis=1)
            kept_B = jnp.minimum(kept_B, first_B + 1)
            hit_B = first_B < kept_B
        else:
            hit_B = jnp.zeros_like(active_B)
        kept_B = jnp.where(active_B, kept_B, 0)
        out_len_B = s.out_len_B + kept_B
        done_B = s.done_B | (active_B & ((out_len_B >= max_new) | hit_B))
        W = s.recent_BW.shape[1]
        cat = jnp.concatenate([s.recent_BW, tok_Bn], 1)
        recent_BW = jnp.take_along_axis(cat, jnp.arange(W)[None] + kept_B[:, None], 1)
        last_kept_B = jnp.take_along_axis(tok_Bn, jnp.maximum(kept_B - 1, 0)[:, None], 1)[:, 0]
        last_tok_B = jnp.where(kept_B > 0, last_kept_B, s.last_tok_B)
        ctx_len_B = s.ctx_len_B + kept_B
        # next block: the kept tokens, or the last context token for rows already done
        m_next = jnp.where(active_B, kept_B, 1)
        blk_Bn = jnp.where(active_B[:, None], tok_Bn, last_tok_B[:, None])
        valid_Bn = slot_n[None] < m_next[:, None]
        blk_Bn = jnp.where(valid_Bn, blk_Bn, 0)
        pos_Bn = ctx_len_B[:, None] - m_next[:, None] + slot_n[None]
        new = _State(blk_Bn, pos_Bn.astype(jnp.int32), valid_Bn, (m_next - 1).astype(jnp.int32),
                     jnp.max(m_next).astype(jnp.int32), s.index + s.adv, cache, seen,
                     s.it + 1, recent_BW,
                     last_tok_B, ctx_len_B, out_len_B, done_B, s.u_next + used)
        return new, (tok_Bn, kept_B, bo_B * active_B, active_B)

    def prefill(params, tables, u_U, max_new, rng, s: _State):
        TRACES["prefill"] += 1
        new, out = one(params, tables, u_U, max_new, rng, s)
        return new._replace(it=s.it), out  # the host loop's first decode step also uses 0

    def decode(params, tables, u_U, max_new, rng, s: _State):
        TRACES["decode"] += 1

        def body(s, _):
            def run(s):
                new, (t, k, b, a) = one(params, tables, u_U, max_new, rng, s)
                return new, (t, k, b, a, jnp.ones((), bool))

            def skip(s):
                z = jnp.zeros_like(s.done_B, jnp.int32)
                return s, (jnp.zeros((z.shape[0], n), jnp.int32), z, z, jnp.zeros_like(s.done_B),
                           jnp.zeros((), bool))

            return jax.lax.cond(jnp.all(s.done_B), skip, run, s)

        return jax.lax.scan(body, s, None, length=steps_per_call)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=(5,))


def generate_multitoken_device(cfg: ModelConfig, params: dict,
                               tables: CooccurTables | DeviceTables,
                               prompts: Sequence[Sequence[int]], max_new_tokens: int,
                               opts: DynamoOptions = DynamoOptions(), seed: int = 0,
                               eos_id: int | None = None, n_heads: int = 3, head_depth: int = 1,
                               bucket: int = 16, return_cache: bool = False,
                               on_tokens: Callable[[int, list[list[int]]], None] | None = None,
                               steps_per_call: int = 8) -> MTPResult:
    """`decode.generate_multitoken` with the selection on device: each call runs
    `steps_per_call` whole steps in one jitted function and returns only their tokens.

    Same tokens, statistics and cache as the host loop for the same seed (see the module
    docstring for the float32 caveat), except `penalty_window=0`, which here means no window
    (the host's `ctx[-0:]` slice is the whole context)."""
    if opts.n_max > n_heads:
        raise ValueError(f"n_max={opts.n_max} exceeds the model's n_heads={n_heads}")
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call={steps_per_call} must be >= 1")
    n, n_top = n_heads, min(opts.n_max, n_heads)
    tokens, positions, valid, S = _padded_prompts(cfg, prompts, max_new_tokens, n, bucket)
    B, P = tokens.shape
    dt = tables if isinstance(tables, DeviceTables) else device_tables(tables, max(n_top, 2))
    if len(dt.cols) < n_top - 1:
        raise ValueError(f"the tables hold orders up to {len(dt.cols) + 1}, n_max={n_top}")
    prefill, decode = device_steps(cfg, n, head_depth, opts, eos_id, steps_per_call)
    if opts.temperature == 0:
        u_U = np.zeros(1)
    else:  # the host loop's stream: one draw per sampled tuple, at most one per row and step
        u_U = np.random.default_rng(seed).random(1 << max(B * max_new_tokens - 1, 1).bit_length())
    u_U = jnp.asarray(u_U, _float())
    W = max(opts.penalty_window, 1)
    recent = np.full((B, W), -1, np.int32)
    for b, p in enumerate(prompts):
        tail = list(p)[-W:]
        if tail:
            recent[b, W - len(tail):] = tail
    state = _State(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
                   jnp.full((B,), P - 1, jnp.int32), jnp.int32(P), jnp.int32(0),
                   init_mtp_cache(cfg, n, B, S, head_depth),
                   jnp.zeros((B, cfg.vocab_size), bool), jnp.int32(0), jnp.asarray(recent),
                   jnp.asarray([int(p[-1]) if len(p) else 0 for p in prompts], jnp.int32),
                   jnp.asarray([len(p) for p in prompts], jnp.int32), jnp.zeros((B,), jnp.int32),
                   jnp.zeros((B,), bool), jnp.int32(0))
    rng, max_new = jax.random.key(seed), jnp.int32(max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    emissions: list[list[list[int]]] = [[] for _ in range(B)]
    hist, stats = np.zeros(n + 1, np.int64), collections.Counter()

    def absorb(tok_CBn, kept_CB, bo_CB, act_CB, ran_C, is_decode):
        for t_Bn, k_B, bo_B, a_B, ran in zip(tok_CBn, kept_CB, bo_CB, act_CB, ran_C,
                                             strict=True):
            if not ran:
                continue
            stats["forwards"] += is_decode
            before = [len(o) for o in out]
            for b in np.flatnonzero(a_B):
                toks = [int(x) for x in t_Bn[b, :k_B[b]]]
                out[b] += toks
                emissions[b].append(toks)
                stats["backoffs"] += int(bo_B[b])
                if is_decode:
                    stats["emitted"] += len(toks)
                    stats["row_forwards"] += 1
                    hist[len(toks)] += 1
            if on_tokens:
                on_tokens(stats["forwards"], [o[k:] for o, k in zip(out, before, strict=True)])

    t0 = time.perf_counter()
    state, first = prefill(params, dt, u_U, max_new, rng, state)
    first = jax.device_get(first)
    t1 = time.perf_counter()
    absorb(*[x[None] for x in first], [True], False)
    done = np.asarray(state.done_B)
    while not done.all():
        state, outs = decode(params, dt, u_U, max_new, rng, state)
        outs, done = jax.device_get((outs, state.done_B))
        absorb(*outs, True)
    t2 = time.perf_counter()
    return MTPResult(out, t1 - t0, t2 - t1, stats["forwards"], stats["emitted"],
                     stats["row_forwards"], hist, backoffs=stats["backoffs"],
                     emissions=emissions, cache=state.cache if return_cache else None)
