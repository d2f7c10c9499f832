"""Co-occurrence tables of contiguous n-grams (DynaMo's co-occurrence weighted masking).

`python -m jaxdyn.multitoken cooccur --data … --out DIR` counts unigrams, pairs and triples (4-grams
optional) of token ids *inside documents* (n-grams never cross a boundary). An n-gram
(a, b, c) is the int64 key ((a·V + b)·V + c). Keys are buffered, deduplicated into sorted runs
on disk and k-way merged with summed counts, so memory stays bounded by the buffer.

On disk (`np.save`, `allow_pickle=False`; loaded memory-mapped):
`meta.json`, `unigram_counts.npy` [V], `{pairs,triples,quads}_{keys,counts}.npy` (sorted).

The ratio ρ(tuple) = p̂_n(tuple) / Π_j p̂_1(tuple_j) weighs the product of head distributions;
an unseen n-gram gives ρ = 0 (the mask). The table ignores the context x_{1:t}.

Dimension legend: N queries, K n-gram order, V vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxdyn.data import DataConfig, load_documents, tokenize_documents
from jaxdyn.data.tokenizer import byte_tokenizer, load_tokenizer

NAMES = {2: "pairs", 3: "triples", 4: "quads"}
MAX_VOCAB = {2: 3_037_000_499, 3: 2_097_151, 4: 55_108}  # V^K < 2^63
JSONL_FORMAT = ('each line must be {"tokens": [id, ...]} or a JSON list of integer token ids '
                "(to count text, pass --tokenizer DIR)")


class CooccurInputError(ValueError):
    """An input file of the co-occurrence counter is not in a format it reads."""


def encode(ngrams_NK: np.ndarray, vocab: int) -> np.ndarray:
    """int64 keys of n-grams given as rows of token ids."""
    g = np.asarray(ngrams_NK, np.int64)
    key = g[:, 0].copy()
    for j in range(1, g.shape[1]):
        key = key * vocab + g[:, j]
    return key


def doc_keys(doc: np.ndarray, vocab: int, order: int) -> np.ndarray:
    """Keys of every contiguous `order`-gram of one document."""
    d = np.asarray(doc, np.int64)
    n = len(d) - order + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    key = d[:n].copy()
    for j in range(1, order):
        key = key * vocab + d[j:j + n]
    return key


def _write_run(run_dir: Path, order: int, idx: int, keys: np.ndarray) -> tuple[Path, Path]:
    uk, uc = np.unique(keys, return_counts=True)
    kp, cp = run_dir / f"o{order}_{idx}_keys.npy", run_dir / f"o{order}_{idx}_counts.npy"
    np.save(kp, uk, allow_pickle=False)
    np.save(cp, uc.astype(np.int64), allow_pickle=False)
    return kp, cp


def merge_runs(runs: Sequence[tuple[Path, Path]], out_keys: Path, out_counts: Path,
               window: int = 1 << 20, min_count: int = 1) -> int:
    """k-way merge of sorted unique runs, summing counts; writes two .npy files, returns size.

    Each round takes up to `window` keys from every run, merges everything <= the smallest of
    the runs' window-last keys (so no key is split across rounds) and appends it to raw files.
    """
    ks = [np.load(k, mmap_mode="r") for k, _ in runs]
    cs = [np.load(c, mmap_mode="r") for _, c in runs]
    ptr = [0] * len(runs)
    raw_k, raw_c = out_keys.with_suffix(".raw"), out_counts.with_suffix(".raw")
    total = 0
    with open(raw_k, "wb") as fk, open(raw_c, "wb") as fc:
        while True:
            live = [r for r in range(len(runs)) if ptr[r] < len(ks[r])]
            if not live:
                break
            bound = min(ks[r][min(ptr[r] + window, len(ks[r])) - 1] for r in live)
            part_k, part_c = [], []
            for r in live:
                hi = ptr[r] + int(np.searchsorted(ks[r][ptr[r]:ptr[r] + window], bound, "right"))
                part_k.append(np.asarray(ks[r][ptr[r]:hi]))
                part_c.append(np.asarray(cs[r][ptr[r]:hi]))
                ptr[r] = hi
            k, c = np.concatenate(part_k), np.concatenate(part_c)
            perm = np.argsort(k, kind="stable")
            k, c = k[perm], c[perm]
            starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
            uk, uc = k[starts], np.add.reduceat(c, starts)
            keep = uc >= min_count
            uk[keep].astype(np.int64).tofile(fk)
            uc[keep].astype(np.int64).tofile(fc)
            total += int(keep.sum())
    for raw, out in ((raw_k, out_keys), (raw_c, out_counts)):
        arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.int64, shape=(total,))
        if total:
            arr[:] = np.memmap(raw, np.int64, "r", shape=(total,))
        arr.flush()
        del arr
        raw.unlink()
    return total


def build_tables(docs: Iterable[np.ndarray], vocab_size: int, out_dir: str | Path,
                 max_order: int = 3, buffer_keys: int = 1 << 22, min_count: int = 1,
                 fingerprint: str = "") -> dict:
    """Count n-grams (n = 1..max_order) within documents and write the tables to `out_dir`.

    The tables are counted in a hidden folder beside `out_dir` and moved in only when done: an
    error (a bad input record, say) leaves `out_dir` as it was."""
    if max_order not in (2, 3, 4):
        raise ValueError(f"max_order must be 2, 3 or 4, got {max_order}")
    if vocab_size > MAX_VOCAB[max_order]:
        raise ValueError(f"V={vocab_size} is too large for int64 keys of order {max_order} "
                         f"(needs V <= {MAX_VOCAB[max_order]}); lower --max_order")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"tables folder {str(out)!r} is a file; give a folder")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        meta = _count(docs, vocab_size, stage, max_order, buffer_keys, min_count, fingerprint)
        _publish(stage, out)
    except BaseException:  # nothing half-written is left behind, not even new parent folders
        shutil.rmtree(stage, ignore_errors=True)
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return meta


def _publish(stage: Path, out: Path) -> None:
    """Move finished tables into `out`: a rename when it is new, else file by file with
    meta.json last (a reader never sees a meta.json ahead of its tables)."""
    try:
        os.rename(stage, out)
        return
    except OSError:
        if not out.is_dir():
            raise
    names = sorted(p.name for p in stage.iterdir())
    for name in sorted(names, key=lambda n: n == "meta.json"):
        os.replace(stage / name, out / name)
    stage.rmdir()


def _count(docs: Iterable[np.ndarray], vocab_size: int, out: Path, max_order: int,
           buffer_keys: int, min_count: int, fingerprint: str) -> dict:
    """The tables of `docs`, written to the new folder `out`."""
    run_dir = out / "_runs"
    run_dir.mkdir(parents=True)
    orders = range(2, max_order + 1)
    uni = np.zeros(vocab_size, np.int64)
    totals = {n: 0 for n in range(1, max_order + 1)}
    bufs: dict[int, list[np.ndarray]] = {n: [] for n in orders}
    runs: dict[int, list[tuple[Path, Path]]] = {n: [] for n in orders}
    n_docs = 0

    def flush(n):
        if bufs[n]:
            runs[n].append(_write_run(run_dir, n, len(runs[n]), np.concatenate(bufs[n])))
            bufs[n] = []

    for i, doc in enumerate(docs):
        d = np.asarray(doc, np.int64)
        if d.size and (d.min() < 0 or d.max() >= vocab_size):
            raise ValueError(f"document {i} has token ids outside [0, {vocab_size})")
        n_docs += 1
        uni += np.bincount(d, minlength=vocab_size)
        totals[1] += len(d)
        for n in orders:
            k = doc_keys(d, vocab_size, n)
            totals[n] += len(k)
            bufs[n].append(k)
            if sum(len(b) for b in bufs[n]) >= buffer_keys:
                flush(n)
    np.save(out / "unigram_counts.npy", uni, allow_pickle=False)
    sizes = {}
    for n in orders:
        flush(n)
        kp, cp = out / f"{NAMES[n]}_keys.npy", out / f"{NAMES[n]}_counts.npy"
        sizes[NAMES[n]] = merge_runs(runs[n], kp, cp, min_count=min_count)
    shutil.rmtree(run_dir)
    meta = {"vocab_size": vocab_size, "documents": n_docs, "max_order": max_order,
            "min_count": min_count, "tokenizer_fingerprint": fingerprint,
            **{f"N{n}": totals[n] for n in totals}, "unique": sizes,
            "key": "((a*V + b)*V + c) int64"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


class CooccurTables:
    """Memory-mapped tables with vectorised lookup (`searchsorted`) and the ratio ρ."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not (d / "meta.json").exists():
            raise FileNotFoundError(f"{d} has no meta.json; build it with "
                                    "python -m jaxdyn.multitoken cooccur")
        self.meta = json.loads((d / "meta.json").read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        self.max_order = int(self.meta["max_order"])
        self.unigram = np.load(d / "unigram_counts.npy", mmap_mode="r")
        self.keys = {n: np.load(d / f"{NAMES[n]}_keys.npy", mmap_mode="r")
                     for n in range(2, self.max_order + 1)}
        self.counts = {n: np.load(d / f"{NAMES[n]}_counts.npy", mmap_mode="r")
                       for n in range(2, self.max_order + 1)}
        self.totals = {n: int(self.meta[f"N{n}"]) for n in range(1, self.max_order + 1)}

    def count(self, ngrams_NK: np.ndarray) -> np.ndarray:
        """Occurrences of each n-gram (0 when absent or any id is outside the table's V)."""
        g = np.asarray(ngrams_NK, np.int64)
        K = g.shape[1]
        inside = np.all((g >= 0) & (g < self.vocab_size), axis=1)
        if K == 1:
            return np.where(inside, np.asarray(self.unigram)[np.where(inside, g[:, 0], 0)], 0)
        if K not in self.keys:
            raise ValueError(f"order {K} not in these tables (max_order={self.max_order})")
        q = encode(np.where(inside[:, None], g, 0), self.vocab_size)
        keys = self.keys[K]
        i = np.searchsorted(keys, q)
        found = inside & (i < len(keys))
        found[found] = np.asarray(keys[i[found]]) == q[found]
        out = np.zeros(len(q), np.int64)
        out[found] = np.asarray(self.counts[K][i[found]])
        return out

    def ratio(self, ngrams_NK: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
        """ρ = p̂_K(tuple) / Π_j p̂_1(tuple_j); 0 for unseen tuples unless `smoothing` > 0."""
        g = np.asarray(ngrams_NK, np.int64)
        K, V = g.shape[1], self.vocab_size
        p_n = (self.count(g) + smoothing) / (self.totals[K] + smoothing * float(V) ** K)
        denom = np.ones(len(g))
        for j in range(K):
            denom *= (self.count(g[:, j:j + 1]) + smoothing) / (self.totals[1] + smoothing * V)
        return np.where(denom > 0, p_n / np.where(denom > 0, denom, 1.0), 0.0)


    def grid_ratio(self, ids_nk: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
        """ρ over the Cartesian grid of n id lists ([k]*n), = `ratio` of every tuple.

        Without smoothing, only tuples whose adjacent pairs are all seen are looked up (a seen
        n-gram implies seen sub-pairs), which keeps a 50^3 grid to a few lookups.
        """
        ids = np.asarray(ids_nk, np.int64)
        n, k = ids.shape
        if smoothing > 0:
            tuples = np.stack(np.meshgrid(*ids, indexing="ij"), axis=-1).reshape(-1, n)
            return self.ratio(tuples, smoothing).reshape((k,) * n)
        ok = np.ones((k,) * n, bool)
        for j in range(n - 1):
            pair = np.stack(np.meshgrid(ids[j], ids[j + 1], indexing="ij"), -1).reshape(-1, 2)
            shape = [1] * n
            shape[j], shape[j + 1] = k, k
            ok = ok & (self.count(pair) > 0).reshape(shape)
        idx = np.nonzero(ok)
        tuples = np.stack([ids[h][idx[h]] for h in range(n)], axis=-1)
        out = np.zeros((k,) * n)
        if len(tuples):
            p_n = self.count(tuples) / self.totals[n]
            denom = np.ones(len(tuples))
            for h in range(n):  # unigram marginals looked up once per head (k ids)
                denom *= (self.count(ids[h][:, None]) / self.totals[1])[idx[h]]
            out[idx] = np.where(denom > 0, p_n / np.where(denom > 0, denom, 1.0), 0.0)
        return out

# ----------------------------------------------------------------------------- documents


def iter_docs(paths: Sequence[str], doc_sep: int | None = None,
              pad_id: int | None = None) -> Iterator[np.ndarray]:
    """Documents from `.jsonl` ({"tokens": [...]} or a list per line), `.npy` (1-D split at
    `doc_sep`, or 2-D rows minus `pad_id`), text files/folders (UTF-8 bytes, V=256), or
    `builtin` (the standard-library corpus, `builtin_docs`)."""
    for p in paths:
        if p == "builtin":
            yield from builtin_docs()
            continue
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"data path {p!r} does not exist; give files/folders "
                                    "(.jsonl, .npy, text) or 'builtin'")
        if path.is_dir():
            yield from iter_docs([str(f) for f in sorted(path.rglob("*")) if f.is_file()])
        elif path.suffix == ".jsonl":
            yield from _jsonl_docs(path)
        elif path.suffix == ".npy":
            arr = _load_npy(path)
            if arr.ndim == 2:
                for row in arr:
                    row = np.asarray(row, np.int64)
                    yield row if pad_id is None else row[row != pad_id]
            elif doc_sep is None:
                yield np.asarray(arr, np.int64)
            else:
                cuts = np.flatnonzero(np.asarray(arr) == doc_sep)
                for lo, hi in zip(np.r_[0, cuts + 1], np.r_[cuts, len(arr)], strict=True):
                    if hi > lo:
                        yield np.asarray(arr[lo:hi], np.int64)
        else:
            yield np.frombuffer(path.read_bytes(), np.uint8).astype(np.int64)


def _jsonl_docs(path: Path) -> Iterator[np.ndarray]:
    """Token arrays of a JSONL file; a bad line is a `CooccurInputError` naming file:line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(raw)
            except ValueError as e:  # UnicodeDecodeError included
                raise CooccurInputError(f"{where}: not valid JSON ({e}); {JSONL_FORMAT}"
                                        ) from None
            if isinstance(rec, dict):
                if "tokens" not in rec:
                    raise CooccurInputError(f"{where}: the record has no 'tokens' field "
                                            f"(fields: {sorted(rec)[:5]}); {JSONL_FORMAT}")
                rec = rec["tokens"]
            try:
                arr = np.asarray(rec)
            except ValueError:  # ragged nesting
                arr = np.asarray([None])
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise CooccurInputError(f"{where}: 'tokens' is not a flat list of integer ids "
                                        f"({json.dumps(rec)[:60]}); {JSONL_FORMAT}")
            yield arr.astype(np.int64)


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CooccurInputError(f"{path}: not a readable .npy array ({e}); save token ids with "
                                "numpy.save") from None
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise CooccurInputError(f"{path}: holds a {arr.ndim}-D {arr.dtype} array; it must be "
                                "1-D or 2-D integer token ids")
    return arr


def tokenized_sources(sources: Sequence[str], tokenizer_dir: str, text_field: str = "text",
                      max_documents: int = 0):
    """(tokenizer, token arrays) of the training split of each `jaxdyn.data` source, with
    BOS/EOS exactly as the trainer adds them (so the tables see the model's documents)."""
    tok = load_tokenizer(tokenizer_dir)
    out = []
    for src in sources:
        texts = load_documents(DataConfig(source=src, text_field=text_field,
                                          max_documents=max_documents), "train")
        out += tokenize_documents(texts, tok)
    return tok, out


def builtin_docs(max_docs: int = 400, max_len: int = 4096, split: str = "train"
                 ) -> list[np.ndarray]:
    """The built-in corpus (`jaxdyn.data`, this interpreter's stdlib sources) as byte tokens
    (V = 258, each document cut to `max_len` and ended by EOS = 256)."""
    tok = byte_tokenizer()
    texts = load_documents(DataConfig(max_documents=max_docs), split)
    return [np.r_[d[:max_len - 1], tok.eos_id].astype(np.int32)
            for d in tok.encode_batch(texts) if len(d) > 8]
