"""A workdir is safe (docs/training.md#a-workdir-is-safe): one trainer at a time, one model
per workdir, a refused or finished rerun writes nothing, object-store paths are not made
local, no run file is written through a symlink out of the workdir, and a torn metrics line
left by a killed run costs nothing."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxdyn.train import (
    CheckpointMismatchError,
    NonFiniteLossError,
    ObjectStorePathError,
    UnsafeWorkdirPathError,
    WorkdirLockedError,
    schema,
    train_and_evaluate,
)
from jaxdyn.train.metrics import MetricsFileError, MetricsWriter, read_metrics
from jaxdyn.train.workdir import WorkdirLock, check_run_paths, safe_write
from tests.train.test_loop import FAST, ROOT

RUN = [*FAST, "--config.checkpoint.every=2", "--config.eval.every=2",
       "--config.eval.batches=1", "--config.sample.max_new_tokens=0"]
CONFIG = str(ROOT / "configs" / "standard.py") + ":tiny"


def cfg_for(*overrides, spec=CONFIG):
    return schema.load(spec, [*RUN, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, returned metrics) of a finished 2-step run, copied by each test that needs it."""
    w = tmp_path_factory.mktemp("trained") / "w"
    last = train_and_evaluate(cfg_for("--config.train.steps=2"), str(w))
    assert not (w / ".lock").exists()  # released after a normal run
    return w, last


