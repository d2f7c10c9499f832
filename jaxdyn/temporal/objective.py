"""The `temporal` training objective (DYNAMO adapters, docs/features/temporal.md–§8), in two stages.

- `temporal_loss.stage="adapters"`: the decoder trunk with the temporal adapters attached
  (`jaxdyn.temporal.adapters`), trained on the answer tokens of TCG-Synth records at their
  date and graph; only `temporal/…` trains. Loss: answer cross-entropy + λ·JS between the
  next-token distributions at τ and at a τ′ drawn inside the record's graph regime (log
  space). `use_time` / `use_graph` switch the pathways off (ablations); `date_in_prompt`
  writes the date into the prompt instead (the Dhingra et al. 2022 baseline, with LoRA).
- `stage="backbone"`: plain next-token pretraining of the (dense) backbone on the questions
  with answers (no dates, no graphs), a share `rename` of them with fresh entity names drawn
  anew every epoch; prompt tokens weigh `prompt_weight`, answer tokens 1.

Records come from `synth` (generated in memory, or read from `synth.data_dir`); batches have
the static `shapes`. Text goes through the trainer's tokenizer (`tokenizer.kind`: the syllable
one from scratch, "checkpoint" on an imported backbone); a tokenizer the backbone in
`init.checkpoint` cannot read is refused when the objective is built (`jaxdyn.temporal.tokens`).

Dimension legend: B batch, T length, A answer slots, V vocab, D width.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from jaxdyn.data.tokenizer import Tokenizer
from jaxdyn.model import ModelConfig, build
from jaxdyn.model.loss import chunked_cross_entropy
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal.batching import (
    DAY_TAU,
    RecordIterator,
    Shapes,
    answer_text,
    encode,
    fixed_batches,
    load_split,
    make_graph,
    pretrain_arrays,
    prompt_text,
    renamed_text,
)
from jaxdyn.temporal.encoders import TemporalConfig
from jaxdyn.temporal.generate import TemporalModel, generate_conditioned
from jaxdyn.temporal.synth import SPLITS, SynthConfig, generate
from jaxdyn.temporal.tokens import check_backbone_tokenizer, check_vocab, configured_tokenizer

STAGES = ("adapters", "backbone")
REG_MODES = ("within", "all_pairs", "none")


@dataclasses.dataclass(frozen=True)
class TemporalLossConfig:
    """What the `temporal` objective trains (the `temporal_loss` config block)."""

    stage: str = "adapters"  # adapters | backbone (see the module doc)
    lam: float = 0.1  # λ of the within-regime JS regulariser
    reg_mode: str = "within"  # within | all_pairs (ablation: a random other time) | none
    use_time: bool = True  # False: the "without Time2Vec" ablation (time=None)
    use_graph: bool = True  # False: the "without GNN" ablation (graph=None)
    date_in_prompt: bool = False  # "Date: YYYY-MM-DD." before the question (baseline)
    rename: float = 1.0  # backbone stage: share of questions with fresh entity names
    prompt_weight: float = 0.1  # backbone stage: loss weight of prompt tokens (answers 1)

    def __post_init__(self):
        if self.stage not in STAGES or self.reg_mode not in REG_MODES:
            raise ValueError(f"temporal_loss.stage={self.stage!r} (one of {STAGES}), "
                             f"reg_mode={self.reg_mode!r} (one of {REG_MODES})")
        if self.lam < 0 or not 0 <= self.rename <= 1 or self.prompt_weight < 0:
            raise ValueError("temporal_loss.lam >= 0, rename in [0, 1], prompt_weight >= 0")

    @property
    def adapted(self) -> bool:
        """Whether the model carries the adapters (some conditioning pathway is on)."""
        return self.stage == "adapters" and (self.use_time or self.use_graph)


def js_divergence(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """JS(P‖Q) over the last axis from log-probabilities, in log space (0 ≤ JS ≤ ln 2)."""
    logp, logq = logp.astype(jnp.float32), logq.astype(jnp.float32)
    # log M = max + (log1p(exp(−|Δ|)) − log 2): exactly log P when P = Q, so JS(P, P) = 0.
    gap = jnp.abs(logp - logq)
    gap = jnp.where(jnp.isnan(gap), 0.0, gap)  # both −inf
    logm = jnp.maximum(logp, logq) + (jnp.log1p(jnp.exp(-gap)) - math.log(2.0))
    term = lambda lx: jnp.where(lx > -jnp.inf, jnp.exp(lx) * (lx - logm), 0.0)  # 0·log 0 = 0
    kl_pm, kl_qm = jnp.sum(term(logp), axis=-1), jnp.sum(term(logq), axis=-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def answer_logprobs(out, ans_pos_BA: jax.Array) -> jax.Array:
    """log-softmax [B, A, V] at the answer positions only (never the [B, T, V] logits)."""
    h_BAD = jnp.take_along_axis(out.hidden, ans_pos_BA[..., None], axis=1)
    logits = jnp.einsum("bad,dv->bav", h_BAD, out.unembed.astype(h_BAD.dtype),
                        preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def masked_mean_js(logp, logq, ans_mask_BA, ex_mask_B) -> jax.Array:
    """JS averaged over answer tokens, then over the examples kept by `ex_mask_B`."""
    js_B = jnp.sum(js_divergence(logp, logq) * ans_mask_BA, 1) / jnp.maximum(
        ans_mask_BA.sum(1), 1.0)
    return jnp.sum(js_B * ex_mask_B) / jnp.maximum(ex_mask_B.sum(), 1.0)


def load_records(synth: SynthConfig) -> dict[str, list[dict]]:
    """Every split: read from `synth.data_dir` (written by `jaxdyn.temporal.synth.write`)
    or generated in memory (deterministic in `synth.seed`)."""
    if synth.data_dir:
        return {s: load_split(os.path.join(synth.data_dir, f"{s}.jsonl")) for s in SPLITS}
    return generate(synth, synth.seed)


class TemporalObjective:
    """See the module doc; the trainer's interface is `jaxdyn.train.objectives`."""

    def __init__(self, cfg: mlc.ConfigDict):
        self.cfg = cfg
        self.mcfg = ModelConfig.from_dict(cfg.model.to_dict())
        self.tcfg = TemporalConfig(**cfg.temporal)
        self.lc = TemporalLossConfig(**cfg.temporal_loss)
        self.shapes = Shapes(**cfg.shapes)
        self.synth = SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in cfg.synth.items()})
        self.trainable = ("^temporal/",) if self.lc.stage == "adapters" else ()
        self._records = None
        # refused here, before the trainer loads or compiles anything
        self._tok = check_backbone_tokenizer(cfg.tokenizer.kind, cfg.init.checkpoint)

    @property
    def tok(self) -> Tokenizer:
        """The tokenizer of prompts, answers and node names (the trainer's, once `data`)."""
        if self._tok is None:
            self._tok = configured_tokenizer(self.cfg.tokenizer.kind, self.cfg.init.checkpoint)
        return self._tok

    def model(self, routing_mode: str = "topk"):
        if self.lc.adapted:
            return tm.build(self.mcfg, self.tcfg, routing_mode)
        return build(self.mcfg, routing_mode)

    def extend_params(self, params: dict, rng: jax.Array) -> tuple[dict, list[str]]:
        if not self.lc.adapted:
            return params, []
        new = jax.jit(lambda r: tm.init_params(self.mcfg, self.tcfg, r)["temporal"])(rng)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(new))
        return {**params, "temporal": new}, [f"temporal: {n:,} new adapter parameters"]

    # ------------------------------------------------------------------ loss

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array):
        if self.lc.stage == "backbone":
            return self._backbone_loss(model, variables, batch)
        lc = self.lc
        graph = make_graph(batch) if lc.use_graph else None
        tau = batch["tau"]
        out = model.apply(variables, batch["tokens"], compute_logits=False,
                          conditioning={"time": tau if lc.use_time else None, "graph": graph})
        logp = answer_logprobs(out, batch["ans_pos"])
        m = batch["ans_mask"]
        nll = -jnp.take_along_axis(logp, batch["ans_tok"][..., None], axis=-1)[..., 0]
        count = jnp.maximum(m.sum(), 1.0)
        ce = jnp.sum(nll * m) / count
        acc = jnp.sum((jnp.argmax(logp, -1) == batch["ans_tok"]) * m) / count
        reg = jnp.zeros((), jnp.float32)
        if lc.lam > 0 and lc.reg_mode != "none" and lc.adapted and (
                lc.use_time or lc.reg_mode == "all_pairs"):
            a, b = batch["regime"][:, 0], batch["regime"][:, 1]
            if lc.reg_mode == "within":
                tau2 = a + jax.random.uniform(rng, a.shape) * (b - a)
                keep = (b - a >= DAY_TAU).astype(jnp.float32)
            else:  # all_pairs: a random other example's time, no regime (ablation only)
                tau2 = tau[jax.random.permutation(rng, tau.shape[0])]
                keep = jnp.ones_like(tau)
            g2 = None if graph is None else graph._replace(globals={"tau": tau2})
            out2 = model.apply(variables, batch["tokens"], compute_logits=False,
                               conditioning={"time": tau2 if lc.use_time else None,
                                             "graph": g2})
            reg = masked_mean_js(logp, answer_logprobs(out2, batch["ans_pos"]), m, keep)
        stats = {"nll": ce, "accuracy": acc, "tokens": m.sum(), "temporal/js": reg}
        return ce + lc.lam * reg, stats, out.aux

    def _backbone_loss(self, model, variables: dict, batch: dict):
        tokens_BT, w_BT = batch["tokens"], batch["weights"]
        out = model.apply(variables, tokens_BT, compute_logits=False)
        B = tokens_BT.shape[0]
        tgt_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], 1)
        wt_BT = jnp.concatenate([w_BT[:, 1:], jnp.zeros((B, 1), w_BT.dtype)], 1)
        loss, st = chunked_cross_entropy(out.hidden, out.unembed, tgt_BT, wt_BT,
                                         self.cfg.train.loss_chunk)
        return loss, {"nll": st["nll"], "accuracy": st["accuracy"], "tokens": st["tokens"]}, \
            out.aux

    # ------------------------------------------------------------------ data

    def records(self) -> dict[str, list[dict]]:
        if self._records is None:
            self._records = load_records(self.synth)
        return self._records

    def examples(self, recs: list[dict], rename_seed: int | None = None) -> dict:
        """The arrays of a stage: encoded records (adapters) or weighted texts (backbone)."""
        lc, sh = self.lc, self.shapes
        if lc.stage == "adapters":
            return encode(recs, sh, date_in_prompt=lc.date_in_prompt, tok=self.tok)
        rng = np.random.default_rng(rename_seed)
        pairs = [renamed_text(r, rng) if rename_seed is not None and rng.random() < lc.rename
                 else (prompt_text(r), answer_text(r["answer"])) for r in recs]
        return pretrain_arrays(pairs, sh.seq_len, lc.prompt_weight, self.tok)

    def data(self, tok: Tokenizer, rows: int, process_index: int, process_count: int):
        check_vocab(tok, self.mcfg.vocab_size, "the configured model")
        self._tok = tok
        recs = self.records()
        seed = self.cfg.train.seed
        if self.lc.stage == "adapters":
            train = self.examples(recs["train"])
            arrays = lambda epoch: train
        else:  # fresh names every epoch, from (seed, epoch)
            arrays = lambda epoch: self.examples(recs["train"], rename_seed=seed * 100_003
                                                 + epoch)
        it = RecordIterator(arrays, len(recs["train"]), rows // process_count, seed,
                            process_index, process_count)
        evals = fixed_batches(self.examples(recs["validation"]), rows, self.cfg.eval.batches,
                              process_index, process_count)
        return it, evals

    def sample(self, params: dict, tok: Tokenizer) -> str | None:
        """The greedy answer to the first validation record at its date and graph."""
        if self.cfg.sample.max_new_tokens < 1 or self.lc.stage != "adapters":
            return None
        rec = self.records()["validation"][0]
        model = TemporalModel(self.mcfg, self.tcfg, self.shapes, params, tok)
        prompt = prompt_text(rec, self.lc.date_in_prompt)
        use = self.lc.adapted
        out = generate_conditioned(model, prompt, rec["time"] if use else None,
                                   rec if use else None, self.cfg.sample.max_new_tokens)
        return f"{prompt!r} -> {out!r} (answer {rec['answer']!r})"
