"""A workdir is safe (docs/training.md#a-workdir-is-safe): one trainer writes it, it keeps one
model, and no run file is written through a symlink out of it.

- `WorkdirLock`: process 0 holds `WORKDIR/.lock` while it trains. The file is created with
  `O_CREAT | O_EXCL` (atomic on local disks and NFS v3+) and names its holder; a second trainer
  is refused at once (`WorkdirLockedError`). A lock left by a dead process of *this* host is
  taken over; one from another host never is (its processes cannot be seen from here).
- `check_same_run`: a rerun trains the workdir's model and objective, or is refused
  (`CheckpointMismatchError`) before anything is written.
- `nothing_to_train`: the line to print when the workdir already holds the last step.
- `check_run_paths` / `safe_write`: run files are written atomically (temp file + rename) and
  never through a symlink that leaves the workdir (`UnsafeWorkdirPathError`).
- `refuse_url`: a URL where only local paths work (`data.cache_dir`, `init.checkpoint`) is
  refused, never made a local path.

Object-store workdirs (`gs://…`, `s3://…`; `jaxdyn.config.paths`) get what the store allows:
no symlinks exist there, a run file is one object upload (all-or-nothing), and the lock is a
best-effort lock object (written, then read back to confirm; two trainers starting within the
same moment can both pass, since the store has no exclusive create here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
import uuid
from typing import Any

import ml_collections as mlc
import psutil

from jaxdyn.checkpoint import Checkpointer
from jaxdyn.config import paths
from jaxdyn.model import ModelConfig
from jaxdyn.train.init import CheckpointMismatchError

LOCK = ".lock"
# What the trainer writes at the top of a workdir. `checkpoints` is not here: it may be a
# symlink to a bigger disk.
RUN_PATHS = ("config.json", "model_config.json", "run.json", "metrics.jsonl", "tokenizer",
             LOCK, "tensorboard")
# Model fields that choose how the maths runs, not what is trained: a rerun may change them.
EXECUTION_FIELDS = ("dtype", "remat_policy", "attention_impl", "attention_block")
_HELD: set[str] = set()  # lock files this process holds now


class WorkdirError(ValueError):
    """The trainer must not use this workdir as asked (a bad --workdir value, in effect); the
    message says why and what to do."""


class WorkdirLockedError(WorkdirError):
    """Another trainer holds the workdir's lock."""


class UnsafeWorkdirPathError(WorkdirError):
    """A run file of the workdir is a symlink that points out of it."""


class ObjectStorePathError(WorkdirError):
    """A `scheme://` path where only local (or mounted) paths are supported, or a scheme that
    is no object store jaxdyn can use."""


# ----------------------------------------------------------------------------- paths


def refuse_url(flag: str, path: str | None, what: str) -> None:
    """Refuse an object-store path (`gs://b/x`, any `scheme://`) for `flag`; `what` names the
    kind of folder ("caches", "init checkpoints")."""
    if paths.is_url(path):
        raise ObjectStorePathError(f"{flag} {str(path)!r}: object-store {what} are not "
                                   "supported yet; use a local or mounted path")


def check_workdir_url(workdir: str) -> None:
    """A URL workdir must be on an object store jaxdyn can use (`gs://`, `s3://`)."""
    try:
        paths.check_store(workdir, "--workdir")
    except paths.UnsupportedURLError as e:
        raise ObjectStorePathError(str(e)) from None


def check_inside(workdir: str, name: str) -> str:
    """`workdir/name`, refused when it is a symlink resolving outside the workdir (object
    stores have no symlinks: there it is just the joined URL)."""
    path = paths.join(workdir, name)
    if not paths.is_url(path) and os.path.islink(path):
        root, target = os.path.realpath(workdir), os.path.realpath(path)
        if target != root and not target.startswith(root + os.sep):
            raise UnsafeWorkdirPathError(
                f"{path} is a symlink to {target}, outside the workdir; the trainer does not "
                f"write through it: remove the link (rm {path}) or use another --workdir")
    return path


def check_run_paths(workdir: str) -> None:
    """No file the trainer writes at the top of the workdir leaves it through a symlink."""
    for name in RUN_PATHS if not paths.is_url(workdir) else ():
        check_inside(workdir, name)


