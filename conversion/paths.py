"""Where conversion may read and write: the refusal rules of `import` / `export` / `to_hf`.

Every check compares real paths (`os.path.realpath`: symlinks and `..` resolved), runs before
any weight is read or anything is written, and raises a `ConversionError` naming the path and
the fix (the CLI prints it on one line and exits 2).

Inputs
- A URL-like path (`scheme://…`: `gs://`, `s3://`, `http(s)://`, `hf://`, …) as a Hugging
  Face folder or a weight-index entry is refused with "object-store paths are not supported by
  conversion yet; copy the files locally"; it is never read as a local path
  (`UnsupportedPathError`). `export` reads a CKPT_DIR on an object store (`gs://`, `s3://`,
  through `jaxdyn.config.paths`): its checkpoint is read by orbax, its small side files are
  copied to a local temporary folder first.
- Weight files are read only from inside the checkpoint folder: every entry of
  `model.safetensors.index.json` / `pytorch_model.bin.index.json`, the index itself and
  `model.safetensors` / `pytorch_model.bin` must resolve inside it (no absolute path, no `..`
  escape, no symlink pointing out). One exception: a Hugging Face hub cache snapshot
  (`…/models--ORG--NAME/snapshots/REV/`) may point into its own `…/models--ORG--NAME/blobs/`,
  which is how the hub cache stores files. Anything else: `UnsafePathError` naming the index
  file and the entry; no file outside is opened.

Outputs (OUT_DIR of `import` / `export`, `out_dir` of `to_hf`)
1. OUT must not be, contain, or be inside a source folder (HF_DIR of import, with its hub
   `blobs/` folder; CKPT_DIR of export). Refused even with `--overwrite`.
2. OUT must not be, contain, or be inside a training workdir. Refused even with `--overwrite`.
   A training workdir is a folder holding `metrics.jsonl`, or holding `model_config.json` and
   either `checkpoints/` or no `params/` (jaxdyn's training writes `model_config.json` first and
   `checkpoints/` later; an import output is `model_config.json` + `params/`, no
   `checkpoints/`). A bare `checkpoints/` folder alone is too common a name to count.
3. OUT must be a folder or not exist; an existing non-folder is refused.
4. An existing OUT that is not empty is refused unless `--overwrite` (`overwrite=True`).
5. With `--overwrite`, OUT is replaced only if it looks like a previous conversion output:
   every entry in it is a name import or export writes (`params/`, `model_config.json`,
   `hf_config.json`, `config.json`, `model.safetensors.index.json`,
   `model-NNNNN-of-NNNNN.safetensors`, `README.md`, `generation_config.json`, the tokenizer
   files). Any other entry (`.git`, notes, `model.safetensors`, `checkpoints/`, …) is listed
   and the overwrite refused.
0. OUT must be local: a URL OUT is refused (`UnsupportedPathError`, `OBJECT_STORE_OUT`),
   since the atomic build-aside-and-rename below needs a local file system; write it locally,
   then copy the folder to the store.
Writing: the new output is built in a fresh sibling `OUT.tmp-XXXXXXXX` (created with a unique
name, never a pre-existing folder) and renamed onto OUT only when complete; with `--overwrite`
the old OUT is swapped out atomically (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames
with rollback) and deleted only after the new one is in place. The rules are checked again just
before the rename. On any error or interrupt the temporary folder, and any parent folders this
run created, are removed; a pre-existing OUT is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping

from conversion.errors import OutputRefusedError, UnsafePathError, UnsupportedPathError
from jaxdyn.config.paths import is_url

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja")
# Everything `import` or `export` writes at the top of its output folder.
OUTPUT_NAMES = frozenset({"params", "model_config.json", "hf_config.json", "config.json",
                          "model.safetensors.index.json", "README.md", "generation_config.json",
                          *TOKENIZER_FILES})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OBJECT_STORE = "object-store paths are not supported by conversion yet; copy the files locally"
OBJECT_STORE_OUT = ("conversion writes a local folder (built aside, then renamed into place, "
                    "which object stores cannot do); write it locally, then copy the folder "
                    "to the store")


def real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def check_local(path: str, what: str, why: str = OBJECT_STORE) -> None:
    """Refuse a URL-like path (gs://, s3://, http(s)://, …) where only local paths work."""
    if is_url(path):
        raise UnsupportedPathError(f"{what} {os.fspath(path)!r}: {why}")


def _inside(child: str, parent: str) -> bool:
    """`child` is `parent` or below it (both real paths)."""
    return child == parent or os.path.commonpath([child, parent]) == parent


def _relation(out: str, other: str) -> str | None:
    if out == other:
        return "is"
    if _inside(out, other):
        return "is inside"
    if _inside(other, out):
        return "contains"
    return None


# ------------------------------------------------------------------------------------- inputs

def read_roots(folder: str) -> list[str]:
    """Real folders a checkpoint folder's files may resolve into: the folder itself, plus the
    hub cache's `blobs/` for a `models--*/snapshots/REV` folder."""
    root = real(folder)
    roots = [root]
    snaps, repo = os.path.dirname(root), os.path.dirname(os.path.dirname(root))
    if os.path.basename(snaps) == "snapshots" and os.path.basename(repo).startswith("models--"):
        blobs = os.path.join(repo, "blobs")
        if os.path.isdir(blobs):
            roots.append(blobs)
    return roots


def check_weight_file(folder: str, name: str, *, index: str | None = None,
                      entry: str | None = None) -> str:
    """The path of weight file `name` of `folder`, refusing anything that leaves the folder.

    `index` / `entry`: the index file and the tensor whose `weight_map` value `name` is."""
    where = (f"{index}: weight_map entry {entry!r} -> {name!r}" if index
             else f"{os.path.join(folder, name)}")
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: not a file name; the index must map each tensor to a "
                              "shard file inside the checkpoint folder")
    if is_url(name):
        raise UnsupportedPathError(f"{where}: {OBJECT_STORE}")
    fix = ("shards must be files inside the checkpoint folder: copy them in and name them "
           "relative to the folder")
    if os.path.isabs(name):
        raise UnsafePathError(f"{where}: absolute paths are refused; {fix}")
    roots = read_roots(folder)
    path = os.path.join(folder, name)
    lexical = os.path.normpath(os.path.join(os.path.abspath(folder), name))
    if not _inside(lexical, os.path.normpath(os.path.abspath(folder))):
        raise UnsafePathError(f"{where}: points outside {folder}; {fix}")
    target = real(path)
    if not any(_inside(target, r) for r in roots):
        raise UnsafePathError(f"{where}: resolves to {target}, outside {roots[0]} (a symlink "
                              f"pointing out of the folder); {fix}")
    return path


