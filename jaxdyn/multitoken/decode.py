"""Decoding with multi-token heads: DynaMo dynamic multi-token sampling (`generate_multitoken`)
and a lossless self-speculative verify mode (`generate_verify`).

Both loops feed a fixed block of n = n_heads slots per forward pass, so the jitted step compiles
once. The KV cache keeps one global write `index`; rows advance by different amounts, so a row's
unused or rejected slots are simply left unwritten (`written=False`) and attention skips them —
positions (RoPE) are tracked per row, independently of slots. Verify mode "truncates" a row by
clearing `written` for its rejected drafts; the next block overwrites those slots.

Verify (blockwise parallel / speculative decoding; Stern et al. 2018, Leviathan et al. 2023):
the block is [c, g_2..g_n] (c certain, g_j drafted by head j); head 1 checks every draft in one
pass; the longest agreeing prefix is kept (greedy: equal to head 1's arg-max; sampling: accepted
with probability min(1, p/q), the first rejection resampled from norm(max(0, p − q))).

Dimension legend: n heads = block width, J = n-1 drafts, B batch, P padded prompt, S cache
slots, V vocab, k top-k.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.decode.generate import generate, left_pad
from jaxdyn.decode.sampling import SamplingConfig, apply_repetition_penalty, filter_logits, sample
from jaxdyn.model.config import ModelConfig
from jaxdyn.multitoken.cooccur import CooccurTables
from jaxdyn.multitoken.grid import DynamoOptions, select
from jaxdyn.multitoken.heads import (
    all_hidden,
    all_logits,
    dense_params_of,
    init_mtp_cache,
    multitoken_model,
)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Verify output against plain greedy decoding of the same prompts, config and dtype.

    `diverged_steps` counts, over all rows, the output positions whose token differs from the
    plain decode's (a position only one of the two reached counts too); `first_divergence[b]`
    is row b's first such position, None when the row is identical."""

    diverged_steps: int
    first_divergence: tuple[int | None, ...]
    compared_steps: int  # positions compared (the longer row of each pair, summed)
    dtype: str  # compute dtype both decodes ran in

    @property
    def diverged_rows(self) -> int:
        return sum(f is not None for f in self.first_divergence)

    @property
    def lossless(self) -> bool:
        return self.diverged_steps == 0


def divergence(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
               dtype: str = "float32") -> Divergence:
    """Position-wise comparison of two decodes of the same prompts (see `Divergence`)."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} rows against {len(reference)} reference rows")
    steps, compared, first = 0, 0, []
    for row, ref in zip(tokens, reference, strict=True):
        n = max(len(row), len(ref))
        diff = [i for i in range(n) if i >= len(row) or i >= len(ref) or row[i] != ref[i]]
        steps, compared = steps + len(diff), compared + n
        first.append(diff[0] if diff else None)
    return Divergence(steps, tuple(first), compared, dtype)


@dataclasses.dataclass
class MTPResult:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when emitted)
    prefill_seconds: float
    decode_seconds: float
    forwards: int  # decode forward passes (prefill excluded)
    emitted: int  # tokens emitted by decode passes, over active rows
    row_forwards: int  # decode passes summed over rows while each row was active
    emission_hist: np.ndarray  # [n+1] steps (rows) emitting 0..n tokens
    reached: np.ndarray | None = None  # verify: drafts at depth j that were checked [J]
    accepted: np.ndarray | None = None  # verify: of those, accepted [J]
    backoffs: int = 0  # multitoken: back-off events
    emissions: list[list[list[int]]] | None = None  # multitoken: per row, tokens of each step
    cache: dict | None = None  # final cache (when asked for)
    divergence: Divergence | None = None  # verify with check_lossless: against plain greedy

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / max(self.row_forwards, 1)

    @property
    def tokens_per_sec(self) -> float:
        """Same definition as `GenerationResult`: tokens after the first / decode time."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def acceptance(self) -> np.ndarray | None:
        """Per depth j: P(draft j accepted | drafts < j accepted)."""
        if self.accepted is None:
            return None
        return self.accepted / np.maximum(self.reached, 1)


