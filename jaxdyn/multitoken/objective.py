"""Multi-token prediction training (DynaMo; Tuli et al., NAACL 2024): per-head losses, LR groups,
a tiny self-contained trainer and the synthetic/built-in corpora it uses.

Head i's target at position t is token t+i of the same document (shifted exactly once, here);
`L = sum_i w_i L_i` with chunked cross-entropy, so no [B, T, V] tensor is built.

Learning rates follow the paper's LR_B : LR_M : LR_MB = 1 : 100 : 0.1. LR_M is an optax group
(`MTP_LR_GROUPS`); LR_MB is emulated by `grad_scale(h_stem, 0.1)` inside `MultiTokenLM`. With SGD
that is exactly a learning rate; with Adam it only re-weights the heads' share of the stem's
normalised update (a PyTorch gradient hook behaves the same way).

Dimension legend: n heads, B batch, T length, N = B*T rows, D width, V vocab, c chunk rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.loss import chunked_cross_entropy, shifted_targets
from jaxdyn.multitoken.heads import (
    all_hidden,
    from_dense,
    grad_scale,
    init_mtp_params,
    multitoken_model,
)

# Parameter-path regex -> LR multiplier, first match wins, default 1.0 (the `train.lr_groups`
# format of jaxdyn.train.optim): heads 2..n train at LR_M = 100 LR_B.
MTP_LR_GROUPS: tuple[tuple[str, float], ...] = ((r"^heads/", 100.0),)
STEM_GRAD_SCALE = 0.1  # LR_MB / LR_B, applied by grad_scale in the model


# ----------------------------------------------------------------------------- losses


def mtp_loss(params: dict, batch: dict[str, jax.Array], cfg: ModelConfig, n_heads: int, *,
             head_depth: int = 1, stem_grad_scale: float = STEM_GRAD_SCALE,
             unembed_grad_scale: float | None = STEM_GRAD_SCALE,
             weights: Sequence[float] | None = None, chunk: int = 1024,
             joint_ppl: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sum_i w_i L_i` with `L_i` the mean NLL of head i on tokens shifted by i (chunked CE).

    Metrics: `mtp/loss_i`, `mtp/ppl_i`, `mtp/acc_i`, `mtp/tokens_i`; with `joint_ppl`, also
    `mtp/ppl_1:n` over the positions valid for head n (n extra forward-only LM-head passes).
    `unembed_grad_scale` (ours, spec `scale_unembed_grad`): heads 2..n read the shared
    unembedding through `grad_scale`; None leaves their gradient unscaled.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    out = multitoken_model(cfg, n_heads, head_depth, stem_grad_scale).apply(
        {"params": params}, tokens, batch["positions"], seg)
    hidden = all_hidden(out)
    weights = weights or [1.0] * n_heads
    loss, metrics, joint = jnp.zeros((), jnp.float32), {}, jnp.zeros((), jnp.float32)
    _, mask_last = shifted_targets(tokens, seg, n_heads)
    for i in range(1, n_heads + 1):
        tgt_BT, mask_BT = shifted_targets(tokens, seg, i)
        w_DV = out.unembed
        if i > 1 and unembed_grad_scale is not None:
            w_DV = grad_scale(w_DV, unembed_grad_scale)
        loss_i, m = chunked_cross_entropy(hidden[i - 1], w_DV, tgt_BT, mask_BT, chunk)
        loss = loss + weights[i - 1] * loss_i
        metrics.update({f"mtp/loss_{i}": loss_i, f"mtp/ppl_{i}": jnp.exp(loss_i),
                        f"mtp/acc_{i}": m["accuracy"], f"mtp/tokens_{i}": m["tokens"]})
        if joint_ppl:
            nll_last, _ = chunked_cross_entropy(jax.lax.stop_gradient(hidden[i - 1]),
                                                jax.lax.stop_gradient(out.unembed), tgt_BT,
                                                mask_last, chunk)
            joint = joint + nll_last
    if joint_ppl:
        metrics[f"mtp/ppl_1:{n_heads}"] = jnp.exp(joint / n_heads)
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- optimiser


def lr_group_labels(params: Any, rules: Sequence[tuple[str, float]] = MTP_LR_GROUPS) -> Any:
    """A pytree of LR multipliers (as strings, for `optax.multi_transform`) from path regexes."""
    def label(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return str(float(next((m for pat, m in rules if re.search(pat, name)), 1.0)))
    return jax.tree_util.tree_map_with_path(label, params)


def mtp_optimizer(lr_base: float, total_steps: int, *, warmup_frac: float = 0.01,
                  weight_decay: float = 0.0, clip: float = 1.0,
                  lr_groups: Sequence[tuple[str, float]] = MTP_LR_GROUPS
                  ) -> optax.GradientTransformation:
    """Paper recipe: AdamW(0.9, 0.95, 1e-8), 1 % warm-up then cosine to 0, per-group peak LR
    (`lr_base` x multiplier); one global-norm clip and one weight-decay mask (matrices only)."""
    warm = max(1, int(warmup_frac * total_steps))
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)

    def adamw(peak):
        sched = optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total_steps, warm + 1))
        return optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay,
                           mask=decay_mask)

    mults = {str(float(m)) for _, m in lr_groups} | {"1.0"}
    groups = {m: adamw(lr_base * float(m)) for m in mults}
    labels = lambda p: lr_group_labels(p, lr_groups)
    return optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform(groups, labels))


# ----------------------------------------------------------------------------- data


def markov_corpus(vocab: int = 64, n_docs: int = 200, doc_len: tuple[int, int] = (40, 120),
                  branching: int = 3, order: int = 2, seed: int = 0
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents from a known Markov chain of `order` 1 or 2 and its table P[..., next] (spec §8).

    Each context allows `branching` next tokens with skewed Dirichlet(0.5) weights.
    """
    rng = np.random.default_rng(seed)
    trans = np.zeros((vocab,) * (order + 1))
    for ctx in np.ndindex(*(vocab,) * order):
        nxt = rng.choice(vocab, branching, replace=False)
        trans[ctx + (slice(None),)][nxt] = rng.dirichlet(np.full(branching, 0.5))
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(doc_len[0], doc_len[1] + 1))
        d = [int(t) for t in rng.integers(0, vocab, order)]
        while len(d) < n:
            d.append(int(rng.choice(vocab, p=trans[tuple(d[-order:])])))
        docs.append(np.asarray(d, np.int32))
    return docs, trans


