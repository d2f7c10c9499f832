"""End-to-end training on the built-in corpus: learning, exact resume, preemption, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdyn.checkpoint import Checkpointer, save_params
from jaxdyn.model import init_params, tiny
from jaxdyn.train import CheckpointMismatchError, NonFiniteLossError, schema, train_and_evaluate
from jaxdyn.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--config.data.max_documents=60", "--config.train.batch_size=4",
        "--config.train.seq_len=32", "--config.log.tensorboard=false",
        "--config.checkpoint.async_save=false", "--config.sample.max_new_tokens=4",
        "--config.mesh.data=1"]


def cfg_for(*overrides, spec="configs/standard.py:tiny"):
    return schema.load(spec, [*FAST, *overrides])


def test_loss_falls_and_validation_runs(tmp_path):
    last = train_and_evaluate(cfg_for("--config.train.steps=30", "--config.eval.every=15"),
                              str(tmp_path))
    rows = read_metrics(str(tmp_path))
    train = [r["train/loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0] - 1.0, train
    assert [r["step"] for r in rows if r["split"] == "val"] == [15, 30]
    assert np.isfinite(last["val/loss"]) and rows[-1]["step"] == 30
    for name in ("config.json", "run.json", "model_config.json", "tokenizer"):
        assert (tmp_path / name).exists(), name


def final_params(workdir):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    params = ck.restore_params(ck.latest_step())
    ck.close()
    return params


@pytest.mark.parity
@pytest.mark.parametrize("spec", ["configs/standard.py:tiny", "configs/mtp.py:tiny",
                                  "configs/temporal.py:tiny"])
def test_resume_is_exact(tmp_path, spec):
    """Every objective: 4 steps, stop, resume for 4 more == 8 uninterrupted steps, bit for bit
    (parameters, optimizer-driven metrics, data order)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--config.checkpoint.every=4", "--config.log.every=2", "--config.eval.every=100",
              "--config.sample.max_new_tokens=0"]
    if "temporal" in spec:  # records keep their static shapes; only the run sizes change
        common += ["--config.train.batch_size=4"]
    cfg = lambda *o: schema.load(spec, [*(FAST if "temporal" not in spec else FAST[3:]), *o])
    train_and_evaluate(cfg("--config.train.steps=8", *common), a)
    # stop after N (keeping the 8-step schedule) ... then resume for N more
    train_and_evaluate(cfg("--config.train.steps=8", "--config.train.stop_at_step=4", *common), b)
    train_and_evaluate(cfg("--config.train.steps=8", *common), b)
    jax.tree.map(np.testing.assert_array_equal, final_params(a), final_params(b))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time",) and "per_sec" not in k
                           and "mfu" not in k} for r in rows if r["split"] == "train"]
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_interrupted_save_falls_back_to_previous_checkpoint(tmp_path):
    w = str(tmp_path)
    train_and_evaluate(cfg_for("--config.train.steps=4", "--config.checkpoint.every=4"), w)
    # What a SIGKILL in the middle of saving step 8 leaves behind: orbax's uncommitted tmp dir.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 100)
    ck = Checkpointer(os.path.join(w, "checkpoints"), async_save=False)
    assert ck.latest_step() == 4
    ck.close()
    last = train_and_evaluate(cfg_for("--config.train.steps=6", "--config.checkpoint.every=4"), w)
    assert np.isfinite(last["train/loss"])
    assert [r["step"] for r in read_metrics(w) if r["split"] == "train"][-1] == 6


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    w = str(tmp_path)
    cmd = [sys.executable, "-m", "jaxdyn.train", "--config", "configs/standard.py:tiny",
           "--workdir", w, *FAST, "--config.train.steps=100000", "--config.log.every=1",
           "--config.checkpoint.every=100000", "--config.eval.every=100000"]
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            r.get("step", 0) >= 3 for r in read_metrics(w)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted: saved step" in out
    ck = Checkpointer(os.path.join(w, "checkpoints"), async_save=False)
    saved = ck.latest_step()
    ck.close()
    assert saved is not None and saved >= 3
    last = train_and_evaluate(cfg_for(f"--config.train.steps={saved + 2}",
                                      "--config.eval.every=100000"), w)
    assert np.isfinite(last["train/loss"])