def _cache_size(P: int, B: int, n: int, max_new: int, bucket: int) -> int:
    grow = (max_new if B == 1 else n * max_new) + n
    return P + -(-grow // bucket) * bucket


def _padded_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int, n: int,
                    bucket: int):
    """Left-padded prompts (tokens, positions, valid [B, P]) and the cache size S, after
    checking that prompt + new tokens + one block of n fit the model's context."""
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new + n > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new}) + n_heads "
                         f"({n}) exceeds the model's context of {cfg.max_position_embeddings}; "
                         "shorten the prompt or ask for fewer tokens")
    tokens, positions, valid = left_pad(prompts, bucket)
    B, P = tokens.shape
    return tokens, positions, valid, _cache_size(P, B, n, max_new, bucket)


def _seen_of(tokens_BT, valid_BT, V):
    return jnp.any(jax.nn.one_hot(tokens_BT, V, dtype=bool) & valid_BT[..., None], axis=1)


def truncate(cache: dict, index: jax.Array, keep_Bn: jax.Array) -> dict:
    """Clear `written` for block slots index..index+n-1 where `keep_Bn` is False."""
    n = keep_Bn.shape[1]

    def fix(path, x):
        if getattr(path[-1], "key", None) != "written":
            return x
        blk = jax.lax.dynamic_slice_in_dim(x, index, n, axis=x.ndim - 1)
        blk = blk & jnp.broadcast_to(keep_Bn, blk.shape)
        return jax.lax.dynamic_update_slice_in_dim(x, blk, index, axis=x.ndim - 1)

    return jax.tree_util.tree_map_with_path(fix, cache)


# ----------------------------------------------------------------------------- verify


