"""One door for every path jaxdyn reads or writes: a local path or an object-store URL.

A URL (`scheme://…`) is never handed to `os.path` (`os.path.abspath("gs://b/x")` would make a
local folder `<cwd>/gs:/b/x`); it goes through `etils.epath` (the path library orbax uses, with
fsspec backends: `gs://` via gcsfs, `s3://` via s3fs), while array data goes through
tensorstore's own `gcs` / `s3` drivers. Only the object stores both can reach are accepted
(`OBJECT_STORES`); any other scheme (`http://`, `hf://`, …) is refused by `check_store`.

Local paths keep the local-disk guarantees (atomic writes by temp file + rename). On an object
store a single-object upload is already all-or-nothing (readers see the old object or the new
one, never half of it), so `write_atomic` writes the object directly; there are no symlinks,
no rename of folders and no exclusive create (see `jaxdyn.train.workdir` for the lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Object stores reachable by both epath (run files) and tensorstore (checkpoint arrays).
OBJECT_STORES = ("gs", "s3")


class UnsupportedURLError(ValueError):
    """A `scheme://` path whose scheme is not an object store jaxdyn can write."""


def scheme(path: str | os.PathLike | None) -> str | None:
    """`gs` for `gs://b/x`; None for a local path."""
    m = _SCHEME.match(os.fspath(path)) if path else None
    return m.group(1).lower() if m else None


def is_url(path: str | os.PathLike | None) -> bool:
    """Whether `path` is URL-like (`scheme://…`), i.e. never a local path."""
    return scheme(path) is not None


def check_store(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse a URL whose scheme is not in `OBJECT_STORES` (local paths pass)."""
    s = scheme(path)
    if s is not None and s not in OBJECT_STORES:
        raise UnsupportedURLError(
            f"{flag} {os.fspath(path)!r}: {s}:// is not an object store jaxdyn can use "
            f"(supported: {', '.join(f'{x}://' for x in OBJECT_STORES)}, or a local path)")


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL kept as it is (less a trailing slash)."""
    path = os.fspath(path)
    if is_url(path):
        head, rest = path.split("://", 1)
        return f"{head}://{rest.rstrip('/')}"
    return os.path.abspath(path)


def join(base: str | os.PathLike, *names: str) -> str:
    """`os.path.join` for local paths; `/`-joined for URLs."""
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def as_path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
    return as_path(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create a local folder (and parents); a no-op on object stores (no folders there)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes (FileNotFoundError when absent, local or URL)."""
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `path` whole. Local: a temp file beside it, fsynced, then `os.replace` (readers
    and a crash never see half a file). URL: one object upload, all-or-nothing on the store."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    path = os.fspath(path)
    if is_url(path):
        as_path(path).write_bytes(data)
        return
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove(path: str | os.PathLike) -> None:
    """Delete one file or object; absent is fine."""
    with contextlib.suppress(FileNotFoundError):
        as_path(path).unlink()


def listdir(path: str | os.PathLike) -> list[str]:
    """Entry names of a folder (or URL prefix); [] when absent."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    p = as_path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def _files(p: epath.Path) -> Iterator[epath.Path]:
    """Every file below `p`, one listing per folder (object stores refuse `**` globs)."""
    for f in p.iterdir():
        if f.is_dir():
            yield from _files(f)
        else:
            yield f


def move_tree(src: str, dst: str) -> None:
    """Rename a folder. Local: one `os.rename`. Object store (no folder rename): copy every
    object below `src` to `dst`, then delete the sources, so an interruption leaves both
    copies, never none."""
    if not is_url(src):
        os.rename(src, dst)
        return
    files = list(_files(as_path(src)))
    for f in files:
        write_atomic(join(dst, *f.relative_to(as_path(src)).parts), f.read_bytes())
    for f in files:
        remove(f)


@contextlib.contextmanager
def local_folder(path: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """`path` itself when local; for a URL, a temporary local copy of its files (top level
    and below, except the top-level entries named in `skip`), removed afterwards: for readers
    that need real files (HF `tokenizers`, `transformers`, conversion's side files)."""
    if not is_url(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="jaxdyn-url-")
    try:
        src = as_path(path)
        for top in src.iterdir() if src.is_dir() else ():
            if top.name in skip:
                continue
            for f in _files(top) if top.is_dir() else [top]:
                dst = os.path.join(tmp, *f.relative_to(src).parts)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as out:
                    out.write(f.read_bytes())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_cache_root(url: str) -> str:
    """A local folder standing for `url` (for caches that must be local files):
    `$XDG_CACHE_HOME/jaxdyn/url/<scheme>/<bucket>/<path>` (default `~/.cache`)."""
    s, rest = url.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdyn", "url", s, *parts)
