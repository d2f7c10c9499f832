"""Perplexity and bits per byte of a checkpoint on a corpus: `python -m jaxdyn.evaluate`.

    python -m jaxdyn.evaluate --checkpoint runs/std                  # built-in validation split
    python -m jaxdyn.evaluate --checkpoint runs/mod --data notes.txt    # every document of a file
    python -m jaxdyn.evaluate --checkpoint imports/qwen2.5-0.5b \
        --data hub:wikitext:wikitext-2-raw-v1 --split validation --max_batches 50

Documents come from `jaxdyn.data` sources and are tokenized and packed like training data
(BOS/EOS, segment ids, positions restarting per document); the NLL is the trainer's chunked
cross-entropy (`jaxdyn.model.loss`: one label shift, no target across a document boundary) summed
over every target, so `ppl = exp(Σ nll / #targets)` exactly.

`bits_per_byte = Σ nll / ln 2 / bytes`, where bytes = #targets × (UTF-8 bytes ÷ targets of the
documents read): exact for the byte tokenizer, a tokens-per-byte estimate otherwise.
Routed models (MoD, DTF) also report each routed unit's selected fraction (`router/layer_i/
selected_frac`, token-weighted) under the chosen router (`--routing_mode`). Multi-token
checkpoints report PPL_i per head and PPL_{1:n} (docs/features/multitoken.md).

On a mesh (`evaluate(..., mesh=)`, or the one the params are placed on) the forward is jitted
with the parameters in their rules-table shardings (as in training; multi-token heads too) and
each batch split over the `batch` rule's axes (data x fsdp), padded with empty rows (segment 0,
no targets) to a multiple of their size; the sums are the same as on one device.

Dimension legend: n heads, B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdyn import sharding
from jaxdyn.data import DataConfig, PackedIterator, load_documents, tokenize_documents
from jaxdyn.model import ModelConfig, build, param_shardings
from jaxdyn.model.loss import chunked_cross_entropy, shifted_targets
from jaxdyn.model.units import flatten_aux
from jaxdyn.multitoken.heads import ExtraHeads, all_hidden, heads_of, multitoken_model

SPLITS = ("validation", "train", "all")


@dataclasses.dataclass
class Corpus:
    batches: list[dict[str, np.ndarray]]
    documents: int
    bytes_per_target: float  # UTF-8 bytes ÷ targets over the documents read


def load_corpus(tok, source: str = "builtin", split: str | None = None, *, seq_len: int = 512,
                batch_size: int = 8, max_batches: int = 0, max_documents: int = 0,
                text_field: str = "text", cache_dir: str = "") -> Corpus:
    """Packed eval batches of a `jaxdyn.data` source. `split`: validation | train (the
    trainer's hash split) | all; default validation for builtin, all for anything else."""
    split = split or ("validation" if source == "builtin" else "all")
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: use one of {SPLITS}")
    dc = DataConfig(source=source, text_field=text_field, max_documents=max_documents,
                    cache_dir=cache_dir, val_fraction=0.0 if split == "all" else 0.02)
    texts = load_documents(dc, "train" if split == "all" else split)
    if not texts:
        raise ValueError(f"data source {source!r} has no {split} documents")
    docs = tokenize_documents(texts, tok, cache_dir)
    it = PackedIterator(docs, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False,
                        pad_id=tok.pad_id)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_targets = sum(max(len(d) - 1, 0) for d in docs)
    return Corpus(it.one_pass(max_batches), len(texts), n_bytes / max(n_targets, 1))


@functools.lru_cache(maxsize=8)
def eval_param_shardings(cfg: ModelConfig, n_heads: int, head_depth: int, mesh: Mesh) -> dict:
    """Rules-table shardings of the evaluated model's parameters (with heads 2..n)."""
    heads = ExtraHeads(n_heads, head_depth) if n_heads > 1 else None
    return param_shardings(cfg, mesh, heads=heads)


@functools.lru_cache(maxsize=8)
def _sums_fn(cfg: ModelConfig, routing_mode: str, n_heads: int, head_depth: int, chunk: int,
             mesh: Mesh | None = None):
    """Jitted batch -> (nll sums [n], target counts [n], joint nll over V_n, aux)."""
    if n_heads > 1:
        model = multitoken_model(cfg, n_heads, head_depth)
    else:
        model = build(cfg, routing_mode=routing_mode)

    def fn(params, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        if n_heads > 1:
            out = model.apply({"params": params}, tokens, batch["positions"], seg)
            hidden = all_hidden(out)
        else:
            out = model.apply({"params": params}, tokens, batch["positions"], seg,
                              compute_logits=False)
            hidden = out.hidden[None]
        _, mask_n = shifted_targets(tokens, seg, n_heads)
        sums, counts, joint = [], [], jnp.zeros((), jnp.float32)
        for i in range(1, n_heads + 1):
            tgt, mask = shifted_targets(tokens, seg, i)
            nll, m = chunked_cross_entropy(hidden[i - 1], out.unembed, tgt, mask, chunk)
            sums.append(nll * m["tokens"])
            counts.append(m["tokens"])
            if n_heads > 1:
                nll_n, m_n = chunked_cross_entropy(hidden[i - 1], out.unembed, tgt, mask_n, chunk)
                joint = joint + nll_n * m_n["tokens"]
        return jnp.stack(sums), jnp.stack(counts), joint, out.aux

    if mesh is None:
        return jax.jit(fn)
    p_sh = eval_param_shardings(cfg, n_heads, head_depth, mesh)
    return jax.jit(fn, in_shardings=(p_sh, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Empty rows (segment 0: no targets) appended up to a multiple of `multiple` rows."""
    extra = -len(batch["tokens"]) % multiple
    if not extra:
        return batch
    return {k: np.concatenate([np.asarray(v), np.zeros((extra, *np.shape(v)[1:]),
                                                        np.asarray(v).dtype)])
            for k, v in batch.items()}


def evaluate(cfg: ModelConfig, params, batches: Sequence[dict], *, routing_mode: str = "topk",
             bytes_per_target: float | None = None, chunk: int = 1024,
             mesh: Mesh | None = None) -> dict[str, float]:
    """`nll` (mean nats per target), `ppl`, `tokens` (targets), `bits_per_byte`; routed:
    `router/...` metrics weighted by targets; multi-token: `mtp/ppl_i`, `mtp/ppl_1:n`.
    `mesh`: shard over it (default: the mesh the params are placed on, if any)."""
    if not batches:
        raise ValueError("no evaluation batches: the data source gave no documents")
    n, depth = heads_of(params) if cfg.arch == "dense" else (1, 1)
    mesh = mesh if mesh is not None else sharding.mesh_of(params)
    fn = _sums_fn(cfg, routing_mode, n, depth, chunk, mesh)
    if mesh is not None:
        p_sh = eval_param_shardings(cfg, n, depth, mesh)
        params = jax.device_put({k: params[k] for k in p_sh}, p_sh)
    sums, counts, joint, aux_acc, weight = np.zeros(n), np.zeros(n), 0.0, {}, 0.0
    for b in batches:
        if mesh is not None:
            rows = sharding.batch_sharding(mesh)
            b = {k: sharding.put_global(v, rows)
                 for k, v in _pad_rows(b, sharding.batch_multiple(mesh)).items()}
            with jax.set_mesh(mesh), sharding.rules_context():
                s, c, j, aux = jax.device_get(fn(params, b))
        else:
            s, c, j, aux = jax.device_get(fn(params, b))
        sums, counts, joint = sums + s, counts + c, joint + float(j)
        w = float(c[0])
        for k, v in flatten_aux(aux).items():
            aux_acc[k] = aux_acc.get(k, 0.0) + w * v
        weight += w
    nll = float(sums[0] / max(counts[0], 1))
    out = {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": int(counts[0])}
    if bytes_per_target:
        out["bits_per_byte"] = nll / math.log(2) / bytes_per_target
    out.update({k: v / max(weight, 1.0) for k, v in sorted(aux_acc.items())
                if not k.startswith("router/loss_")})
    if n > 1:
        for i in range(n):
            out[f"mtp/ppl_{i + 1}"] = math.exp(min(sums[i] / max(counts[i], 1), 700.0))
        out[f"mtp/ppl_1:{n}"] = math.exp(min(joint / max(n * counts[-1], 1), 700.0))
    return out
