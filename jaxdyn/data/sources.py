"""Documents from the builtin corpus, local files (via HF `datasets`) or the HF hub."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from jaxdyn.data.errors import (
    DataFieldError,
    DataFormatError,
    DataSourceNotFoundError,
    EmptyDatasetError,
    UnknownSourceError,
)

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


def _iter_builtin(max_documents: int) -> Iterator[str]:
    """The builtin corpus one file at a time (never all texts in memory)."""
    files = builtin_corpus_files()
    if not files:
        raise EmptyDatasetError(f"no .py files under {sysconfig.get_paths()['stdlib']!r} for "
                                "the builtin corpus; set data.source to a local path")
    for i in _spread(len(files), max_documents):
        with open(files[i], encoding="utf-8", errors="replace") as f:
            yield f.read()


def _builtin(max_documents: int) -> list[str]:
    return list(_iter_builtin(max_documents))


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
        raise DataFieldError(f"{where} has no column {field!r} (columns: {ds.column_names}); "
                             "set data.text_field")
    return ds[field]


# ----------------------------------------------------------------------------- bad files

_TEXT_FIX = ("convert it to UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8 IN > OUT`) or remove it from "
             "data.source")
_BINARY_FIX = "it looks binary, not text: remove it from data.source"


def _json_fix(field: str, whole: bool = False) -> str:
    if whole:
        return (f"a .json file must hold a JSON list of objects with a {field!r} text field "
                "(data.text_field), or one such object per line")
    return (f"each line must be a JSON object with a {field!r} text field (data.text_field), "
            f'e.g. {{"{field}": "..."}}')


def _line_bytes_problem(n: int, raw: bytes, fix: str) -> str | None:
    """UTF-16, NUL bytes (binary) or not UTF-8 in line `n` of a text file; None if fine."""
    if n == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return ("it is UTF-16 text (it starts with a byte-order mark); convert it to UTF-8 "
                "(e.g. `iconv -f UTF-16 -t UTF-8 IN > OUT`)")
    if b"\0" in raw:
        return f"line {n} holds NUL bytes; {_BINARY_FIX}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {n} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); {fix}"
    return None


def _text_problem(path: str) -> str | None:
    """What makes a .txt file unreadable as UTF-8 text, or None."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            problem = _line_bytes_problem(n, raw, _TEXT_FIX)
            if problem:
                return problem
    return None


def _json_lines_problem(path: str, field: str, whole: bool = False) -> str | None:
    """The first line of a JSON-lines file that is not a UTF-8 JSON object, or None."""
    fix = _json_fix(field, whole)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            problem = _line_bytes_problem(n, raw, "convert it to UTF-8")
            if problem:
                return problem
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as e:
                return f"line {n} is not valid JSON ({e.msg} at column {e.colno}); {fix}"
            if not isinstance(rec, dict):
                return f"line {n} is a JSON {type(rec).__name__}, not an object; {fix}"
    return None


def _json_problem(path: str, field: str) -> str | None:
    """.json: one JSON document (a list of objects, or an object of columns) or JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError):
        pass  # maybe JSON lines: report its first bad line
    else:
        if isinstance(doc, list) and not all(isinstance(r, dict) for r in doc):
            i = next(i for i, r in enumerate(doc) if not isinstance(r, dict))
            return (f"item {i} of its JSON list is a {type(doc[i]).__name__}, not an object; "
                    f"{_json_fix(field, True)}")
        if not isinstance(doc, list | dict):
            return f"it holds a JSON {type(doc).__name__}; {_json_fix(field, True)}"
        return None
    return _json_lines_problem(path, field, whole=True)


def _parquet_problem(path: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's
        return (f"it is not a readable Parquet file ({' '.join(str(e).split())}); rewrite it "
                "with pyarrow/pandas `to_parquet` or remove it from data.source")
    return None


def _file_problem(path: str, builder: str, field: str) -> str | None:
    if builder == "text":
        return _text_problem(path)
    if builder == "parquet":
        return _parquet_problem(path)
    if path.lower().endswith(".json"):
        return _json_problem(path, field)
    return _json_lines_problem(path, field)


def _format_error(builder: str, files: list[str], field: str,
                  cause: BaseException | None) -> DataFormatError:
    """The named error of the first bad file of `files` (or of them all, with the cause)."""
    for f in files:
        problem = _file_problem(f, builder, field)
        if problem:
            return DataFormatError(f"data file {f!r}: {problem}")
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    why = f" ({type(cause).__name__}: {' '.join(str(cause).split())})" if cause else ""
    shown = ", ".join(repr(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    hint = {"text": _TEXT_FIX, "parquet": "rewrite them with pyarrow/pandas `to_parquet`"}
    return DataFormatError(f"data files {shown} could not be read as {builder}{why}; "
                           f"{hint.get(builder, _json_fix(field))}")


class _CacheGuard:
    """Removes what a refused read added to the `datasets` cache (lock files, builder folders,
    Arrow files of refused data) and the cache folders this read created. `datasets` itself
    moves finished Arrow files into place, so a successful read leaves only whole entries.
    Only the cache's top level and the folders of the builders used are looked at."""

    def __init__(self, root: str, builders: list[str], made: list[str]) -> None:
        self.root, self.made = root, [d for d in made if d and not os.path.exists(d)]
        self.dirs = [os.path.join(root, b) for b in builders]
        self.before = self._paths()

    def _paths(self) -> set[str]:
        out = {os.path.join(self.root, x) for x in os.listdir(self.root)} \
            if os.path.isdir(self.root) else set()
        for top in self.dirs:
            for d, dirs, files in os.walk(top):
                out.update(os.path.join(d, x) for x in dirs + files)
        return out

    def undo(self) -> None:
        for p in sorted(self._paths() - self.before, key=len, reverse=True):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.remove(p)
        for d in self.made:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break