@functools.lru_cache(maxsize=16)
def verify_steps(cfg: ModelConfig, n_heads: int, head_depth: int, sampling: SamplingConfig):
    """(prefill, step), jitted. Greedy when `sampling.temperature == 0`."""
    model = multitoken_model(cfg, n_heads, head_depth)
    n, V = n_heads, cfg.vocab_size
    greedy = sampling.temperature == 0.0
    penal = sampling.repetition_penalty != 1.0

    def probs(logits_XV):
        return jax.nn.softmax(filter_logits(logits_XV, sampling), axis=-1)

    def draft(logits_JBV, rng):
        if greedy:
            return jnp.argmax(logits_JBV, -1).astype(jnp.int32).T, None
        q_JBV = probs(logits_JBV.reshape(-1, V)).reshape(logits_JBV.shape)
        g_JB = jax.random.categorical(rng, jnp.log(q_JBV), axis=-1).astype(jnp.int32)
        return g_JB.T, jnp.swapaxes(q_JBV, 0, 1)

    def prefill(params, tokens_BP, pos_BP, valid_BP, cache, rng):
        out = model.apply({"params": params}, tokens_BP, pos_BP, valid_BP.astype(jnp.int32),
                          cache)
        h_nBTD = all_hidden(out)
        logits_nBV = jnp.einsum("nbd,dv->nbv", h_nBTD[:, :, -1],
                                out.unembed.astype(h_nBTD.dtype),
                                preferred_element_type=jnp.float32)
        seen = _seen_of(tokens_BP, valid_BP, V) if penal else None
        c_B = sample(logits_nBV[0], jax.random.fold_in(rng, 0), sampling, seen)
        g_BJ, q_BJV = draft(logits_nBV[1:], jax.random.fold_in(rng, 1))
        # The next position comes out of the jitted step like every later one, so the decode
        # step sees the same argument placement (committed or not) on every call: one compile.
        block_Bn = jnp.concatenate([c_B[:, None], g_BJ], 1)
        return block_Bn, pos_BP[:, -1] + 1, q_BJV, out.cache, seen

    def step(params, block_Bn, pos_B, cache, q_BJV, seen_BV, rng, it):
        B = block_Bn.shape[0]
        index = cache["index"]
        pos_Bn = pos_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
        out = model.apply({"params": params}, block_Bn, pos_Bn, None, cache)
        logits_nBnV = all_logits(out)
        l1_BnV = logits_nBnV[0]
        if penal:  # seen before predicting slot i: everything up to and including block[i]
            hit_BnV = jax.nn.one_hot(block_Bn, V, dtype=bool)
            seen_BnV = seen_BV[:, None, :] | (jnp.cumsum(hit_BnV, axis=1) > 0)
            l1_BnV = apply_repetition_penalty(l1_BnV, seen_BnV, sampling.repetition_penalty)
        rng = jax.random.fold_in(rng, it)
        r_acc, r_res, r_draft = jax.random.split(rng, 3)
        g_BJ = block_Bn[:, 1:]
        if greedy:
            choice_Bn = jnp.argmax(l1_BnV, -1).astype(jnp.int32)
            acc_BJ = g_BJ == choice_Bn[:, :-1]
        else:
            p_BnV = probs(l1_BnV.reshape(B * n, V)).reshape(B, n, V)
            p_g = jnp.take_along_axis(p_BnV[:, :-1], g_BJ[..., None], -1)[..., 0]
            q_g = jnp.take_along_axis(q_BJV, g_BJ[..., None], -1)[..., 0]
            acc_BJ = jax.random.uniform(r_acc, g_BJ.shape) * q_g < p_g
        a_B = jnp.sum(jnp.cumprod(acc_BJ.astype(jnp.int32), axis=1), axis=1)
        if greedy:
            c_B = jnp.take_along_axis(choice_Bn, a_B[:, None], 1)[:, 0]
        else:
            q_pad = jnp.concatenate([q_BJV, jnp.zeros((B, 1, V), q_BJV.dtype)], 1)
            p_a = jnp.take_along_axis(p_BnV, a_B[:, None, None], 1)[:, 0]
            q_a = jnp.take_along_axis(q_pad, a_B[:, None, None], 1)[:, 0]
            res = jnp.maximum(p_a - q_a, 0.0)
            res = jnp.where(jnp.sum(res, -1, keepdims=True) > 0, res, p_a)
            c_B = jax.random.categorical(r_res, jnp.log(res), axis=-1).astype(jnp.int32)
        heads_JBV = jnp.take_along_axis(logits_nBnV[1:], a_B[None, :, None, None], 2)[:, :, 0]
        g_new, q_new = draft(heads_JBV, r_draft)
        keep_Bn = jnp.arange(n)[None, :] <= a_B[:, None]
        cache = dict(truncate(out.cache, index, keep_Bn), index=index + 1 + jnp.max(a_B))
        if penal:
            seen_BV = seen_BV | jnp.any(jax.nn.one_hot(block_Bn, V, dtype=bool)
                                        & keep_Bn[..., None], axis=1)
        nxt = jnp.concatenate([c_B[:, None], g_new], 1)
        host_Bn1 = jnp.concatenate([nxt, a_B[:, None]], 1)  # one device->host copy per step
        return nxt, pos_B + 1 + a_B, cache, q_new, seen_BV, host_Bn1

    return jax.jit(prefill, donate_argnums=(4,)), jax.jit(step, donate_argnums=(3,))


def _finish(out, done, b, toks, max_new, eos_id) -> int:
    """Append to row b up to the limit/EOS; returns the number kept."""
    kept = 0
    for t in toks:
        if done[b]:
            break
        out[b].append(int(t))
        kept += 1
        done[b] = len(out[b]) >= max_new or (eos_id is not None and t == eos_id)
    return kept