def builtin_docs(max_docs: int = 400, max_len: int = 4096, split: str = "train"
                 ) -> list[np.ndarray]:
    """The built-in corpus (`jaxdyn.data`, this interpreter's stdlib sources) as byte tokens
    (V = 258, each document cut to `max_len` and ended by EOS = 256)."""
    from jaxdyn.data import DataConfig, load_documents
    from jaxdyn.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    texts = load_documents(DataConfig(max_documents=max_docs), split)
    return [np.r_[d[:max_len - 1], tok.eos_id].astype(np.int32)
            for d in tok.encode_batch(texts) if len(d) > 8]


def pack(docs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """One long stream: tokens, positions (restart per document) and segment ids (1, 2, ...)."""
    tokens = np.concatenate(docs).astype(np.int32)
    seg = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(docs)])
    pos = np.concatenate([np.arange(len(d), dtype=np.int32) for d in docs])
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def sample_batch(stream: dict[str, np.ndarray], batch: int, seq_len: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random windows of the packed stream, [B, T] each."""
    starts = rng.integers(0, len(stream["tokens"]) - seq_len, batch)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return {k: v[idx] for k, v in stream.items()}


# ----------------------------------------------------------------------------- tiny trainer


@dataclasses.dataclass
class TinyMTP:
    cfg: ModelConfig
    n_heads: int
    params: dict
    history: list[dict[str, float]]


def _fit(params, cfg, n_heads, tx, stream, steps, batch, seq_len, rng, log_every, history, tag):
    @jax.jit
    def step(p, opt, b):
        (_, m), g = jax.value_and_grad(mtp_loss, has_aux=True)(p, b, cfg, n_heads)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, m

    opt = tx.init(params)
    for s in range(steps):
        params, opt, m = step(params, opt, sample_batch(stream, batch, seq_len, rng))
        if (s + 1) % log_every == 0 or s + 1 == steps:
            history.append({"stage": tag, "step": s + 1,
                            **{k: float(v) for k, v in jax.device_get(m).items()}})
    return params


def train_tiny_mtp(cfg: ModelConfig, n_heads: int = 3, docs: Sequence[np.ndarray] | None = None,
                   *, dense_params: dict | None = None, dense_steps: int = 300,
                   mtp_steps: int = 300, batch: int = 8, seq_len: int = 64,
                   lr_dense: float = 3e-3, lr_base: float = 3e-5,
                   lr_groups: Sequence[tuple[str, float]] = MTP_LR_GROUPS, seed: int = 0,
                   log_every: int = 50) -> TinyMTP:
    """Stage 1 (skipped when `dense_params` is given, i.e. an imported checkpoint): plain
    next-token training for `dense_steps` (0: keep the random init). Stage 2: `from_dense` + all
    heads with `lr_groups` (default LR_B : LR_M = 1 : 100; LR_MB = 0.1 in the model)."""
    docs = docs if docs is not None else markov_corpus(cfg.vocab_size, seed=seed)[0]
    stream = pack(docs)
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    imported = dense_params is not None
    if not imported:
        dense_params = init_mtp_params(cfg, 1, jax.random.key(seed))
    if not imported and dense_steps > 0:
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(
            0.0, lr_dense, max(1, dense_steps // 20), max(dense_steps, 2)), b1=0.9, b2=0.95)
        dense_params = _fit(dense_params, cfg, 1, tx, stream,
                            dense_steps, batch, seq_len, rng, log_every, history, "dense")
    params, _ = from_dense(cfg, dense_params, n_heads, jax.random.key(seed + 1))
    if n_heads > 1 and mtp_steps > 0:
        params = _fit(params, cfg, n_heads, mtp_optimizer(lr_base, mtp_steps, lr_groups=lr_groups),
                      stream, mtp_steps, batch, seq_len, rng, log_every, history, "mtp")
    return TinyMTP(cfg, n_heads, params, history)


def evaluate(params: dict, cfg: ModelConfig, n_heads: int, docs: Sequence[np.ndarray], *,
             batch: int = 8, seq_len: int = 64, n_batches: int = 4, seed: int = 123
             ) -> dict[str, float]:
    """Mean of `mtp_loss` metrics (PPL_i, PPL_{1:n}) over held-out windows."""
    stream, rng = pack(docs), np.random.default_rng(seed)
    fn = jax.jit(lambda p, b: mtp_loss(p, b, cfg, n_heads, joint_ppl=True)[1])
    ms = [jax.device_get(fn(params, sample_batch(stream, batch, seq_len, rng)))
          for _ in range(n_batches)]
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
