"""Tokenise a document source once into sharded ArrayRecord files (`python -m
jaxdyn.data.prepare`), and read them back.

A prepared folder holds, per split (`train`, `validation`), `N` shards
`<split>-SSSSS-of-NNNNN.array_record` (one record per document: its token ids,
[BOS] + ids + [EOS], as little-endian uint16 or int32 bytes), beside each shard its document
lengths (`.lengths.npy`) and its statistics (`.json`, written last: a shard is complete when
it exists), `prepare.json` (what is prepared: tokenizer, source, split rule, shard count) and,
once every shard is complete, `manifest.json` (that plus the shard list with document and
token counts). The n-th training document of the source (in source order, counting training
documents only) goes to train shard n mod N; validation documents likewise.

Writers: process p of P writes the shards s with s mod P == p (each writer streams the whole
source and tokenises only its own documents), each to a temporary name renamed into place, and
skips shards already complete, so an interrupted preparation resumes shard by shard. JSON and
.npy files go through `etils.epath`; the ArrayRecord files themselves are read and written by
its C++ library through local (or mounted) paths only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sysconfig
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from etils import epath

from jaxdyn.data.errors import DataConfigError, EmptyDatasetError
from jaxdyn.data.sources import _local_files, doc_key, iter_documents, sample_key

FORMAT = 1
MANIFEST, HEADER = "manifest.json", "prepare.json"
SPLITS = ("train", "validation")
_CHUNK = 256  # documents per encode_batch call


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of `data.sources`: where documents come from and its mixture weight.

    source: "builtin", a local .txt/.jsonl/.json/.parquet file, folder or glob,
    "hub:NAME[:CONFIG]" (streamed), or a folder prepared by `python -m jaxdyn.data.prepare`
    (it holds manifest.json; then text_field/split/max_documents are the folder's own)."""

    source: str = "builtin"
    weight: float = 1.0  # share of training rows drawn from this source (normalised)
    text_field: str = "text"  # column of JSON/Parquet/hub rows holding the text
    split: str = "train"  # hub split to stream
    max_documents: int = 0  # 0 = all (counted before `sample`)
    # Keep this fraction of the documents: a deterministic random subset chosen by a salted
    # hash of each text (`sample_key`, independent of the validation split), e.g. the DynaMo
    # recipe's 5 % of the Pile or the thesis's per-dataset ratios. 1.0 = every document.
    sample: float = 1.0

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise DataConfigError(f"data source {self.source!r} must be a non-empty string")
        if not float(self.weight) > 0:
            raise DataConfigError(f"data source {self.source!r} has weight {self.weight}; "
                                  "weights must be > 0 (drop the entry instead)")
        if self.max_documents < 0:
            raise DataConfigError(f"data source {self.source!r}: max_documents="
                                  f"{self.max_documents} must be >= 0 (0 = all)")
        if not 0.0 < float(self.sample) <= 1.0:
            raise DataConfigError(f"data source {self.source!r}: sample={self.sample} must be "
                                  "a fraction in (0, 1] (1 = every document)")

    @classmethod
    def of(cls, entry) -> SourceSpec:
        """An entry as a SourceSpec: a SourceSpec, a mapping (dict / ConfigDict) or a string."""
        if isinstance(entry, SourceSpec):
            return entry
        if isinstance(entry, str):
            return cls(source=entry)
        if hasattr(entry, "to_dict"):
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise DataConfigError(f"data.sources entry {entry!r} must be a dict like "
                                  "{'source': 'builtin', 'weight': 1.0, 'text_field': 'text'}")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(entry) - known)
        if bad:
            raise DataConfigError(f"data.sources entry {entry!r} has unknown key(s) {bad}; "
                                  f"use {sorted(known)}")
        return cls(**entry)


def is_prepared(path: str) -> bool:
    """Whether `path` is a folder prepared by `prepare` (it holds manifest.json)."""
    return "://" not in path and (epath.Path(path) / MANIFEST).exists()


def shard_name(split: str, shard: int, count: int) -> str:
    return f"{split}-{shard:05d}-of-{count:05d}.array_record"


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32).newbyteorder("<")