def copy_of(trained, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(trained[0], w, symlinks=True)
    return w


def snapshot(root: Path) -> dict:
    """Every entry under `root`: (mtime, bytes or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                body = os.readlink(p)
            elif os.path.isfile(p):
                body = Path(p).read_bytes()
            else:
                body = None
            out[os.path.relpath(p, root)] = (os.lstat(p).st_mtime_ns, body)
    return out


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def write_lock(w: Path, host: str, pid: int) -> None:
    (w / ".lock").write_text(json.dumps({
        "host": host, "pid": pid, "started": "2030-01-02 03:04:05 +0000", "time": time.time(),
        "argv": ["python", "-m", "jaxdyn.train"], "token": "someone-else"}))


def cli(*args, cwd=ROOT, env=None, timeout=300):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxdyn.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- one writer


@pytest.mark.parametrize("holder", ["live_pid_this_host", "dead_pid_other_host"])
def test_second_trainer_is_refused_and_changes_nothing(trained, tmp_path, holder):
    w = copy_of(trained, tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        host, pid = (socket.gethostname(), sleeper.pid) if holder == "live_pid_this_host" \
            else ("elsewhere.example.org", dead_pid())  # never broken: its host can't be seen
        write_lock(w, host, pid)
        before = snapshot(w)
        with pytest.raises(WorkdirLockedError) as e:
            train_and_evaluate(cfg_for("--config.train.steps=4"), str(w))
    finally:
        sleeper.kill()
        sleeper.wait()
    msg = str(e.value)
    assert f"host {host}, pid {pid}, started 2030-01-02 03:04:05" in msg, msg
    assert f"delete {w / '.lock'}" in msg and "wait for it" in msg and "\n" not in msg
    assert ("another host" in msg) == (holder == "dead_pid_other_host")
    assert snapshot(w) == before


def test_lock_of_a_dead_process_on_this_host_is_taken_over(trained, tmp_path, capsys):
    w = copy_of(trained, tmp_path)
    pid = dead_pid()
    write_lock(w, socket.gethostname(), pid)
    last = train_and_evaluate(cfg_for("--config.train.steps=3"), str(w))
    assert read_metrics(str(w))[-1]["step"] == 3 and last["train/loss"] > 0
    assert f"took over {w / '.lock'} left by pid {pid}" in capsys.readouterr().err
    assert not (w / ".lock").exists()


def test_lock_is_released_after_a_nonfinite_loss(tmp_path):
    cfg = cfg_for("--config.train.steps=6", "--config.train.lr=1e30",
                  "--config.train.clip_norm=0.0", "--config.train.warmup_steps=0",
                  "--config.log.every=1", "--config.checkpoint.every=1000")
    with pytest.raises(NonFiniteLossError):
        train_and_evaluate(cfg, str(tmp_path / "w"))
    assert (tmp_path / "w" / "metrics.jsonl").exists() and not (tmp_path / "w" / ".lock").exists()


def test_one_lock_per_workdir_in_process(tmp_path):
    with WorkdirLock(str(tmp_path)) as lock:
        held = json.loads((tmp_path / ".lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
        write_lock(tmp_path, "elsewhere", 1)  # someone broke our lock and took it
    assert (tmp_path / ".lock").exists()  # not ours any more: left alone
    assert not lock.owned
    with WorkdirLock(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()  # a workdir the lock created and left empty


@pytest.mark.slow
def test_running_trainer_holds_the_lock_until_sigterm(tmp_path):
    w = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdyn.train", "--config", CONFIG, "--workdir", str(w), *RUN,
         "--config.train.steps=100000", "--config.log.every=1",
         "--config.checkpoint.every=100000", "--config.eval.every=100000"],
        cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(r.get("step", 0) >= 2
                                                 for r in read_metrics(str(w))):
            time.sleep(0.5)
        held = json.loads((w / ".lock").read_text())
        assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
        assert "jaxdyn.train" in " ".join(held["argv"]) or "--workdir" in held["argv"]
        with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid}"):  # a second trainer
            train_and_evaluate(cfg_for("--config.train.steps=100000", "--config.log.every=1",
                                       "--config.checkpoint.every=100000",
                                       "--config.eval.every=100000"), str(w))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted: saved step" in out, out
    assert not (w / ".lock").exists()


# ----------------------------------------------------------------------------- one model


@pytest.mark.parametrize("change,spec,named", [
    (["--config.model.num_layers=3"], CONFIG, "model.num_layers: workdir=4, this run=3"),
    ([], str(ROOT / "configs" / "dtf.py") + ":tiny", "model.arch: workdir=dense, this run=dtf"),
    ([], str(ROOT / "configs" / "mtp.py") + ":tiny", "train.objective: workdir=lm, this run=mtp"),
])
def test_another_model_is_refused_before_anything_is_written(trained, tmp_path, change, spec,
                                                             named):
    w = copy_of(trained, tmp_path)
    before = snapshot(w)
    with pytest.raises(CheckpointMismatchError) as e:
        train_and_evaluate(cfg_for("--config.train.steps=4", *change, spec=spec), str(w))
    msg = str(e.value)
    assert named in msg and "use a new --workdir" in msg and "\n" not in msg, msg
    assert snapshot(w) == before


@pytest.mark.parametrize("trace", [False, True])
def test_cli_prints_one_line_and_exits_2(trained, tmp_path, trace):
    w = copy_of(trained, tmp_path)
    before = snapshot(w)
    res = cli("--config", CONFIG, "--workdir", str(w), *RUN, "--config.model.num_layers=3",
              env={"JAXDYN_TRACEBACK": "1"} if trace else None)
    assert res.returncode != 0 and snapshot(w) == before
    if trace:  # JAXDYN_TRACEBACK=1: the traceback of a user error, for debugging
        assert "Traceback" in res.stderr and "CheckpointMismatchError" in res.stderr
        return
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workdir "), res.stderr
    assert "model.num_layers: workdir=4, this run=3" in lines[0]


# ----------------------------------------------------------------------------- done already


@pytest.mark.parametrize("steps,says", [
    (["--config.train.steps=2"],
     "already holds step 2 >= train.steps=2: nothing to train; raise --config.train.steps "
     "to continue"),
    (["--config.train.steps=1"],
     "already holds step 2 > train.steps=1: nothing to train (it was trained past this run's "
     "last step, on another schedule); raise --config.train.steps above 2 to continue"),
    (["--config.train.steps=9", "--config.train.stop_at_step=2"],
     "already holds step 2 >= train.stop_at_step=2: nothing to train"),
])
def test_rerun_with_nothing_to_train_writes_nothing(trained, tmp_path, capsys, steps, says):
    w = copy_of(trained, tmp_path)
    before = snapshot(w)
    last = train_and_evaluate(cfg_for(*steps), str(w))
    out = capsys.readouterr().out
    assert out.startswith(f"workdir {w} {says}") and out.count("\n") == 1, out
    assert last == trained[1]  # the metrics the finished run returned
    assert snapshot(w) == before


def test_cli_rerun_with_nothing_to_train_exits_0(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    before = snapshot(w)
    res = cli("--config", CONFIG, "--workdir", str(w), *RUN, "--config.train.steps=2")
    assert res.returncode == 0, res.stderr
    assert f"workdir {w} already holds step 2 >= train.steps=2: nothing to train" in res.stdout
    assert snapshot(w) == before


# ----------------------------------------------------------------------------- URLs
# gs:// and s3:// workdirs work (tests/train/test_object_store.py); other schemes, URL init
# checkpoints and URL caches are refused, and no URL is ever made a local path.


def test_unusable_urls_are_refused_and_not_made_local_paths(tmp_path, monkeypatch):
    res = cli("--config", CONFIG, "--workdir", "https://bucket/run", *RUN, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == ("error: --workdir 'https://bucket/run': https:// is not an "
                                  "object store jaxdyn can use (supported: gs://, s3://, or a "
                                  "local path)")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ObjectStorePathError, match="--workdir 'hf://b/x'"):
        train_and_evaluate(cfg_for(), "hf://b/x")
    with pytest.raises(ObjectStorePathError, match="--config.init.checkpoint 'gs://b/imp'"):
        train_and_evaluate(cfg_for("--config.init.checkpoint=gs://b/imp"), str(tmp_path / "w"))
    with pytest.raises(ObjectStorePathError, match="--config.data.cache_dir 's3://b/c'"):
        train_and_evaluate(cfg_for("--config.data.cache_dir=s3://b/c"), "gs://b/run")
    made = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files]
    assert not [p for p in made if ":" in os.path.basename(p)], made
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- no symlinks


@pytest.mark.parametrize("name", ["run.json", "config.json"])
def test_symlinked_run_file_pointing_outside_is_refused(trained, tmp_path, name):
    w = copy_of(trained, tmp_path)
    outside = tmp_path / "precious.json"
    outside.write_text("precious")
    (w / name).unlink()
    (w / name).symlink_to(outside)
    before = snapshot(w)
    with pytest.raises(UnsafeWorkdirPathError, match=f"{w / name} is a symlink to {outside}"):
        train_and_evaluate(cfg_for("--config.train.steps=3"), str(w))
    assert outside.read_text() == "precious" and snapshot(w) == before


def test_safe_write_and_metrics_never_write_outside(tmp_path):
    w, outside = tmp_path / "w", tmp_path / "outside.txt"
    w.mkdir()
    outside.write_text("precious")
    (w / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UnsafeWorkdirPathError, match="metrics.jsonl is a symlink"):
        MetricsWriter(str(w), tensorboard=False)
    with pytest.raises(UnsafeWorkdirPathError, match="metrics.jsonl is a symlink"):
        safe_write(str(w), "metrics.jsonl", "x")
    (w / "metrics.jsonl").unlink()
    (w / "tensorboard").symlink_to(tmp_path)
    with pytest.raises(UnsafeWorkdirPathError, match="tensorboard is a symlink"):
        check_run_paths(str(w))
    assert outside.read_text() == "precious"
    # a link that stays inside the workdir is replaced, not followed; checkpoints may live on
    # another disk
    (w / "tensorboard").unlink()
    (w / "real.json").write_text("kept")
    (w / "run.json").symlink_to(w / "real.json")
    (w / "checkpoints").symlink_to(tmp_path)
    check_run_paths(str(w))
    safe_write(str(w), "run.json", "new")
    assert (w / "run.json").read_text() == "new" and (w / "real.json").read_text() == "kept"
    assert sorted(p.name for p in w.iterdir()) == ["checkpoints", "real.json", "run.json"]


def test_checkpoints_on_another_disk_resume(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    shutil.move(w / "checkpoints", tmp_path / "big_disk")
    (w / "checkpoints").symlink_to(tmp_path / "big_disk")
    train_and_evaluate(cfg_for("--config.train.steps=3"), str(w))
    assert read_metrics(str(w))[-1]["step"] == 3 and (tmp_path / "big_disk" / "3").is_dir()


# ----------------------------------------------------------------------------- torn metrics


def test_torn_metrics_line_is_dropped_and_resume_is_exact(tmp_path, capsys):
    """4 steps, a kill mid-write of a metrics line, resume for 4 more == 8 uninterrupted."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--config.train.steps=8", "--config.checkpoint.every=4", "--config.log.every=2",
              "--config.eval.every=100"]
    train_and_evaluate(cfg_for(*common), a)
    train_and_evaluate(cfg_for(*common, "--config.train.stop_at_step=4"), b)
    torn = b'{"step": 6, "split": "train", "time": 17'
    with open(os.path.join(b, "metrics.jsonl"), "ab") as f:
        f.write(torn)
    capsys.readouterr()
    train_and_evaluate(cfg_for(*common), b)
    err = capsys.readouterr().err
    warning = (f"{b}/metrics.jsonl: dropped a torn last line ({len(torn)} bytes) left by an "
               "interrupted run")
    assert err.count(warning) == 1, err
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time" and "per_sec" not in k
                           and "mfu" not in k} for r in rows]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    assert strip(read_metrics(b))[-1]["step"] == 8


def test_corrupt_metrics_line_that_is_not_the_last_is_an_error(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    lines = (w / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    lines[0] = "{not json\n"
    (w / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 1 is not a metrics row"):
        read_metrics(str(w))
    before = snapshot(w)
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 1 "):
        train_and_evaluate(cfg_for("--config.train.steps=3"), str(w))
    assert snapshot(w) == before


def test_run_files_are_written_only_after_the_restore(trained, tmp_path):
    """A resume whose checkpoint does not restore leaves the workdir's record of its run (the
    config it was trained with) as it was."""
    w = copy_of(trained, tmp_path)
    for p in (w / "checkpoints" / "2" / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(b"")
    keep = {n: (w / n).read_bytes() for n in ("config.json", "run.json", "model_config.json")}
    with pytest.raises(Exception):  # noqa: B017 - whatever orbax raises for a damaged step
        train_and_evaluate(cfg_for("--config.train.steps=3", "--config.train.lr=1e-3"), str(w))
    assert {n: (w / n).read_bytes() for n in keep} == keep
    assert not (w / ".lock").exists()
