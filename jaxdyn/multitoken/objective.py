"""The `mtp` training objective (DynaMo; Tuli et al., NAACL 2024): per-head losses.

Head i's target at position t is token t+i of the same document (shifted exactly once, in
`jaxdyn.model.loss`); `L = Σ_i w_i L_i` with chunked cross-entropy, so no [B, T, V] tensor is
built. The model is the decoder trunk with heads 2..n attached (`jaxdyn.multitoken.heads`);
a dense `init.checkpoint` fills the stem and head 1 (`from_dense`).

Learning rates follow the paper's LR_B : LR_M : LR_MB = 1 : 100 : 0.1: LR_M is a
`train.lr_groups` entry for `^heads/` (configs/mtp.py); LR_MB is emulated by
`grad_scale(h_stem, stem_grad_scale)` inside the model. With SGD that is exactly a learning
rate; with Adam it only re-weights the heads' share of the stem's normalised update (a PyTorch
gradient hook behaves the same way).

Dimension legend: n heads, B batch, T length, D width, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdyn.data import text_data
from jaxdyn.decode.generate import prompt_sample
from jaxdyn.model import ModelConfig, ModelOutput
from jaxdyn.model.loss import chunked_cross_entropy, shifted_targets, unit_losses
from jaxdyn.multitoken.heads import (
    all_hidden,
    dense_params_of,
    from_dense,
    grad_scale,
    multitoken_model,
)


@dataclasses.dataclass(frozen=True)
class MultiTokenConfig:
    """The heads and their loss (the `mtp` config block)."""

    n_heads: int = 3  # n: head i predicts x_{t+i} ("T3")
    head_depth: int = 1  # decoder layers per extra head (ablation: 2)
    init_from_last_layer: bool = False  # ablation "C": heads 2..n start as copies of layer L-1
    stem_grad_scale: float = 0.1  # LR_MB / LR_B: heads' gradient into the stem
    unembed_grad_scale: float = 0.1  # (ours) heads 2..n's gradient into the shared unembedding
    weights: tuple[float, ...] = ()  # per-head loss weights w_i; () = all 1 (the paper: none)
    cooccur_dir: str = ""  # co-occurrence tables for DynaMo decoding; "" = <workdir>/cooccur

    def __post_init__(self):
        if self.n_heads < 1 or self.head_depth < 1:
            raise ValueError(f"mtp.n_heads={self.n_heads} and mtp.head_depth="
                             f"{self.head_depth} must be >= 1")
        if self.weights and len(self.weights) != self.n_heads:
            raise ValueError(f"mtp.weights has {len(self.weights)} entries for mtp.n_heads="
                             f"{self.n_heads}; give one weight per head or () for all 1")


def multitoken_loss(out: ModelOutput, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None,
                    weights: Sequence[float], unembed_grad_scale: float = 1.0,
                    chunk: int = 1024, joint_ppl: bool = False) -> tuple[jax.Array, dict]:
    """`Σ_i w_i L_i` with `L_i` the mean NLL of head i on tokens shifted by i (chunked CE).

    Stats: head 1's `nll`, `accuracy`, `tokens`, and per head `mtp/loss_i`, `mtp/ppl_i`,
    `mtp/acc_i`, `mtp/tokens_i`; with `joint_ppl` also `mtp/ppl_1:n` over the positions
    valid for head n.
    Heads 2..n read the shared unembedding through `grad_scale(·, unembed_grad_scale)`.
    """
    hidden = all_hidden(out)
    n = hidden.shape[0]
    loss, stats, joint = jnp.zeros((), jnp.float32), {}, jnp.zeros((), jnp.float32)
    _, mask_last = shifted_targets(tokens_BT, segment_ids_BT, n)
    for i in range(1, n + 1):
        tgt_BT, mask_BT = shifted_targets(tokens_BT, segment_ids_BT, i)
        w_DV = out.unembed if i == 1 else grad_scale(out.unembed, unembed_grad_scale)
        loss_i, m = chunked_cross_entropy(hidden[i - 1], w_DV, tgt_BT, mask_BT, chunk)
        loss = loss + weights[i - 1] * loss_i
        stats.update({f"mtp/loss_{i}": loss_i, f"mtp/ppl_{i}": jnp.exp(loss_i),
                      f"mtp/acc_{i}": m["accuracy"], f"mtp/tokens_{i}": m["tokens"]})
        if i == 1:
            stats.update(nll=loss_i, accuracy=m["accuracy"], tokens=m["tokens"])
        if joint_ppl:
            nll_last, _ = chunked_cross_entropy(jax.lax.stop_gradient(hidden[i - 1]),
                                                jax.lax.stop_gradient(out.unembed), tgt_BT,
                                                mask_last, chunk)
            joint = joint + nll_last
    if joint_ppl:
        stats[f"mtp/ppl_1:{n}"] = jnp.exp(joint / n)
    return loss, stats


class MultiTokenObjective:
    """The trainer's `mtp` objective (interface: `jaxdyn.train.objectives`)."""

    trainable: tuple[str, ...] = ()

    def __init__(self, cfg: mlc.ConfigDict):
        if "mtp" not in cfg:
            raise ValueError("train.objective='mtp' needs an `mtp` config block "
                             "(configs/mtp.py)")
        self.cfg = cfg
        self.mcfg = ModelConfig.from_dict(cfg.model.to_dict())
        self.mc = MultiTokenConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in cfg.mtp.items()})
        self.weights = self.mc.weights or (1.0,) * self.mc.n_heads

    def model(self, routing_mode: str = "topk"):
        m = self.mc
        return multitoken_model(self.mcfg, m.n_heads, m.head_depth, m.stem_grad_scale,
                                routing_mode)

    def extend_params(self, params: dict, rng: jax.Array) -> tuple[dict, list[str]]:
        m = self.mc
        params, rep = from_dense(self.mcfg, params, m.n_heads, rng, m.head_depth,
                                 m.init_from_last_layer)
        return params, [f"mtp: {m.n_heads} heads, {len(rep.new)} new head tensors "
                        f"({rep.extra_params / 1e6:.3f}M params, overhead "
                        f"{100 * rep.overhead:.2f}%)"]

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array):
        out = model.apply(variables, batch["tokens"], batch["positions"], batch["segment_ids"],
                          compute_logits=False)
        loss, stats = multitoken_loss(out, batch["tokens"], batch["segment_ids"], self.weights,
                                      self.mc.unembed_grad_scale, self.cfg.train.loss_chunk)
        return loss + unit_losses(out.aux), stats, out.aux

    def data(self, tok, rows: int, process_index: int, process_count: int):
        return text_data(self.cfg, tok, rows, process_index, process_count)

    def sample(self, params: dict, tok) -> str | None:
        """Head 1 alone is the dense model: its plain continuation of `sample.prompt`."""
        return prompt_sample(self.cfg.sample, self.mcfg, dense_params_of(params), tok)


def markov_corpus(vocab: int = 64, n_docs: int = 200, doc_len: tuple[int, int] = (40, 120),
                  branching: int = 3, order: int = 2, seed: int = 0
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents from a known Markov chain of `order` 1 or 2 and its table P[..., next]
    (the mechanism check of the multi-token design).

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