def safe_write(workdir: str, name: str, text: str) -> None:
    """Write `workdir/name` atomically (a temp file in the workdir, then `os.replace`; on an
    object store one upload), never through a symlink out of the workdir (`check_inside`)."""
    paths.write_atomic(check_inside(workdir, name), text)


# ----------------------------------------------------------------------------- one writer


def _alive(pid: int, written: float | None) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock at `written`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    if written is None:
        return True
    try:  # the pid was reused when its process started after the lock was written
        return psutil.Process(pid).create_time() <= written + 1.0
    except psutil.Error:
        return True


def _exit_on_sigterm(signum, frame):
    print(f"\nsignal {signum} before training started: exiting (rerun the same command to "
          "resume)", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds the `finally` blocks: the lock is released


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `workdir/.lock` (see the module docstring); a no-op
    when not `enabled` (processes other than 0 of a multi-process job). Until released, a
    SIGTERM exits through the `finally` blocks, so it releases the lock too."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.path = paths.join(workdir, LOCK)
        self.url = paths.is_url(workdir)
        self.enabled = enabled
        self.token = uuid.uuid4().hex
        self.owned = False
        self._made_dir = False
        self._old_sigterm = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _info(self) -> dict[str, Any]:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
                "time": now, "argv": sys.argv, "token": self.token}

    def _read(self) -> dict[str, Any] | str | None:
        """The holder's JSON; None when there is no lock; a string saying why it is unreadable."""
        try:
            holder = json.loads(paths.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return holder if isinstance(holder, dict) else "not a JSON object"

    def acquire(self) -> None:
        if not self.enabled:
            return
        check_inside(self.workdir, LOCK)
        if self.url:
            self._acquire_object()
        else:
            self._acquire_file()
        self.owned = True
        _HELD.add(self.path)
        with contextlib.suppress(ValueError):  # not the main thread: no signal handlers
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def _acquire_object(self) -> None:
        """Best effort on an object store: no exclusive create, so write the lock object and
        read it back; a concurrent writer that wrote last wins, the other is refused."""
        holder = self._read()
        if holder is not None:
            self._take_over(holder)
            return
        paths.write_atomic(self.path, json.dumps(self._info()))
        now = self._read()
        if not isinstance(now, dict) or now.get("token") != self.token:
            raise WorkdirLockedError(self._refusal(now or "it was just released"))

    def _acquire_file(self) -> None:
        """`O_CREAT | O_EXCL`: atomic on local disks and NFS v3+."""
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir, exist_ok=True)
            self._made_dir = True
        for _ in range(3):  # a holder that releases between our tries: try again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                self._take_over(holder)
                break
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
            break
        else:
            raise WorkdirLockedError(f"{self.path} keeps appearing and disappearing: another "
                                     "trainer is starting in this workdir; wait for it")

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Only a lock of this host whose process is gone is stale."""
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        if pid == os.getpid():  # ours only if this process holds it now (else: a container
            return self.path not in _HELD  # restarted with the same host name and pid)
        written = holder.get("time")
        return not _alive(pid, written if isinstance(written, int | float) else None)

    def _take_over(self, holder: dict[str, Any] | str) -> None:
        """Replace a stale lock atomically (temp file + os.replace, then confirm by reading
        back), or refuse with the holder named."""
        if isinstance(holder, str) or not self._stale(holder):
            raise WorkdirLockedError(self._refusal(holder))
        if self.url:  # one upload replaces the object whole
            if self._read() != holder:
                raise WorkdirLockedError(self._refusal(self._read() or "it was just released"))
            paths.write_atomic(self.path, json.dumps(self._info()))
        else:
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
            if self._read() != holder:  # it changed meanwhile: another trainer took it
                os.remove(tmp)
                raise WorkdirLockedError(self._refusal(self._read() or "it was just released"))
            os.replace(tmp, self.path)
        now = self._read()
        if not isinstance(now, dict) or now.get("token") != self.token:
            raise WorkdirLockedError(self._refusal(now or "it was just released"))
        print(f"workdir lock: took over {self.path} left by pid {holder['pid']} of this host "
              f"(started {holder.get('started', '?')}), which is no longer running",
              file=sys.stderr)

    def _refusal(self, holder: dict[str, Any] | str) -> str:
        if isinstance(holder, str):
            return (f"workdir {self.workdir} is locked by {self.path}, which cannot be read "
                    f"({holder}); if no trainer is using this workdir, delete {self.path} and "
                    "rerun")
        host = holder.get("host", "?")
        where = " (it runs on another host, so this cannot be checked from here)" \
            if host != socket.gethostname() else ""
        return (f"workdir {self.workdir} is in use by another trainer (host {host}, pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')}): wait for it "
                f"to finish, or if that trainer is truly dead{where}, delete {self.path} and "
                "rerun")

    def release(self) -> None:
        """Remove the lock if we still own it (also after an exception); idempotent."""
        if not self.owned:
            return
        self.owned = False
        _HELD.discard(self.path)
        if self._old_sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        now = self._read()
        if isinstance(now, dict) and now.get("token") == self.token:
            paths.remove(self.path)
        if self._made_dir:  # a workdir this run created and left empty goes away again
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)


# ----------------------------------------------------------------------------- one model


def _read_json(path: str) -> Any:
    try:
        return json.loads(paths.read_bytes(path))
    except (OSError, ValueError):
        return None


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A saved or current model config as flat `model.<field>` values (JSON-normalised, the
    defaults filling fields an older release did not write)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    defaults["routing"] = dict(defaults["routing"])
    names = set(defaults)
    d = json.loads(json.dumps({**defaults, **{k: v for k, v in d.items() if k in names}}))
    return _flat({k: v for k, v in d.items() if k not in EXECUTION_FIELDS}, "model.")


def check_same_run(workdir: str, cfg: mlc.ConfigDict, mcfg: ModelConfig,
                   ignore: tuple[str, ...] = ()) -> None:
    """Refuse (CheckpointMismatchError) a run whose model or objective differs from what the
    workdir's `model_config.json` / `config.json` record. `ignore`: `model.<field>` names not
    known yet (the vocabulary size before the tokenizer is read). Reads only."""
    saved_model = _read_json(paths.join(workdir, "model_config.json"))
    if not isinstance(saved_model, dict):
        return
    then, now = _model_fields(saved_model), _model_fields(mcfg.to_dict())
    saved_cfg = _read_json(paths.join(workdir, "config.json"))
    if isinstance(saved_cfg, dict) and isinstance(saved_cfg.get("train"), dict) and \
            "objective" in saved_cfg["train"]:
        then["train.objective"] = saved_cfg["train"]["objective"]
        now["train.objective"] = cfg.train.objective
    unset = "<unset>"
    diff = [(k, then.get(k, unset), now.get(k, unset)) for k in sorted(set(then) | set(now))
            if k not in ignore and then.get(k, unset) != now.get(k, unset)]
    if not diff:
        return
    fields = "; ".join(f"{k}: workdir={a}, this run={b}" for k, a, b in diff)
    back = " ".join(f"--config.{k}={json.dumps(a) if not isinstance(a, str) else a}"
                    for k, a, _ in diff if a != unset)
    raise CheckpointMismatchError(
        f"workdir {workdir} holds another run ({fields}); use a new --workdir, or set those "
        f"fields back ({back})")


# ----------------------------------------------------------------------------- done already


def committed_step(workdir: str) -> int | None:
    """The newest committed checkpoint step of the workdir (None: none). Reads only."""
    directory = paths.join(workdir, "checkpoints")
    if not paths.isdir(directory):
        return None
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def nothing_to_train(workdir: str, step: int | None, train: mlc.ConfigDict) -> str | None:
    """The line to print when the workdir's newest checkpoint `step` already reaches this
    run's last step (train.stop_at_step, else train.steps); None when there is work."""
    stop = train.stop_at_step or train.steps
    if step is None or step < stop:
        return None
    if step > train.steps:
        return (f"workdir {workdir} already holds step {step} > train.steps={train.steps}: "
                "nothing to train (it was trained past this run's last step, on another "
                f"schedule); raise --config.train.steps above {step} to continue")
    if step == train.steps:
        return (f"workdir {workdir} already holds step {step} >= train.steps={train.steps}: "
                "nothing to train; raise --config.train.steps to continue")
    return (f"workdir {workdir} already holds step {step} >= train.stop_at_step="
            f"{train.stop_at_step}: nothing to train; raise or unset "
            "--config.train.stop_at_step to continue")
