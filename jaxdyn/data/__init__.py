"""Training data: documents -> tokens (cached as .npy) -> packed, resumable batches.

Batches are int32 [B, T] "tokens", "positions", "segment_ids" (see `PackedIterator`). Labels
are not shifted here; the loss shifts once. Every document ends with the tokenizer's EOS
(and starts with its BOS when it has one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid

import numpy as np

from jaxdyn.data.errors import (
    DataConfigError,
    DataFieldError,
    DataFormatError,
    DataSourceNotFoundError,
    EmptyDatasetError,
    UnknownSourceError,
)
from jaxdyn.data.packing import PackedIterator, check_shape
from jaxdyn.data.sources import builtin_corpus_files, read_source, split_documents

__all__ = ["DataConfig", "DataConfigError", "DataFieldError", "DataFormatError",
           "DataSourceNotFoundError", "EmptyDatasetError",
           "PackedIterator", "UnknownSourceError", "builtin_corpus_files", "load_documents",
           "make_eval_batches", "make_train_iterator", "text_data", "tokenize_documents"]

_ENCODE_CHUNK = 512  # documents per encode_batch call (bounds peak memory)


@dataclasses.dataclass
class DataConfig:
    """Where documents come from and how they are split.

    source: "builtin" (this interpreter's stdlib .py files), a local .txt/.jsonl/.json/
    .parquet file, folder or glob, or "hub:NAME[:CONFIG]" (HF datasets, network needed).
    """

    source: str = "builtin"
    text_field: str = "text"
    val_fraction: float = 0.02
    max_documents: int = 0  # 0 = all
    cache_dir: str = ""  # token cache (.npy) and HF datasets cache; "" = none


_DOC_CACHE: dict[tuple, tuple[list[str], list[str]]] = {}


def load_documents(cfg: DataConfig, split: str) -> list[str]:
    """Documents of "train" or "validation": a deterministic split by a hash of each text.

    The last source read is memoised per process (re-read after changing its files by
    passing another config, or `_DOC_CACHE.clear()`)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    key = (cfg.source, cfg.text_field, cfg.val_fraction, cfg.max_documents, cfg.cache_dir)
    if key not in _DOC_CACHE:  # one read per process for the tokenizer, train and eval
        docs = read_source(cfg.source, cfg.text_field, cfg.max_documents, cfg.cache_dir)
        _DOC_CACHE.clear()
        _DOC_CACHE[key] = split_documents(docs, cfg.val_fraction)
    train, val = _DOC_CACHE[key]
    if split == "train" and not train:
        raise EmptyDatasetError(f"data source {cfg.source!r} left no training documents; "
                                "lower data.val_fraction or add data")
    return list(train if split == "train" else val)


def _docs_digest(docs: list[str], tokenizer) -> str:
    h = hashlib.sha1(tokenizer.fingerprint().encode())
    for d in docs:
        h.update(hashlib.sha1(d.encode("utf-8", "replace")).digest())
    return h.hexdigest()[:20]


def tokenize_documents(docs: list[str], tokenizer, cache_dir: str = "") -> list[np.ndarray]:
    """One token array per document, [BOS] + ids + [EOS]; cached in `cache_dir` as two .npy
    files (flat tokens, offsets) keyed by the texts and the tokenizer."""
    paths = None
    if cache_dir:
        stem = os.path.join(cache_dir, f"tokens-{_docs_digest(docs, tokenizer)}")
        paths = stem + ".tokens.npy", stem + ".offsets.npy"
        if all(os.path.exists(p) for p in paths):
            flat = np.load(paths[0], allow_pickle=False)
            offsets = np.load(paths[1], allow_pickle=False)
            if len(offsets) == len(docs) + 1:
                return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    pieces, lengths = [], []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK]):
            arr = np.concatenate([np.asarray(prefix, np.int64), ids, [tokenizer.eos_id]])
            pieces.append(arr.astype(dtype))
            lengths.append(len(arr))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if paths:
        os.makedirs(cache_dir, exist_ok=True)
        for p, a in zip(paths, (flat, offsets), strict=True):
            tmp = f"{p}.{uuid.uuid4().hex}.tmp.npy"
            try:
                np.save(tmp, a, allow_pickle=False)
                os.replace(tmp, p)  # atomic: concurrent processes never see half a file
            finally:
                if os.path.exists(tmp):  # a failed save (disk full) leaves no stray file
                    os.remove(tmp)
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def make_train_iterator(cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int,
                        seed: int, process_index: int = 0,
                        process_count: int = 1) -> PackedIterator:
    """Shuffled, infinite, resumable packed batches of this process's training documents."""
    check_shape(seq_len, batch_size)
    docs = load_documents(cfg, "train")
    tokens = tokenize_documents(docs, tokenizer, cfg.cache_dir)
    return PackedIterator(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                          process_index=process_index, process_count=process_count,
                          pad_id=tokenizer.pad_id)


def make_eval_batches(cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int) -> list[dict[str, np.ndarray]]:
    """The validation documents packed in order, one pass, at most `max_batches` (0 = all);
    the last batch is padded with empty rows. Empty list when there is no validation data."""
    check_shape(seq_len, batch_size)
    docs = load_documents(cfg, "validation")
    if not docs:
        return []
    tokens = tokenize_documents(docs, tokenizer, cfg.cache_dir)
    it = PackedIterator(tokens, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False,
                        pad_id=tokenizer.pad_id)
    return it.one_pass(max_batches)


def text_data(cfg, tokenizer, rows: int, process_index: int = 0, process_count: int = 1):
    """(train iterator, validation batches) of a run config's `data` block at `train.seq_len`:
    each process gets `rows // process_count` rows per micro-batch of its own documents, and
    its rows of each global validation batch (`eval.batches` of `rows` rows, 0 = all)."""
    dc = DataConfig(**cfg.data.to_dict())
    if rows % process_count:
        raise DataConfigError(f"micro-batch of {rows} rows must be divisible by the "
                              f"{process_count} processes")
    local = rows // process_count
    it = make_train_iterator(dc, tokenizer, seq_len=cfg.train.seq_len, batch_size=local,
                             seed=cfg.train.seed, process_index=process_index,
                             process_count=process_count)
    lo, hi = process_index * local, (process_index + 1) * local
    evals = [{k: v[lo:hi] for k, v in batch.items()}
             for batch in make_eval_batches(dc, tokenizer, seq_len=cfg.train.seq_len,
                                            batch_size=rows, max_batches=cfg.eval.batches)]
    return it, evals