def source_version(spec: SourceSpec) -> dict:
    """What identifies the source's content without reading it: the stdlib of this Python
    (builtin), the matched files' sizes and modification times (local), the name (hub)."""
    if spec.source == "builtin":
        return {"stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}
    if spec.source.startswith("hub:"):
        return {"hub": spec.source[4:], "split": spec.split}
    files = _local_files(spec.source)
    return {"files": [[f, os.path.getsize(f), int(os.path.getmtime(f))] for f in files]}


def header(spec: SourceSpec, tokenizer, *, val_fraction: float, shards: int) -> dict:
    """What a prepared folder holds (prepare.json; the manifest adds the shard list)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shards < 1:
        raise DataConfigError(f"shards={shards} must be >= 1")
    return {"format": FORMAT,
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(),
                          "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                          "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
            "dtype": token_dtype(tokenizer).str,
            "source": {"source": spec.source, "text_field": spec.text_field,
                       "split": spec.split, "max_documents": spec.max_documents,
                       "version": source_version(spec),
                       **({"sample": float(spec.sample)} if spec.sample < 1 else {})},
            "split_rule": {"kind": "sha1", "val_fraction": val_fraction,
                           "rule": "validation when the first 8 bytes of sha1(utf-8 text), "
                                   "as a fraction of 2**64, are below val_fraction"},
            "shards_per_split": shards}


def cache_folder(root: str, spec: SourceSpec, tokenizer, *, val_fraction: float,
                 shards: int) -> str:
    """`<root>/prepared/<key>`: the folder `text_data` prepares a source into, keyed by
    everything in its header (so a changed file, tokenizer or split rule prepares anew)."""
    h = header(spec, tokenizer, val_fraction=val_fraction, shards=shards)
    key = hashlib.sha1(json.dumps(h, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() else "_" for c in spec.source)[-40:].strip("_")
    return os.fspath(epath.Path(root) / "prepared" / f"{name}-{key}")


# ----------------------------------------------------------------------------- writing


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _complete(folder: epath.Path, split: str, shard: int, count: int) -> bool:
    return (folder / (shard_name(split, shard, count) + ".json")).exists()


class _ShardWriter:
    """One shard being written under a temporary name."""

    def __init__(self, folder: epath.Path, split: str, shard: int, count: int) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = folder / shard_name(split, shard, count)
        self.tmp = folder / f"{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.writer = ArrayRecordWriter(os.fspath(self.tmp), "group_size:1")
        self.lengths: list[int] = []
        self.min_key = (2.0, -1)  # (split key, record) of its lowest-key document

    def add(self, tokens: np.ndarray, key: float) -> None:
        self.min_key = min(self.min_key, (key, len(self.lengths)))
        self.writer.write(tokens.tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> None:
        self.writer.close()
        self.tmp.replace(self.path)
        lengths = np.asarray(self.lengths, np.int64)
        _write_atomic(self.path.parent / (self.path.name + ".lengths.npy"), _npy_bytes(lengths))
        stats = {"docs": len(lengths), "tokens": int(lengths.sum()),
                 "min_key": self.min_key[0] if self.lengths else None,
                 "min_key_record": self.min_key[1] if self.lengths else None}
        _write_atomic(self.path.parent / (self.path.name + ".json"),
                      json.dumps(stats).encode())  # last: the shard is complete

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def prepare(spec: SourceSpec, tokenizer, folder: str, *, val_fraction: float = 0.02,
            shards: int = 8, process_index: int = 0, process_count: int = 1,
            cache_dir: str = "", finalize: bool = True) -> dict | None:
    """Write this writer's shards of `spec` into `folder` (skipping complete ones); then, if
    every shard of every writer is complete and `finalize`, the manifest. Returns the
    manifest, or None while other writers' shards are missing."""
    if not 0 <= process_index < process_count:
        raise DataConfigError(f"process_index={process_index} must be in [0, "
                              f"process_count={process_count})")
    if process_count > shards:
        raise DataConfigError(f"{process_count} writers for {shards} shards per split: "
                              "each writer needs a shard; raise the shard count")
    out = epath.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    head = header(spec, tokenizer, val_fraction=val_fraction, shards=shards)
    hfile = out / HEADER
    if hfile.exists():
        old = json.loads(hfile.read_text())
        if old != json.loads(json.dumps(head)):
            raise DataConfigError(f"{folder!r} holds another preparation ({HEADER} differs: "
                                  "source, files, tokenizer, split rule or shard count); use "
                                  "another folder or delete it")
    else:
        _write_atomic(hfile, json.dumps(head, indent=1).encode())
    todo = {(split, s) for split in SPLITS for s in range(process_index, shards, process_count)
            if not _complete(out, split, s, shards)}
    if todo:
        _write_shards(spec, tokenizer, out, todo, val_fraction, shards, cache_dir)
    if not finalize:
        return None
    return finalize_folder(folder)


def _documents(spec: SourceSpec, val_fraction: float,
               cache_dir: str) -> Iterator[tuple[str, int, str, float]]:
    """(split, index within the split, text, key) of every document, in source order."""
    counts = {"train": 0, "validation": 0}
    for text in iter_documents(spec.source, spec.text_field, spec.max_documents, cache_dir,
                               spec.split):
        if spec.sample < 1 and sample_key(text) >= spec.sample:
            continue
        key = doc_key(text)
        split = "validation" if key < val_fraction else "train"
        yield split, counts[split], text, key
        counts[split] += 1


def _write_shards(spec, tokenizer, out: epath.Path, todo: set, val_fraction: float,
                  shards: int, cache_dir: str) -> None:
    writers = {k: _ShardWriter(out, k[0], k[1], shards) for k in sorted(todo)}
    dtype = token_dtype(tokenizer)
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    pending: list[tuple[_ShardWriter, str, float]] = []

    def flush():
        ids = tokenizer.encode_batch([t for _, t, _ in pending])
        for (w, _, key), x in zip(pending, ids, strict=True):
            w.add(np.concatenate([np.asarray(prefix, np.int64), x,
                                  [tokenizer.eos_id]]).astype(dtype), key)
        pending.clear()

    try:
        for split, n, text, key in _documents(spec, val_fraction, cache_dir):
            w = writers.get((split, n % shards))
            if w is not None:
                pending.append((w, text, key))
                if len(pending) >= _CHUNK:
                    flush()
        flush()
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            if w.tmp.exists():
                w.abort()
        raise


def finalize_folder(folder: str) -> dict | None:
    """Write manifest.json once every shard is complete (None while some are missing).

    A validation split left empty by the hash rule (tiny corpora) borrows the lowest-key
    training document, recorded as `validation_fallback`, with a warning; a source without any
    training document is an EmptyDatasetError."""
    out = epath.Path(folder)
    if (out / MANIFEST).exists():
        return json.loads((out / MANIFEST).read_text())
    head = json.loads((out / HEADER).read_text())
    n = head["shards_per_split"]
    if not all(_complete(out, split, s, n) for split in SPLITS for s in range(n)):
        return None
    listing = {}
    for split in SPLITS:
        listing[split] = []
        for s in range(n):
            name = shard_name(split, s, n)
            st = json.loads((out / (name + ".json")).read_text())
            listing[split].append({"file": name, **st})
    total = {split: sum(x["docs"] for x in listing[split]) for split in SPLITS}
    src = head["source"]["source"]
    if not total["train"]:
        raise EmptyDatasetError(f"data source {src!r} left no training documents; lower "
                                "data.val_fraction or add data")
    manifest = {**head, "shards": listing, "documents": total,
                "tokens": {split: sum(x["tokens"] for x in listing[split]) for split in SPLITS}}
    if head["split_rule"]["val_fraction"] > 0 and not total["validation"]:
        best = min((x for x in listing["train"] if x["docs"]), key=lambda x: x["min_key"])
        manifest["validation_fallback"] = {"file": best["file"],
                                           "record": best["min_key_record"]}
        warnings.warn(f"data source {src!r}: no document fell into validation; validation "
                      "reuses the lowest-key training document", stacklevel=2)
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(folder: str) -> dict:
    path = epath.Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder!r} holds no {MANIFEST}: it is not a finished "
                                "prepared folder; run `python -m jaxdyn.data.prepare` (again)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- reading


