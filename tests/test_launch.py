"""launch/local.sh: N is checked, paths are the caller's, and SIGTERM reaches every trainer, which
saves and exits 0 before the launcher does. gpu_nodes.sh / tpu_pod.sh: argument checks only
(they need SSH hosts / a TPU pod)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = str(ROOT / "launch" / "local.sh")
TINY = ["--config", "configs/standard.py:tiny", "--config.train.steps=100000",
        "--config.log.every=1", "--config.checkpoint.every=100000",
        "--config.eval.every=100000", "--config.data.max_documents=60",
        "--config.train.batch_size=4", "--config.train.seq_len=32",
        "--config.log.tensorboard=false", "--config.checkpoint.async_save=false"]


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (a /proc scan, no psutil)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(int(d.name))
    return out


def _max_step(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:  # a line being written
            pass
    return max(steps, default=0)


@pytest.mark.parametrize("n", ["0", "-1", "abc", "1.5", ""])
def test_local_sh_refuses_a_bad_process_count(tmp_path, n):
    marker = str(tmp_path / "never")
    out = subprocess.run(["bash", LOCAL, n, "--workdir", marker], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage: bash launch/local.sh N"), out.stderr
    assert out.stdout == "" and not os.path.exists(marker)
    assert not _processes_mentioning(marker)


def test_remote_launchers_check_their_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTS", "TPU_NAME", "ZONE")}
    for script, msg in (("gpu_nodes.sh", "HOSTS"), ("tpu_pod.sh", "TPU_NAME")):
        out = subprocess.run(["bash", str(ROOT / "launch" / script), "--workdir", "x"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and msg in out.stderr, (script, out)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# A stand-in entry module: reports where it runs, then waits for SIGTERM, "saves" and exits 0
# (or exits at once with status $EXIT_<process id> when that is set).
STUB = """
import json, os, signal, sys, time
pid = os.environ.get("JAXDYN_PROCESS_ID")
code = os.environ.get(f"EXIT_{pid}")
if code:
    sys.exit(int(code))
def stop(signum, frame):
    with open(f"saved-{pid}", "w") as f:
        f.write(str(signum))
    print(f"process {pid}: saved on signal {signum}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(f"ready-{pid}", "w") as f:
    json.dump({"cwd": os.getcwd(), "argv": sys.argv[1:], "pid": os.getpid()}, f)
while True:
    time.sleep(0.05)
"""


def _stub_env(tmp_path: Path, **extra) -> dict:
    mod = tmp_path / "mods"
    mod.mkdir(exist_ok=True)
    (mod / "jaxdyn_stub.py").write_text(STUB)
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(mod),
            "JAXDYN_MODULE": "jaxdyn_stub", "TMPDIR": str(tmp_path), **extra}


def _wait_for(paths, proc, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline and not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert all(p.exists() for p in paths), paths


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_sh_forwards_the_signal_to_each_python_process(tmp_path, sig):
    work = tmp_path / "here"
    work.mkdir()
    proc = subprocess.Popen(["bash", LOCAL, "3", "--workdir", "runs/x", "a b"], cwd=work,
                            env=_stub_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([work / f"ready-{i}" for i in range(3)], proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    for i in range(3):
        ready = json.loads((work / f"ready-{i}").read_text())
        assert ready["cwd"] == str(work) and ready["argv"] == ["--workdir", "runs/x", "a b"]
        assert (work / f"saved-{i}").read_text() == str(int(signal.SIGTERM))
        assert f"[p{i}] process {i}: saved on signal 15" in out
        assert not Path(f"/proc/{ready['pid']}").exists()
    assert "sending SIGTERM to 3 process(es)" in err


def test_local_sh_exits_with_a_failed_process_status(tmp_path):
    out = subprocess.run(["bash", LOCAL, "2"], cwd=tmp_path, capture_output=True, text=True,
                         env=_stub_env(tmp_path, EXIT_0="0", EXIT_1="3"), timeout=60)
    assert out.returncode == 3, out


def test_gpu_nodes_sh_stops_remote_processes_through_ssh(tmp_path):
    """With a stand-in `ssh` that runs the remote command here: processes start in the
    caller's folder, SIGTERM to the launcher reaches them (via each session's stdin)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    (bin_dir / "ssh").chmod(0o755)
    work = tmp_path / "here"
    work.mkdir()
    env = _stub_env(tmp_path, HOSTS="h1 h2", PATH=f"{bin_dir}:{os.environ['PATH']}",
                    PORT="1")
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "gpu_nodes.sh"), "--workdir", "r"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for([work / "ready-0", work / "ready-1"], proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    assert "[h1] process 0: saved" in out and "[h2] process 1: saved" in out
    assert json.loads((work / "ready-1").read_text())["cwd"] == str(work)


@pytest.mark.slow
def test_local_sh_sigterm_saves_every_process_in_the_callers_folder(tmp_path):
    """Two trainers from cwd=tmp_path with a relative --workdir: SIGTERM to the launcher reaches
    both Python processes, they save a checkpoint under tmp_path (not the repository) and exit
    0, and the launcher exits 0 after them, leaving no process behind."""
    rel = f"runs/launch-{os.getpid()}-{time.time_ns()}"
    work = tmp_path / rel
    env = {**os.environ, "PYTHON": sys.executable, "JAXDYN_CPU_DEVICES": "1", "XLA_FLAGS": "",
           "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", LOCAL, "2", *TINY, "--workdir", rel], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and _max_step(work) < 2 and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert _max_step(work) >= 2, "no training step within the deadline"
        children = [p for p in _processes_mentioning(rel) if p != proc.pid]
        assert len(children) == 2, children  # the two Python trainers (sed does not name it)
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for pid in _processes_mentioning(rel):
                os.kill(pid, signal.SIGKILL)
            pytest.fail("launcher still waiting 180 s after SIGTERM:\n"
                        + proc.communicate(timeout=30)[0][-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in _processes_mentioning(rel):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "[p0] " in out and "preempted: saved step" in out, out[-3000:]
    assert not _processes_mentioning(rel), "a trainer outlived the launcher"
    saved = [p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and int(max(saved, key=int)) >= 2, saved
    assert not (ROOT / rel).exists()


def test_accelerator_check_names_real_suites_and_parses():
    """launch/accelerator_check.sh cannot run here (no accelerator; its CPU dry run takes two
    minutes, docs/scale-out.md): check that bash parses it and that every bench suite and
    preset it asks for exists, so the day a GPU is lent it does not die on a typo."""
    import re

    from jaxdyn.bench import SUITES
    from jaxdyn.bench.common import get_preset

    script = ROOT / "launch" / "accelerator_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    suites = set(re.findall(r"--suite (\w+)", text))
    assert suites >= {"kernels", "train", "routing", "attention"} and suites <= set(SUITES)
    preset = re.search(r'PRESET="\$\{PRESET:-([^}]+)\}"', text).group(1)
    assert preset == "qwen2.5-0.5b" and get_preset(preset).model["hidden_size"] == 896