def _local(source: str, field: str, max_documents: int, cache_dir: str) -> list[str]:
    """.txt: one document per file, or blank-line paragraphs when `source` is one file.

    A file that is not what its extension says (non-UTF-8 or binary text, malformed JSON
    lines, not Parquet) raises `DataFormatError` naming it, its first bad line and the fix,
    and leaves nothing new in the `datasets` cache."""
    import datasets
    import pyarrow as pa

    files = _local_files(source)
    hf_cache = os.path.join(cache_dir, "hf_datasets") if cache_dir else None
    docs: list[str] = []
    by_builder: dict[str, list[str]] = {}
    for f in files:
        if os.path.getsize(f) == 0:
            continue  # `datasets` cannot infer a schema from an empty file
        by_builder.setdefault(BUILDERS[os.path.splitext(f)[1].lower()], []).append(f)
    unreadable = (datasets.exceptions.DatasetsError, ValueError, pa.ArrowException)
    guard = _CacheGuard(hf_cache or datasets.config.HF_DATASETS_CACHE, list(by_builder),
                        [hf_cache, cache_dir] if hf_cache else [])
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become ours
    try:
        for builder, fs in by_builder.items():
            kw = {"sample_by": "paragraph" if len(files) == 1 else "document"} \
                if builder == "text" else {}
            try:  # bad bytes inside a JSON string fail only when the column is read
                ds = datasets.load_dataset(builder, data_files=fs, split="train",
                                           cache_dir=hf_cache, **kw)
                got = list(ds["text"] if builder == "text" else
                           _column(ds, field, f"{builder} data {fs[0]!r}"))  # (lazy column)
            except DataFormatError:
                raise
            except unreadable as e:
                raise _format_error(builder, fs, field, e) from e
            if builder != "parquet" and any(isinstance(d, str) and "\0" in d for d in got):
                bad = next((f for f in fs if _file_problem(f, builder, field)), None)
                if bad:  # raw NUL bytes (an escaped \u0000 in JSON is the data's own)
                    raise DataFormatError(f"data file {bad!r}: "
                                          f"{_file_problem(bad, builder, field)}")
            docs.extend(got)
            if max_documents and len(docs) >= max_documents:
                break
    except DataFormatError:
        guard.undo()
        raise
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()
    return docs[:max_documents] if max_documents else docs


def _hub(spec: str, field: str, max_documents: int, cache_dir: str) -> list[str]:
    """`hub:NAME[:CONFIG]`, the train split (network required)."""
    return list(_iter_hub(spec, field, max_documents, cache_dir))


def _iter_hub(spec: str, field: str, max_documents: int, cache_dir: str,
              split: str = "train") -> Iterator[str]:
    """`hub:NAME[:CONFIG]` streamed row by row (`streaming=True`): nothing is downloaded
    whole or held in memory (network required)."""
    import datasets

    name, _, config = spec.partition(":")
    if not name:
        raise UnknownSourceError("data.source 'hub:' needs a dataset name: hub:NAME[:CONFIG]")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataSourceNotFoundError(f"hub dataset {name!r} needs the network but HF offline "
                                      "mode is set; download it and use a local path")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True,
                               cache_dir=os.path.join(cache_dir, "hf_datasets") if cache_dir
                               else None)
    for n, row in enumerate(ds, 1):
        if field not in row:
            raise DataFieldError(f"hub dataset {name!r} has no column {field!r} (columns: "
                                 f"{sorted(row)}); set data.text_field")
        yield row[field]
        if max_documents and n >= max_documents:
            break


def iter_documents(source: str, text_field: str = "text", max_documents: int = 0,
                   cache_dir: str = "", split: str = "train") -> Iterator[str]:
    """The non-blank documents of a source one by one, in the order `read_source` returns
    them. The builtin corpus is read file by file and hub sources are streamed, so neither
    is ever held in memory whole; local files go through the `datasets` Arrow cache (checked
    for bad bytes and JSON first, as `read_source` does). `split` names the hub split."""
    if source == "builtin":
        docs: Iterable = _iter_builtin(max_documents)
    elif source.startswith("hub:"):
        docs = _iter_hub(source[4:], text_field, max_documents, cache_dir, split)
    elif "://" in source:
        raise UnknownSourceError(f"data source {source!r} is not a known kind; use 'builtin', "
                                 "a local path/glob or 'hub:NAME[:CONFIG]'")
    else:
        docs = _local(source, text_field, max_documents, cache_dir)
    seen = False
    for d in docs:
        if isinstance(d, str) and d.strip():
            seen = True
            yield d
    if not seen:
        raise EmptyDatasetError(f"data source {source!r} holds no non-empty documents (field "
                                f"{text_field!r}); check the files or data.text_field")


def doc_key(text: str) -> float:
    """The split key of a document in [0, 1): it is validation when key < val_fraction."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:8],
                          "big") / 2.0**64


def sample_key(text: str) -> float:
    """The sampling key of a document in [0, 1): kept by `sample=f` when key < f. Salted, so
    the kept subset is independent of the validation split (`doc_key`)."""
    return int.from_bytes(hashlib.sha1(b"sample:" + text.encode("utf-8", "replace")).digest()
                          [:8], "big") / 2.0**64


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
    keys = np.array([doc_key(d) for d in docs])
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
