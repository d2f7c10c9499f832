"""Documents from the builtin corpus, local files (via HF `datasets`) or the HF hub."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
import warnings

import numpy as np

from jaxdyn.data.errors import DataSourceNotFoundError, EmptyDatasetError, UnknownSourceError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def builtin_corpus_files() -> list[str]:
    """The running interpreter's standard-library `.py` files (tests and site-packages
    excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        out.extend(os.path.join(d, f) for f in files if f.endswith(".py"))
    return sorted(out)


def _spread(n: int, k: int) -> np.ndarray:
    """`k` evenly spaced indices out of `n` (all when k is 0 or >= n)."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _builtin(max_documents: int) -> list[str]:
    files = builtin_corpus_files()
    if not files:
        raise EmptyDatasetError(f"no .py files under {sysconfig.get_paths()['stdlib']!r} for "
                                "the builtin corpus; set data.source to a local path")
    docs = []
    for i in _spread(len(files), max_documents):
        with open(files[i], encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


def _local_files(source: str) -> list[str]:
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise DataSourceNotFoundError(f"data source glob {source!r} matches no files; fix "
                                          "the pattern or data.source")
    elif os.path.isdir(source):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)
    elif os.path.isfile(source):
        files = [source]
    else:
        raise DataSourceNotFoundError(f"data source {source!r} does not exist; set data.source "
                                      "to an existing file, folder or glob, 'builtin' or "
                                      "'hub:NAME[:CONFIG]'")
    files = [f for f in files if os.path.isfile(f)]
    known = [f for f in files if os.path.splitext(f)[1].lower() in BUILDERS]
    if not known:
        raise UnknownSourceError(f"data source {source!r} holds no .txt/.jsonl/.json/.parquet "
                                 f"files (found {len(files)} other files); convert the data or "
                                 "point data.source at such files")
    return known


def _column(ds, field: str, where: str) -> list:
    if field not in ds.column_names:
        raise KeyError(f"{where} has no column {field!r} (columns: {ds.column_names}); set "
                       "data.text_field")
    return ds[field]


def _local(source: str, field: str, max_documents: int, cache_dir: str) -> list[str]:
    """.txt: one document per file, or blank-line paragraphs when `source` is one file."""
    import datasets

    files = _local_files(source)
    hf_cache = os.path.join(cache_dir, "hf_datasets") if cache_dir else None
    docs: list[str] = []
    by_builder: dict[str, list[str]] = {}
    for f in files:
        if os.path.getsize(f) == 0:
            continue  # `datasets` cannot infer a schema from an empty file
        by_builder.setdefault(BUILDERS[os.path.splitext(f)[1].lower()], []).append(f)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for builder, fs in by_builder.items():
            if builder == "text":
                sample_by = "paragraph" if len(files) == 1 else "document"
                ds = datasets.load_dataset("text", data_files=fs, split="train",
                                           sample_by=sample_by, cache_dir=hf_cache)
                docs.extend(ds["text"])
            else:
                ds = datasets.load_dataset(builder, data_files=fs, split="train",
                                           cache_dir=hf_cache)
                docs.extend(_column(ds, field, f"{builder} data {fs[0]!r}"))
            if max_documents and len(docs) >= max_documents:
                break
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return docs[:max_documents] if max_documents else docs


def _hub(spec: str, field: str, max_documents: int, cache_dir: str) -> list[str]:
    """`hub:NAME[:CONFIG]`, the train split, streamed (network required)."""
    import datasets

    name, _, config = spec.partition(":")
    if not name:
        raise UnknownSourceError("data.source 'hub:' needs a dataset name: hub:NAME[:CONFIG]")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataSourceNotFoundError(f"hub dataset {name!r} needs the network but HF offline "
                                      "mode is set; download it and use a local path")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True,
                               cache_dir=os.path.join(cache_dir, "hf_datasets") if cache_dir
                               else None)
    docs = []
    for row in ds:
        if field not in row:
            raise KeyError(f"hub dataset {name!r} has no column {field!r} (columns: "
                           f"{sorted(row)}); set data.text_field")
        docs.append(row[field])
        if max_documents and len(docs) >= max_documents:
            break
    return docs


def read_source(source: str, text_field: str, max_documents: int, cache_dir: str) -> list[str]:
    """All non-blank documents of a source, in a deterministic order."""
    if source == "builtin":
        docs = _builtin(max_documents)
    elif source.startswith("hub:"):
        docs = _hub(source[4:], text_field, max_documents, cache_dir)
    elif "://" in source:
        raise UnknownSourceError(f"data source {source!r} is not a known kind; use 'builtin', "
                                 "a local path/glob or 'hub:NAME[:CONFIG]'")
    else:
        docs = _local(source, text_field, max_documents, cache_dir)
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise EmptyDatasetError(f"data source {source!r} holds no non-empty documents (field "
                                f"{text_field!r}); check the files or data.text_field")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by a hash of each text; the same text always lands on the same side.

    With val_fraction > 0 the validation side is never empty: when the hash gives it nothing,
    it takes the lowest-hash document (or, with a single document, shares it, with a warning).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    keys = np.array([int.from_bytes(hashlib.sha1(d.encode("utf-8", "replace")).digest()[:8],
                                    "big") / 2.0**64 for d in docs])
    is_val = keys < val_fraction
    if val_fraction > 0 and not is_val.any():
        if len(docs) == 1:
            warnings.warn("only one document: validation reuses the training document",
                          stacklevel=3)
            return list(docs), list(docs)
        is_val[int(np.argmin(keys))] = True
    if is_val.all():
        is_val[int(np.argmax(keys))] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
