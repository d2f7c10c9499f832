"""Decoding with multi-token heads: DynaMo dynamic multi-token sampling (`generate_multitoken`)
and a lossless self-speculative verify mode (`generate_verify`).

Both loops feed a fixed block of slots per forward pass, so the jitted step compiles once. The
KV cache keeps one global write `index`; rows advance by different amounts, so a row's unused
or rejected slots are simply left unwritten (`written=False`) and attention skips them —
positions (RoPE) are tracked per row, independently of slots.

Verify (blockwise parallel / speculative decoding; Stern et al. 2018, Leviathan et al. 2023;
tree verification after Medusa, Cai et al. 2024, and EAGLE, Li et al. 2024): the block is a
static candidate tree (`jaxdyn.multitoken.tree`; the default chain [c, g_2..g_n] is the tree
with branching 1) whose root c is certain and whose depth-d nodes are head d+1's candidates.
One forward runs every node at position (prefix length + depth) under the tree attention mask
(a node sees the cached prefix and its ancestors; `attn_mask_BTT`), head 1 checks every node,
and the longest path consistent with head 1 is kept (`verify_steps`). `compact` then moves
the accepted path's K/V into consecutive slots and clears the rest, so the cache holds what
plain decoding of the same tokens would.

Dimension legend: n heads, J = n-1 drafting heads, D (code: Dt) tree depth <= J, N tree nodes
(verify block width), M = Dt+1 path slots, C children per node, B batch, P padded prompt,
S cache slots, V vocab, k top-k.
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
from jaxdyn.multitoken.tree import Tree, check_tree, parse_tree


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


def _cache_size(P: int, B: int, width: int, advance: int, max_new: int, bucket: int) -> int:
    """Slots for P prompt slots plus the decode blocks: a block of `width` slots is written at
    the global index, which advances by at most `advance` per step (by the tokens a step keeps
    when B == 1)."""
    grow = (max_new if B == 1 else advance * max_new) + width
    return P + -(-grow // bucket) * bucket


def _padded_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int, n: int,
                    bucket: int, width: int | None = None):
    """Left-padded prompts (tokens, positions, valid [B, P]) and the cache size S, after
    checking that prompt + new tokens + one block of n fit the model's context. `width`: slots
    a decode block writes (default n)."""
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new + n > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new}) + n_heads "
                         f"({n}) exceeds the model's context of {cfg.max_position_embeddings}; "
                         "shorten the prompt or ask for fewer tokens")
    tokens, positions, valid = left_pad(prompts, bucket)
    B, P = tokens.shape
    return tokens, positions, valid, _cache_size(P, B, width or n, n, max_new, bucket)


def _seen_of(tokens_BT, valid_BT, V):
    return jnp.any(jax.nn.one_hot(tokens_BT, V, dtype=bool) & valid_BT[..., None], axis=1)


def compact(cache: dict, index: jax.Array, path_BM: jax.Array, keep_BM: jax.Array,
            width: int) -> dict:
    """Rewrite the block of `width` slots at `index`: slot index+j gets the K/V of block slot
    `path_BM[b, j]` where `keep_BM[b, j]`; every other block slot is cleared (unwritten, zeros).

    After a tree verify forward this leaves, per row, exactly the accepted path's K/V in
    consecutive slots, as plain decoding of the same tokens would hold them."""
    M = path_BM.shape[1]

    def fix(path, x):
        key = getattr(path[-1], "key", None)
        ax = x.ndim - 1 if key == "written" else x.ndim - 3  # the slot axis; batch before it
        blk = jax.lax.dynamic_slice_in_dim(x, index, width, axis=ax)
        shape = [1] * x.ndim
        shape[ax - 1], shape[ax] = path_BM.shape
        gshape = (*blk.shape[:ax], M, *blk.shape[ax + 1:])
        idx = jnp.broadcast_to(path_BM.reshape(shape), gshape)
        got = jnp.take_along_axis(blk, idx, axis=ax)
        got = jnp.where(jnp.broadcast_to(keep_BM.reshape(shape), gshape), got,
                        jnp.zeros_like(got))
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, width - M)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.pad(got, pad), index, axis=ax)

    body = {k: v for k, v in cache.items() if k != "index"}
    return dict(jax.tree_util.tree_map_with_path(fix, body), index=cache["index"])


# ----------------------------------------------------------------------------- verify


@functools.lru_cache(maxsize=16)
def verify_steps(cfg: ModelConfig, n_heads: int, head_depth: int, sampling: SamplingConfig,
                 tree: Tree | None = None):
    """(prefill, step), jitted, for one static candidate tree (default: the chain of n-1
    drafts). Greedy when `sampling.temperature == 0`.

    Node tokens: greedy, node (d, r) is head d+1's r-th best token at the accepted position;
    sampling, every non-root node draws its own token from head d+1's processed distribution q
    (independently, so siblings may repeat). Acceptance walks from the root: at node u, with
    head 1's processed distribution p_u there, greedy moves to the child whose token is
    argmax p_u; sampling runs SpecInfer's multi-step speculative sampling over u's children
    in order — accept child y with probability min(1, r(y)/q(y)), r starting at p_u, on
    rejection r <- norm(max(0, r - q)) — and, when no child is accepted, emits a sample of r
    (p_u itself at a leaf). With one child per node this is the usual speculative rule.
    """
    tree = tree or Tree.chain(n_heads - 1)
    check_tree(tree, n_heads)
    model = multitoken_model(cfg, n_heads, head_depth)
    N, Dt, V = tree.size, tree.depth, cfg.vocab_size
    dep_N, rank_N, kids_NC = tree.depth_N, tree.rank_N, tree.children_NC
    anc_NN = tree.ancestors_NN
    greedy = sampling.temperature == 0.0
    penal = sampling.repetition_penalty != 1.0

    def probs(logits_XV):
        return jax.nn.softmax(filter_logits(logits_XV, sampling), axis=-1)

    def grow(c_B, heads_JBV, rng):
        """Tree tokens [B, N] under the certain root c, and q [B, Dt, V] (sampling)."""
        heads_DBV = heads_JBV[:Dt]
        B = c_B.shape[0]
        if greedy:
            ids_DBk = jax.lax.top_k(heads_DBV, tree.top_k)[1]
            drafts_XB = ids_DBk[dep_N[1:] - 1, :, rank_N[1:]]  # X = N-1 non-root nodes
            q_BDV = None
        else:
            q_DBV = probs(heads_DBV.reshape(-1, V)).reshape(Dt, B, V)
            drafts_XB = jax.random.categorical(rng, jnp.log(q_DBV[dep_N[1:] - 1]), axis=-1)
            q_BDV = jnp.swapaxes(q_DBV, 0, 1)
        return jnp.concatenate([c_B[:, None], drafts_XB.T.astype(jnp.int32)], 1), q_BDV

    def prefill(params, tokens_BP, pos_BP, valid_BP, cache, rng):
        out = model.apply({"params": params}, tokens_BP, pos_BP, valid_BP.astype(jnp.int32),
                          cache)
        h_nBTD = all_hidden(out)
        logits_nBV = jnp.einsum("nbd,dv->nbv", h_nBTD[:, :, -1],
                                out.unembed.astype(h_nBTD.dtype),
                                preferred_element_type=jnp.float32)
        seen = _seen_of(tokens_BP, valid_BP, V) if penal else None
        c_B = sample(logits_nBV[0], jax.random.fold_in(rng, 0), sampling, seen)
        tok_BN, q_BDV = grow(c_B, logits_nBV[1:], jax.random.fold_in(rng, 1))
        # The next position comes out of the jitted step like every later one, so the decode
        # step sees the same argument placement (committed or not) on every call: one compile.
        return tok_BN, pos_BP[:, -1] + 1, q_BDV, out.cache, seen

    def step(params, tok_BN, pos_B, cache, q_BDV, seen_BV, rng, it):
        B = tok_BN.shape[0]
        index = cache["index"]
        pos_BN = pos_B[:, None] + jnp.asarray(dep_N)[None, :]  # prefix length + depth
        mask_BNN = jnp.broadcast_to(jnp.asarray(anc_NN), (B, N, N))
        out = model.apply({"params": params}, tok_BN, pos_BN, None, cache,
                          attn_mask_BTT=mask_BNN)
        logits_nBNV = all_logits(out)
        l1_BNV = logits_nBNV[0]
        if penal:  # seen before predicting after node u: the prefix, u and its ancestors
            hit_BNV = jax.nn.one_hot(tok_BN, V, dtype=jnp.float32)
            path_BNV = jnp.einsum("nm,bmv->bnv", jnp.asarray(anc_NN, jnp.float32), hit_BNV) > 0
            l1_BNV = apply_repetition_penalty(l1_BNV, seen_BV[:, None, :] | path_BNV,
                                              sampling.repetition_penalty)
        rng = jax.random.fold_in(rng, it)
        r_acc, r_res, r_draft = jax.random.split(rng, 3)
        # next_BN: the accepted child of each node (-1: none); x_BN: the token emitted after a
        # node when the path ends there.
        next_BN = jnp.full((B, N), -1, jnp.int32)
        found_BN = jnp.zeros((B, N), bool)
        if greedy:
            x_BN = jnp.argmax(l1_BNV, -1).astype(jnp.int32)
        else:
            r_BNV = probs(l1_BNV.reshape(B * N, V)).reshape(B, N, V)
            qkid_BNV = q_BDV[:, np.minimum(dep_N, Dt - 1)]  # children of u: head dep(u)+2
            u_BNC = jax.random.uniform(r_acc, (B, N, kids_NC.shape[1]))
        for i in range(kids_NC.shape[1]):
            kid_N = kids_NC[:, i]
            has_1N = jnp.asarray(kid_N >= 0)[None, :]
            y_BN = tok_BN[:, np.maximum(kid_N, 0)]
            if greedy:
                acc_BN = has_1N & (y_BN == x_BN)
            else:
                r_y = jnp.take_along_axis(r_BNV, y_BN[..., None], -1)[..., 0]
                q_y = jnp.take_along_axis(qkid_BNV, y_BN[..., None], -1)[..., 0]
                acc_BN = has_1N & ~found_BN & (u_BNC[..., i] * q_y < r_y)
                res_BNV = jnp.maximum(r_BNV - qkid_BNV, 0.0)
                tot_BN1 = jnp.sum(res_BNV, -1, keepdims=True)
                res_BNV = jnp.where(tot_BN1 > 0, res_BNV / jnp.maximum(tot_BN1, 1e-30), r_BNV)
                rej_BN = has_1N & ~found_BN & ~acc_BN
                r_BNV = jnp.where(rej_BN[..., None], res_BNV, r_BNV)
            next_BN = jnp.where(acc_BN & ~found_BN, jnp.asarray(kid_N)[None], next_BN)
            found_BN = found_BN | acc_BN
        if not greedy:
            x_BN = jax.random.categorical(r_res, jnp.log(r_BNV), axis=-1).astype(jnp.int32)
        node_B = jnp.zeros((B,), jnp.int32)
        alive_B = jnp.ones((B,), bool)
        path = [node_B]
        for _ in range(Dt):
            nxt_B = jnp.take_along_axis(next_BN, node_B[:, None], 1)[:, 0]
            alive_B = alive_B & (nxt_B >= 0)
            node_B = jnp.where(alive_B, nxt_B, node_B)
            path.append(node_B)
        path_BM = jnp.stack(path, 1)  # M = Dt + 1; entries past the end repeat the last node
        a_B = jnp.sum(path_BM[:, 1:] != path_BM[:, :-1], axis=1).astype(jnp.int32)
        c_B = jnp.take_along_axis(x_BN, node_B[:, None], 1)[:, 0]
        heads_JBV = jnp.take_along_axis(logits_nBNV[1:], node_B[None, :, None, None], 2)[:, :, 0]
        tok_new, q_new = grow(c_B, heads_JBV, r_draft)
        keep_BM = jnp.arange(Dt + 1)[None, :] <= a_B[:, None]
        cache = compact(out.cache, index, path_BM, keep_BM, N)
        cache = dict(cache, index=index + 1 + jnp.max(a_B))
        path_tok_BM = jnp.take_along_axis(tok_BN, path_BM, 1)
        if penal:
            seen_BV = seen_BV | jnp.any(jax.nn.one_hot(path_tok_BM, V, dtype=bool)
                                        & keep_BM[..., None], axis=1)
        # one device->host copy per step: accepted drafts (padded), the next certain token, a
        host_BM2 = jnp.concatenate([path_tok_BM[:, 1:], c_B[:, None], a_B[:, None]], 1)
        return tok_new, pos_B + 1 + a_B, cache, q_new, seen_BV, host_BM2

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
                    check_lossless: bool = False, tree: Tree | str | None = None
                    ) -> MTPResult:
    """Lossless decoding: greedy output equals plain greedy decoding of head 1; sampling keeps
    head 1's processed distribution. `on_tokens(step, new_tokens_per_row)` streams.

    `tree`: the static candidate tree one forward verifies (`Tree`, or a `parse_tree` spec such
    as "4,2"; default the chain of n-1 drafts). Acceptance statistics are per draft depth.

    Exact in fp32. In a lower compute dtype (`cfg.dtype` bf16) a near-tie of head 1's logits
    can resolve differently in the verify block than in plain single-token decoding, and the
    outputs then diverge. `check_lossless` (greedy only) also runs plain greedy decoding of
    the same prompts with the same config after the timed loop and stores the comparison in
    `result.divergence` (`Divergence`); the output itself is never altered."""
    if check_lossless and sampling.temperature != 0.0:
        raise ValueError("check_lossless compares token for token with plain greedy decoding; "
                         "it needs greedy sampling (temperature 0), sampling keeps only the "
                         "distribution")
    n = n_heads
    tree = tree if isinstance(tree, Tree) else parse_tree(tree, n)
    J = tree.depth
    tokens, positions, valid, S = _padded_prompts(cfg, prompts, max_new_tokens, n, bucket,
                                                  width=tree.size)
    B, P = tokens.shape
    prefill, step = verify_steps(cfg, n, head_depth, sampling, tree)
    rng = jax.random.key(seed)
    t0 = time.perf_counter()
    block, pos, q, cache, seen = prefill(params, tokens, positions, valid,
                                         init_mtp_cache(cfg, n, B, S, head_depth), rng)
    first = np.asarray(block[:, 0])
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for b in range(B):
        _finish(out, done, b, first[b:b + 1], max_new_tokens, eos_id)
    if on_tokens:
        on_tokens(0, [list(o) for o in out])
    hist, reached, accepted = np.zeros(n + 1, np.int64), np.zeros(J), np.zeros(J)
    forwards = emitted = row_forwards = 0
    while not done.all():
        block, pos, cache, q, seen, host = step(params, block, pos, cache, q, seen, rng,
                                                np.int32(forwards))
        host = np.asarray(host)
        a_h, drafts_h, nxt_h = host[:, -1], host[:, :J], host[:, J]
        forwards += 1
        before = [len(o) for o in out]
        for b in np.flatnonzero(~done):
            kept = _finish(out, done, b, [*drafts_h[b, :a_h[b]], nxt_h[b]], max_new_tokens,
                           eos_id)
            emitted, row_forwards = emitted + kept, row_forwards + 1
            hist[min(kept, n)] += 1
            reached += np.arange(J) <= a_h[b]
            accepted += np.arange(J) < a_h[b]
        if on_tokens:
            on_tokens(forwards, [o[k:] for o, k in zip(out, before, strict=True)])
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