# ------------------------------------------------------------------------------------ outputs

def workdir_marker(folder: str) -> str | None:
    """Why `folder` is a training workdir (see the module docstring), or None."""
    has = lambda n: os.path.exists(os.path.join(folder, n))  # noqa: E731
    if os.path.isfile(os.path.join(folder, "metrics.jsonl")):
        return "it holds metrics.jsonl"
    if has("model_config.json"):
        if os.path.isdir(os.path.join(folder, "checkpoints")):
            return "it holds model_config.json and checkpoints/"
        if not os.path.isdir(os.path.join(folder, "params")):
            return "it holds model_config.json without params/"
    return None


def _ancestors(path: str) -> Iterator[str]:
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def is_output_name(name: str) -> bool:
    return name in OUTPUT_NAMES or bool(_SHARD.fullmatch(name))


def check_output(out_dir: str, *, sources: Mapping[str, str] | None = None,
                 overwrite: bool = False, what: str = "OUT_DIR",
                 overwrite_flag: str = "--overwrite") -> str:
    """Apply the output rules (module docstring); returns OUT's real path."""
    check_local(out_dir, what, OBJECT_STORE_OUT)
    shown = os.fspath(out_dir)
    out = real(out_dir)
    refused = "refused even with " + overwrite_flag
    for src_what, src in (sources or {}).items():
        if is_url(src):  # an object-store source cannot overlap a local OUT
            continue
        rel = _relation(out, real(src))
        if rel:
            raise OutputRefusedError(
                f"{what} {shown!r} {rel} the source {src_what} {src!r}; writing there could "
                f"destroy it ({refused}): choose an {what} outside it")
    for d in _ancestors(out):
        why = os.path.isdir(d) and workdir_marker(d)
        if why:
            rel = "is" if d == out else "is inside"
            raise OutputRefusedError(
                f"{what} {shown!r} {rel} the training workdir {d!r} ({why}); writing there "
                f"could destroy it ({refused}): choose an {what} outside it")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise OutputRefusedError(f"{what} {shown!r} exists and is not a folder; remove it "
                                     f"or choose another {what}")
        entries = sorted(os.listdir(out))
        if entries and not overwrite:
            raise OutputRefusedError(
                f"{what} {shown!r} exists and is not empty; choose a new folder, or pass "
                f"{overwrite_flag} to replace a previous conversion output")
        foreign = [e for e in entries if not is_output_name(e)]
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise OutputRefusedError(
                f"{what} {shown!r} holds {', '.join(foreign[:5])}{more}, which conversion does "
                f"not write; {overwrite_flag} replaces only a previous conversion output: move "
                "those away or choose a new folder")
        for dirpath, _, _ in os.walk(out) if entries else ():
            why = workdir_marker(dirpath)
            if why:
                raise OutputRefusedError(
                    f"{what} {shown!r} contains the training workdir {dirpath!r} ({why}); "
                    f"{refused}: choose another {what}")
    parent = next(d for d in _ancestors(os.path.dirname(out)) if os.path.lexists(d))
    if not os.path.isdir(parent):
        raise OutputRefusedError(f"{what} {shown!r}: {parent!r} is not a folder; choose "
                                 f"another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputRefusedError(f"{what} {shown!r}: no permission to write in {parent!r}; "
                                 f"choose another {what}")
    return out


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _replace(tmp: str, out: str, what: str, shown: str) -> str | None:
    """Put `tmp` at `out`; returns the path now holding the old output (to delete), if any."""
    if os.path.isdir(out) and os.listdir(out):  # checked just before: overwrite is allowed
        if _exchange(tmp, out):
            return tmp
        old = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.old-",
                               dir=os.path.dirname(out))
        try:
            os.rename(out, old)  # onto the empty folder just made
        except BaseException:
            os.rmdir(old)
            raise
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        return old
    try:  # absent or empty: a plain rename (it fails, not replaces, if OUT filled up meanwhile)
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputRefusedError(f"{what} {shown!r} appeared while converting; nothing was "
                                     f"replaced: choose another {what}") from e
        raise
    return None


@contextlib.contextmanager
def staging(out_dir: str, *, sources: Mapping[str, str] | None = None, overwrite: bool = False,
            what: str = "out_dir", overwrite_flag: str = "overwrite=True") -> Iterator[str]:
    """Yield a fresh temporary folder that becomes `out_dir` when the block succeeds.

    The output rules are checked on entry and again before the rename; on any error the
    temporary folder (and parents this call created) are removed and `out_dir` is untouched."""
    kw = dict(sources=sources, overwrite=overwrite, what=what, overwrite_flag=overwrite_flag)
    out = check_output(out_dir, **kw)
    shown = os.fspath(out_dir)
    parent = os.path.dirname(out)
    created = []  # missing parents, deepest first
    for d in _ancestors(parent):
        if os.path.lexists(d):
            break
        created.append(d)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.tmp-", dir=parent)
        yield tmp
        check_output(out_dir, **kw)
        old = _replace(tmp, out, what, shown)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