class PreparedDocs:
    """The documents of one split of a prepared folder, in source order, read lazily.

    `shard_index`/`shard_count` (e.g. from `grain.ShardByJaxProcess`) keep only the shards s
    with s mod shard_count == shard_index: a host opens nothing else. `lengths` are known
    without reading a document; `read(i, a, b)` reads tokens a:b of document i."""

    def __init__(self, folder: str, split: str, *, shard_index: int = 0,
                 shard_count: int = 1) -> None:
        import grain.python as grain

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        m = read_manifest(folder)
        self.folder, self.split, self.manifest = folder, split, m
        self.dtype = np.dtype(m["dtype"])
        n = m["shards_per_split"]
        if shard_count > n:
            raise DataConfigError(f"{folder!r} has {n} {split} shards but {shard_count} "
                                  "processes read it: prepare it again with at least one shard "
                                  "per process (--shards / data.shards)")
        base = epath.Path(folder)
        files, lengths, index = [], [], []
        for s, entry in enumerate(m["shards"][split]):
            if s % shard_count != shard_index or not entry["docs"]:
                continue
            lens = np.load(io_bytes(base / (entry["file"] + ".lengths.npy")))
            files.append(os.fspath(base / entry["file"]))
            lengths.append(lens)
            index.append(s + n * np.arange(len(lens), dtype=np.int64))  # source order
        if split == "validation" and "validation_fallback" in m:
            fb = m["validation_fallback"]
            lens = np.load(io_bytes(base / (fb["file"] + ".lengths.npy")))
            lens = lens[fb["record"]:fb["record"] + 1]
            files.append(os.fspath(base / fb["file"]))
            lengths.append(lens)
            index.append(np.zeros(1, np.int64))
            self._fallback = fb["record"]
        else:
            self._fallback = None
        self.files = files
        self._source = grain.ArrayRecordDataSource(files) if files else None
        counts = [len(x) for x in lengths]
        first = np.concatenate([[0], np.cumsum(counts)])[:-1].astype(np.int64)
        records = np.concatenate([f + np.arange(c) for f, c in zip(first, counts, strict=True)]) \
            if files else np.zeros(0, np.int64)
        if self._fallback is not None:  # the one record of the borrowed training shard
            records[-1] = first[-1] + self._fallback
        order = np.argsort(np.concatenate(index), kind="stable") if files else records
        self.lengths = np.concatenate(lengths)[order] if files else np.zeros(0, np.int64)
        self.records = records[order]

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        raw = self._source[int(self.records[doc])]
        return np.frombuffer(raw, self.dtype)[start:stop]