def generate_verify(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                    seed: int = 0, eos_id: int | None = None, n_heads: int = 3,
                    head_depth: int = 1, bucket: int = 16, return_cache: bool = False,
                    on_tokens: Callable[[int, list[list[int]]], None] | None = None,
                    check_lossless: bool = False) -> MTPResult:
    """Lossless decoding: greedy output equals plain greedy decoding of head 1; sampling keeps
    head 1's processed distribution. `on_tokens(step, new_tokens_per_row)` streams.

    Exact in fp32. In a lower compute dtype (`cfg.dtype` bf16) a near-tie of head 1's logits
    can resolve differently in the n-wide verify block than in plain single-token decoding, and
    the outputs then diverge. `check_lossless` (greedy only) also runs plain greedy decoding of
    the same prompts with the same config after the timed loop and stores the comparison in
    `result.divergence` (`Divergence`); the output itself is never altered."""
    if check_lossless and sampling.temperature != 0.0:
        raise ValueError("check_lossless compares token for token with plain greedy decoding; "
                         "it needs greedy sampling (temperature 0), sampling keeps only the "
                         "distribution")
    n = n_heads
    tokens, positions, valid, S = _padded_prompts(cfg, prompts, max_new_tokens, n, bucket)
    B, P = tokens.shape
    prefill, step = verify_steps(cfg, n, head_depth, sampling)
    rng = jax.random.key(seed)
    t0 = time.perf_counter()
    block, pos, q, cache, seen = prefill(params, tokens, positions, valid,
                                         init_mtp_cache(cfg, n, B, S, head_depth), rng)
    blk = np.asarray(block)
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for b in range(B):
        _finish(out, done, b, blk[b, :1], max_new_tokens, eos_id)
    if on_tokens:
        on_tokens(0, [list(o) for o in out])
    hist, reached, accepted = np.zeros(n + 1, np.int64), np.zeros(n - 1), np.zeros(n - 1)
    forwards = emitted = row_forwards = 0
    while not done.all():
        nxt, pos, cache, q, seen, host = step(params, block, pos, cache, q, seen, rng,
                                              np.int32(forwards))
        host = np.asarray(host)
        a_h, nxt_h = host[:, -1], host[:, :-1]
        forwards += 1
        before = [len(o) for o in out]
        for b in np.flatnonzero(~done):
            kept = _finish(out, done, b, [*blk[b, 1:1 + a_h[b]], nxt_h[b, 0]], max_new_tokens,
                           eos_id)
            emitted, row_forwards = emitted + kept, row_forwards + 1
            hist[min(kept, n)] += 1
            reached += np.arange(n - 1) <= a_h[b]
            accepted += np.arange(n - 1) < a_h[b]
        if on_tokens:
            on_tokens(forwards, [o[k:] for o, k in zip(out, before, strict=True)])
        block, blk = nxt, nxt_h
    t2 = time.perf_counter()
    div = None
    if check_lossless:
        ref = generate(cfg, dense_params_of(params), prompts, max_new_tokens, sampling, seed,
                       eos_id, bucket).tokens
        div = divergence(out, ref, cfg.dtype)
    return MTPResult(out, t1 - t0, t2 - t1, forwards, emitted, row_forwards, hist, reached,
                     accepted, cache=cache if return_cache else None, divergence=div)


# ----------------------------------------------------------------------------- DynaMo


@functools.lru_cache(maxsize=16)
def multitoken_step(cfg: ModelConfig, n_heads: int, head_depth: int, plain: SamplingConfig):
    """Jitted forward over a block (or the prompt): per-head top-k ids/probabilities at each
    row's last valid slot, and head 1's plain sample there (the n = 1 back-off). `plain` holds
    DynaMo's temperature, top-k and penalty; host-side options never recompile this."""
    model = multitoken_model(cfg, n_heads, head_depth)
    V = cfg.vocab_size
    t_grid = plain.temperature or 1.0

    def fwd(params, block_BT, pos_BT, valid_BT, last_B, cache, seen_BV, rng, it):
        out = model.apply({"params": params}, block_BT, pos_BT, valid_BT.astype(jnp.int32),
                          cache)
        h_nBD = jnp.take_along_axis(all_hidden(out), last_B[None, :, None, None], 2)[:, :, 0]
        logits_nBV = jnp.einsum("nbd,dv->nbv", h_nBD, out.unembed.astype(h_nBD.dtype),
                                preferred_element_type=jnp.float32)
        f_nBk, ids_nBk = jax.lax.top_k(jax.nn.softmax(logits_nBV / t_grid, -1), plain.top_k)
        seen_BV = seen_BV | _seen_of(block_BT, valid_BT, V)
        fb_B = sample(logits_nBV[0], jax.random.fold_in(rng, it), plain, seen_BV)
        return ids_nBk, f_nBk, fb_B, out.cache, seen_BV

    return jax.jit(fwd, donate_argnums=(5,))


