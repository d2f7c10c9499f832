"""Multi-process runtime: launch/local.sh starts a real 2-process JAX job on this host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


TRAIN = ["--config", "configs/standard.py:tiny", "--config.data.max_documents=60",
         "--config.train.batch_size=4", "--config.train.seq_len=32",
         "--config.train.warmup_steps=0", "--config.log.every=1", "--config.eval.every=100",
         "--config.checkpoint.every=3", "--config.checkpoint.async_save=false",
         "--config.log.tensorboard=false", "--config.sample.max_new_tokens=2"]


def _reference_losses(steps: int) -> list[float]:
    """The same global batches on one process and one device: rows of process 0, then 1."""
    import jax
    import numpy as np

    from jaxdyn import sharding
    from jaxdyn.data import DataConfig, make_train_iterator
    from jaxdyn.data.tokenizer import make_tokenizer
    from jaxdyn.train import create_train_state, make_train_step, schema

    cfg = schema.load(TRAIN[1], [*TRAIN[2:], "--config.train.steps=3"])
    tok = make_tokenizer("byte", directory="")
    cfg = schema.finalize(cfg, vocab_size=tok.vocab_size)
    its = [make_train_iterator(DataConfig(**{**cfg.data.to_dict(), "cache_dir": ""}), tok,
                               seq_len=32, batch_size=2, seed=cfg.train.seed, process_index=i,
                               process_count=2) for i in range(2)]
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = create_train_state(cfg, jax.random.key(cfg.train.seed), mesh=one)
    step = jax.jit(make_train_step(cfg))
    losses = []
    with jax.set_mesh(one), sharding.rules_context():
        for _ in range(steps):
            parts = [next(it) for it in its]
            batch = {k: np.concatenate([p[k] for p in parts])[None] for k in parts[0]}
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    return losses


@pytest.mark.slow
def test_local_sh_trains_on_two_processes_then_resumes_on_one(tmp_path):
    """`launch/local.sh 2`: 2 processes x 2 devices, a hybrid mesh (data across processes via
    dcn_data=2, fsdp=2 inside each); loss = one process on the same global batch; the
    checkpoint then resumes on a single process."""
    from jaxdyn.train.metrics import read_metrics

    work = str(tmp_path / "run")
    env = {**os.environ, "PYTHON": sys.executable, "JAXDYN_CPU_DEVICES": "2", "XLA_FLAGS": ""}
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"]
    out = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "2", *TRAIN, *mesh,
                          "--config.train.steps=3", "--workdir", work], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[p0] model:" in out.stdout and "[p1] model:" not in out.stdout  # p0 logs only
    assert "'data': 2, 'fsdp': 2" in out.stdout
    assert "[p0] sample: 'def ' -> " in out.stdout  # params gathered by both, p0 decodes
    rows = [r for r in read_metrics(work) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer
    ref = _reference_losses(3)
    np.testing.assert_allclose([r["train/loss"] for r in rows], ref, rtol=0, atol=1e-5)

    # The resume is a smoke run (nothing compared to a reference), so it compiles with most XLA
    # optimisations off (docs/testing.md) and skips the closing sample (the 2-process run
    # above already drew one as a collective).
    env1 = {**env, "JAXDYN_CPU_DEVICES": "2", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    out = subprocess.run([sys.executable, "-m", "jaxdyn.train", *TRAIN,
                          "--config.sample.max_new_tokens=0", "--config.train.steps=5",
                          "--workdir", work], env=env1, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from step 3" in out.stdout and "resumed on 1" in out.stdout
    rows = [r for r in read_metrics(work) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