def test_nan_loss_names_step_and_saves_nothing_after(tmp_path):
    cfg = cfg_for("--config.train.steps=20", "--config.train.lr=1e30",
                  "--config.train.clip_norm=0.0", "--config.train.warmup_steps=0",
                  "--config.log.every=1", "--config.checkpoint.every=1000")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*last good checkpoint is none"):
        train_and_evaluate(cfg, str(tmp_path))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit()]
    bad = [r for r in read_metrics(str(tmp_path)) if r.get("nonfinite")]
    assert not bad or bad[-1]["train/loss"] is None


def test_clear_errors_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train_and_evaluate(cfg_for("--config.train.seq_len=1024"), str(tmp_path / "a"))
    assert not (tmp_path / "a" / "checkpoints").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from jaxdyn.data import EmptyDatasetError
    with pytest.raises((EmptyDatasetError, FileNotFoundError)):
        train_and_evaluate(cfg_for(f"--config.data.source={empty}"), str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError):
        train_and_evaluate(cfg_for(f"--config.data.source={tmp_path / 'missing.jsonl'}"),
                           str(tmp_path / "c"))


def test_init_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = tiny("llama", hidden_size=32, head_dim=8, vocab_size=258)
    d = tmp_path / "import"
    d.mkdir()
    other.save(str(d / "model_config.json"))
    save_params(str(d / "params"), init_params(other, jax.random.key(0)))
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        train_and_evaluate(cfg_for(f"--config.init.checkpoint={d}",
                                   "--config.tokenizer.kind=byte"), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("spec", ["configs/mod.py:tiny", "configs/dtf.py:tiny"])
def test_routed_models_train_and_log_router_metrics(tmp_path, spec):
    train_and_evaluate(cfg_for("--config.train.steps=4", "--config.log.every=2",
                               "--config.eval.batches=1", "--config.sample.max_new_tokens=0",
                               spec=spec), str(tmp_path))
    row = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"][-1]
    assert row["train/router/selected_frac"] == pytest.approx(0.5, abs=0.05)
    assert "train/router/layer_1/selected_frac" in row
    key = "train/router/G_mean" if "dtf" in spec else "train/router/gate_mean"
    assert key in row, sorted(row)
    json.dumps(row)
    val = [r for r in read_metrics(str(tmp_path)) if r["split"] == "val"][-1]
    assert {"val/loss", "val_causal/loss", "val_causal/router/selected_frac",
            "val_causal/router/causal_acc"} <= set(val), sorted(val)
    assert np.isfinite(val["val_causal/loss"])


def test_transfer_run_logs_the_dense_first_batch_loss(tmp_path, capsys):
    """Dense import -> MoD at capacity 1 with unit gates: the routed model at step 0 *is* the
    dense model, so the logged first-batch losses must agree."""
    mod_cfg = schema.model_config(cfg_for("--config.tokenizer.kind=byte",
                                             spec="configs/mod.py:tiny"))
    dense_cfg = mod_cfg.replace(arch="dense", routing={})
    d = tmp_path / "import"
    d.mkdir()
    dense_cfg.save(str(d / "model_config.json"))
    save_params(str(d / "params"), init_params(dense_cfg, jax.random.key(0)))
    train_and_evaluate(cfg_for(f"--config.init.checkpoint={d}", "--config.tokenizer.kind=byte",
                               "--config.train.steps=1", "--config.eval.causal_mode=false",
                               "--config.eval.batches=1", "--config.sample.max_new_tokens=0",
                               "--config.model.routing.capacity=1.0",
                               "--config.model.routing.gate=ones", spec="configs/mod.py:tiny"),
                       str(tmp_path / "w"))
    row = [r for r in read_metrics(str(tmp_path / "w")) if r["split"] == "transfer"]
    assert len(row) == 1 and row[0]["step"] == 0
    assert row[0]["transfer/routed_nll"] == pytest.approx(row[0]["transfer/dense_nll"],
                                                          abs=1e-5)
    assert "transfer: first-batch loss dense" in capsys.readouterr().out
