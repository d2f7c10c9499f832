"""Multi-process runtime: launch/local.sh starts a real 2-process JAX job on this host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdyn import distributed

ROOT = Path(__file__).resolve().parents[1]


def test_env_parsing():
    cfg = distributed.from_env({"JAXDYN_COORDINATOR": "h:1", "JAXDYN_NUM_PROCESSES": "4",
                                "JAXDYN_PROCESS_ID": "3", "JAXDYN_LOCAL_DEVICE_IDS": "0,1"})
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("h:1", 4, 3)
    assert cfg.local_device_ids == (0, 1)
    assert not distributed.cluster_detected({})
    assert distributed.cluster_detected({"SLURM_NTASKS": "2"})


def test_missing_process_id_is_a_clear_error():
    with pytest.raises(ValueError, match="JAXDYN_PROCESS_ID"):
        distributed.init(distributed.DistributedConfig(coordinator="127.0.0.1:1",
                                                       num_processes=2))


def test_local_launch_two_processes_collectives():
    env = {**os.environ, "JAXDYN_MODULE": "jaxdyn.distributed", "PYTHON": sys.executable,
           "JAXDYN_CPU_DEVICES": "2", "XLA_FLAGS": ""}
    out = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "2"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line.split("] ", 1)[1]) for line in out.stdout.splitlines()
            if line.split("] ", 1)[-1].startswith("{")]
    assert sorted(r["process"] for r in rows) == [0, 1]
    for r in rows:
        assert r["devices"] == 4 and r["local_devices"] == 2
        assert r["sum_of_process_ids"] == 2.0  # 0 + 0 + 1 + 1 over the 4 devices