def plain_sampling(opts: DynamoOptions) -> SamplingConfig:
    """Head 1's sampling at back-off to n = 1, exactly like plain decoding."""
    return SamplingConfig(opts.temperature, opts.top_k, 1.0, opts.repetition_penalty)


def generate_multitoken(cfg: ModelConfig, params: dict, tables: CooccurTables,
                        prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        opts: DynamoOptions = DynamoOptions(), seed: int = 0,
                        eos_id: int | None = None, n_heads: int = 3, head_depth: int = 1,
                        bucket: int = 16, return_cache: bool = False,
                        on_tokens: Callable[[int, list[list[int]]], None] | None = None
                        ) -> MTPResult:
    """DynaMo sampling: each forward emits 1..n_max tokens chosen on the host (`mtp_grid`);
    `on_tokens(step, new_tokens_per_row)` streams."""
    if opts.n_max > n_heads:
        raise ValueError(f"n_max={opts.n_max} exceeds the model's n_heads={n_heads}")
    n = n_heads
    tokens, positions, valid, S = _padded_prompts(cfg, prompts, max_new_tokens, n, bucket)
    B, P = tokens.shape
    fwd = multitoken_step(cfg, n, head_depth, plain_sampling(opts))
    rng, host_rng = jax.random.key(seed), np.random.default_rng(seed)
    ctx = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    hist, backoffs = np.zeros(n + 1, np.int64), 0
    emissions: list[list[list[int]]] = [[] for _ in range(B)]
    forwards = emitted = row_forwards = 0
    seen = jnp.zeros((B, cfg.vocab_size), bool)
    cache = init_mtp_cache(cfg, n, B, S, head_depth)
    args = (tokens, positions, valid, np.full(B, P - 1, np.int32))
    index, t0 = P, time.perf_counter()
    t1 = None
    while True:
        ids, f, fb, cache, seen = fwd(params, *args, cache, seen, rng, np.int32(forwards))
        ids, f, fb = np.asarray(ids), np.asarray(f), np.asarray(fb)
        if t1 is None:
            t1 = time.perf_counter()
        else:
            forwards += 1
        emit, before = [], [len(o) for o in out]
        for b in range(B):
            if done[b]:
                emit.append([ctx[b][-1]])
                continue
            toks, info = select(ids[:, b], f[:, b], fb[b], tables,
                                np.asarray(ctx[b][-opts.penalty_window:]), opts, host_rng)
            backoffs += info["backoffs"]
            kept = _finish(out, done, b, toks, max_new_tokens, eos_id)
            ctx[b] += toks[:kept]
            emissions[b].append(toks[:kept])
            if forwards:
                emitted, row_forwards = emitted + kept, row_forwards + 1
                hist[kept] += 1
            emit.append(toks[:max(kept, 1)])
        if on_tokens:
            on_tokens(forwards, [o[k:] for o, k in zip(out, before, strict=True)])
        if done.all():
            break
        m = np.array([len(e) for e in emit])
        block = np.zeros((B, n), np.int32)
        valid_b = np.arange(n)[None, :] < m[:, None]
        for b, e in enumerate(emit):
            block[b, :len(e)] = e
        pos_b = np.array([len(c) for c in ctx])[:, None] - m[:, None] + np.arange(n)[None, :]
        cache = dict(cache, index=np.int32(index))
        args = (block, pos_b.astype(np.int32), valid_b, (m - 1).astype(np.int32))
        index += int(m.max())
    t2 = time.perf_counter()
    return MTPResult(out, t1 - t0, t2 - t1, forwards, emitted, row_forwards, hist,
                     backoffs=backoffs, emissions=emissions,
                     cache=cache if return_cache else None)
