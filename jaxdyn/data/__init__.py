"""Training data: documents -> token shards (ArrayRecord, `jaxdyn.data.prepare`) -> packed,
mixed, prefetched, resumable batches (grain, `jaxdyn.data.pipeline`); the in-memory path
(tokens cached as .npy, `PackedIterator`) serves evaluation and library callers.

Batches are int32 [B, T] "tokens", "positions", "segment_ids" (see `PackedIterator`). Labels
are not shifted here; the loss shifts once. Every document ends with the tokenizer's EOS
(and starts with its BOS when it has one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
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
from jaxdyn.data.packing import PackedIterator, PackedRows, check_shape
from jaxdyn.data.pipeline import GrainTextIterator
from jaxdyn.data.prepare import (
    PreparedDocs,
    SourceSpec,
    cache_folder,
    concat_docs,
    finalize_folder,
    is_prepared,
    prepare,
    read_manifest,
)
from jaxdyn.data.sources import builtin_corpus_files, read_source, split_documents

__all__ = ["DataConfig", "DataConfigError", "DataFieldError", "DataFormatError",
           "DataSourceNotFoundError", "EmptyDatasetError", "GrainTextIterator",
           "PackedIterator", "PackedRows", "PreparedDocs", "SourceSpec", "UnknownSourceError",
           "builtin_corpus_files", "grain_train_iterator", "load_documents",
           "make_eval_batches", "make_train_iterator", "prepare", "prepared_eval_batches",
           "prepared_folders", "text_data", "tokenize_documents"]

log = logging.getLogger("jaxdyn.data")
_ENCODE_CHUNK = 512  # documents per encode_batch call (bounds peak memory)


@dataclasses.dataclass
class DataConfig:
    """Where documents come from, how they are split, prepared and read (docs/data.md).

    source: "builtin" (this interpreter's stdlib .py files), a local .txt/.jsonl/.json/
    .parquet file, folder or glob, "hub:NAME[:CONFIG]" (HF datasets, streamed, network
    needed), or a folder written by `python -m jaxdyn.data.prepare`.
    sources: a mixture instead of `source`: entries {"source", "weight", "text_field",
    "split", "max_documents", "sample"} (see `SourceSpec`); rows are drawn by weight.
    mixing: how `weight` turns into draw probabilities. "weights": a source's share of rows is
    its weight (normalised). "tokens": weight × the source's training tokens, i.e. rows come
    as if the sources (each after `sample`) were concatenated and shuffled — the thesis's
    recipe, where each dataset enters with a ratio of itself.
    """

    source: str = "builtin"
    text_field: str = "text"
    val_fraction: float = 0.02
    max_documents: int = 0  # 0 = all
    cache_dir: str = ""  # prepared shards, token cache (.npy), HF datasets cache; "" = none
    sources: tuple = ()  # the mixture; () = the single `source` above with weight 1
    mixing: str = "weights"  # "weights" | "tokens" (weight × training tokens, see above)
    shards: int = 8  # shards per split when the trainer prepares a source (>= processes)
    prefetch_threads: int = 2  # grain threads building rows ahead of the step
    prefetch_buffer: int = 4  # batches read ahead
    workers: int = 0  # grain worker processes (0 = none: threads only)

    def __post_init__(self):
        self.sources = tuple(SourceSpec.of(e) for e in self.sources)
        if self.mixing not in MIXING:
            raise DataConfigError(f"data.mixing={self.mixing!r}; use one of {MIXING}")
        for name in ("shards", "prefetch_buffer"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        for name in ("prefetch_threads", "workers"):
            if getattr(self, name) < 0:
                raise DataConfigError(f"data.{name}={getattr(self, name)} must be >= 0")

    def entries(self) -> tuple[SourceSpec, ...]:
        """The mixture: `sources`, or the single `source` (weight 1)."""
        return self.sources or (SourceSpec(self.source, 1.0, self.text_field, "train",
                                           self.max_documents),)


MIXING = ("weights", "tokens")
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


def _barrier(name: str, process_count: int) -> None:
    """All processes of a multi-process job reach this point (a no-op for one process)."""
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepared_folders(cfg: DataConfig, tokenizer, process_index: int = 0,
                     process_count: int = 1) -> list[str]:
    """The prepared folder of each mixture entry: the entry itself when it is one, else
    `<cache_dir>/prepared/<key>`, prepared now if needed (each process writes its own shards,
    then, after a barrier, the manifest; the cache must be shared by them)."""
    root = cfg.cache_dir or os.path.join(tempfile.gettempdir(), "jaxdyn-data")
    folders, todo = [], []
    for spec in cfg.entries():
        if is_prepared(spec.source):
            if spec.sample < 1:
                raise DataConfigError(f"data source {spec.source!r} is a prepared folder; "
                                      f"sample={spec.sample} applies when preparing: prepare "
                                      "it with --sample, or name the raw source here")
            folders.append(spec.source)
            continue
        folder = cache_folder(root, spec, tokenizer, val_fraction=cfg.val_fraction,
                              shards=cfg.shards)
        folders.append(folder)
        if not is_prepared(folder):
            todo.append((spec, folder))
    for spec, folder in todo:
        prepare(spec, tokenizer, folder, val_fraction=cfg.val_fraction, shards=cfg.shards,
                process_index=process_index, process_count=process_count,
                cache_dir=cfg.cache_dir, finalize=process_count == 1)
    if todo and process_count > 1:
        _barrier("jaxdyn: data shards written", process_count)
        for _, folder in todo:  # every process: the same manifest, written atomically, and
            if finalize_folder(folder) is None:  # the same error everywhere (none waits)
                raise EmptyDatasetError(f"{folder!r}: shards are missing after every "
                                        "process prepared its own; is data.cache_dir "
                                        "shared by all processes?")
    for folder in folders:
        check_tokenizer(folder, tokenizer)
    return folders


def check_tokenizer(folder: str, tokenizer) -> None:
    """A prepared folder must hold this tokenizer's ids."""
    got = read_manifest(folder)["tokenizer"]["fingerprint"]
    if got != tokenizer.fingerprint():
        raise DataConfigError(f"prepared folder {folder!r} was tokenised with another "
                              f"tokenizer (fingerprint {got}, this run {tokenizer.fingerprint()});"
                              " prepare it again with this run's tokenizer")


def grain_train_iterator(cfg: DataConfig, tokenizer, *, seq_len: int, batch_size: int,
                         seed: int, process_index: int = 0,
                         process_count: int = 1) -> GrainTextIterator:
    """Batches of this process's shards of every source, mixed by weight (docs/data.md)."""
    folders = prepared_folders(cfg, tokenizer, process_index, process_count)
    docs = [PreparedDocs(f, "train", shard_index=process_index, shard_count=process_count)
            for f in folders]
    for d in docs:
        log.info("data: process %d of %d reads %d shard(s) of %s: %s", process_index,
                 process_count, len(d.files), d.folder, [os.path.basename(f) for f in d.files])
    return GrainTextIterator(docs, mixture_weights(cfg, folders), seq_len=seq_len,
                             batch_size=batch_size, seed=seed, pad_id=tokenizer.pad_id,
                             process_index=process_index, process_count=process_count,
                             threads=cfg.prefetch_threads, buffer=cfg.prefetch_buffer,
                             workers=cfg.workers)


def mixture_weights(cfg: DataConfig, folders: list[str]) -> list[float]:
    """Draw weights of the prepared sources: `weight`, or weight × the source's training
    tokens (from its manifest, the same on every process) when `mixing="tokens"`."""
    weights = [float(e.weight) for e in cfg.entries()]
    if cfg.mixing == "tokens":
        weights = [w * read_manifest(f)["tokens"]["train"] for w, f in
                   zip(weights, folders, strict=True)]
    return weights


def prepared_eval_batches(folders: list[str], tokenizer, *, seq_len: int, batch_size: int,
                          max_batches: int) -> list[dict[str, np.ndarray]]:
    """The validation documents of the folders (in order, source after source) packed in
    order, one pass, at most `max_batches` (0 = all), the last batch padded with empty rows;
    only the documents these batches need are read."""
    check_shape(seq_len, batch_size)
    parts = [PreparedDocs(f, "validation") for f in folders]
    lengths, read = concat_docs([p for p in parts if len(p)])
    if not len(lengths):
        return []
    rows = PackedRows(lengths, read, seq_len=seq_len, seed=0, shuffle=False,
                      pad_id=tokenizer.pad_id)
    n = rows.epoch_start(1)
    out = []
    for first in range(0, n, batch_size):
        if max_batches > 0 and len(out) == max_batches:
            break
        b = rows.empty_batch(batch_size)
        for r in range(first, min(first + batch_size, n)):
            for k, v in rows.row(r).items():
                b[k][r - first] = v
        out.append(b)
    return out


def text_data(cfg, tokenizer, rows: int, process_index: int = 0, process_count: int = 1):
    """(train iterator, validation batches) of a run config's `data` block at `train.seq_len`:
    each process gets `rows // process_count` rows per micro-batch of its own shards, and its
    rows of each global validation batch (`eval.batches` of `rows` rows, 0 = all). Sources
    are prepared into shards first when they are not prepared folders (docs/data.md)."""
    dc = DataConfig(**cfg.data.to_dict())
    if rows % process_count:
        raise DataConfigError(f"micro-batch of {rows} rows must be divisible by the "
                              f"{process_count} processes")
    local = rows // process_count
    it = grain_train_iterator(dc, tokenizer, seq_len=cfg.train.seq_len, batch_size=local,
                              seed=cfg.train.seed, process_index=process_index,
                              process_count=process_count)
    lo, hi = process_index * local, (process_index + 1) * local
    folders = [d.folder for d in it.docs]
    evals = [{k: v[lo:hi] for k, v in batch.items()}
             for batch in prepared_eval_batches(folders, tokenizer, seq_len=cfg.train.seq_len,
                                                batch_size=rows, max_batches=cfg.eval.batches)]
    return it, evals