def io_bytes(path: epath.Path):
    """A binary file object of `path` read whole (np.load needs a seekable file)."""
    import io

    return io.BytesIO(path.read_bytes())


def concat_docs(parts: Sequence[PreparedDocs]) -> tuple[np.ndarray, Callable]:
    """(lengths, read) of several document lists one after the other."""
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
    bounds = np.cumsum([len(p) for p in parts])

    def read(doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        k = int(np.searchsorted(bounds, doc, side="right"))
        return parts[k].read(doc - int(bounds[k - 1] if k else 0), start, stop)

    return lengths, read


def _prepare_one(args: tuple) -> None:
    spec, tokenizer, folder, kw = args
    prepare(spec, tokenizer, folder, finalize=False, **kw)


def prepare_parallel(spec: SourceSpec, tokenizer, folder: str, *, workers: int = 1,
                     **kw) -> dict | None:
    """`prepare` with `workers` local writer processes (writer i of `workers`), then the
    manifest. `kw`: val_fraction, shards, cache_dir."""
    if workers <= 1:
        return prepare(spec, tokenizer, folder, **kw)
    import multiprocessing

    jobs = [(spec, tokenizer, folder, {**kw, "process_index": i, "process_count": workers})
            for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_prepare_one, jobs)
    return finalize_folder(folder)
