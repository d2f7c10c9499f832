"""The dense → routed transfer study (jaxdyn/experiments/transfer.py): the run configs carry
the thesis recipe, the tiny study runs end to end through the trainer, and the verdicts follow
the numbers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdyn.config.errors import ConfigValueError
from jaxdyn.experiments import transfer
from jaxdyn.train import schema

TINY = "configs/transfer.py:tiny"


def test_arm_configs_carry_the_thesis_recipe():
    base = schema.load(TINY)
    study = transfer.StudyConfig.of(base.experiment)
    dtf = transfer.arm_config(base, study, "dtf@0.125", 2, "/ckpt")
    assert (dtf.model.arch, dtf.model.routing.capacity) == ("dtf", 0.125)
    assert (dtf.train.seed, dtf.train.steps, dtf.init.checkpoint) == (2, study.steps, "/ckpt")
    assert dtf.train.clip_norm == 0.0 and dtf.train.min_lr_ratio == 0.0
    # The thesis's absolute LRs for new parameters: prior and causal routers 1e-3, gate
    # scalars 1e-2; the MoD router at the base LR.
    lr = {pat: dtf.train.lr * m for pat, m in dtf.train.lr_groups}
    assert lr["prior"] == pytest.approx(1e-3) and lr["predictor/"] == pytest.approx(1e-3)
    assert max(lr.values()) == pytest.approx(1e-2)  # gate scalars
    mod = transfer.arm_config(base, study, "mod@0.5", 0, "/ckpt")
    assert dict(mod.train.lr_groups) == {"router/w": 1.0, "predictor/": 10.0}
    scratch = transfer.arm_config(base, study, "mod@0.5", 0, "")
    assert scratch.init.checkpoint == "" and scratch.train.lr_groups == ()
    assert scratch.train.lr == study.scratch_lr
    dense = transfer.arm_config(base, study, "dense", 0, "/ckpt")
    assert dense.model.arch == "dense" and dense.train.lr == study.lr
    with pytest.raises(ConfigValueError, match="arm 'moe@0.5'"):
        transfer.parse_arm("moe@0.5")
    with pytest.raises(ConfigValueError, match="γ must be in"):
        transfer.parse_arm("dtf@1.5")


def _run(arm, seed, causal, topk=None, ratio=1.0, variant="transfer"):
    steps = [10, 20, 30, 40]
    return {"variant": variant, "arm": arm, "seed": seed, "step": steps,
            "causal": list(causal), "topk": list(topk or causal), "flop_ratio": ratio,
            "flops_per_step": 1e9 * ratio}


def test_verdicts_follow_the_numbers():
    dense = [_run("dense", s, [4.0, 3.0, 2.0, 1.0]) for s in range(3)]
    # DTF below MoD by far more than the seed spread; MoD at 0.5 of dense's FLOPs ends at
    # 1.5, dense at those FLOPs (step 20 of 40) is at 3.0: routed beats dense.
    mod = [_run("mod@0.5", s, [4, 3, 2, 1.5 + 0.01 * s], ratio=0.5) for s in range(3)]
    dtf = [_run("dtf@0.5", s, [4, 3, 2, 1.2 + 0.01 * s], ratio=0.5) for s in range(3)]
    out = transfer.summarize({"runs": dense + mod + dtf})
    rows = {r["arm"]: r for r in out["rows"]}
    assert rows["mod@0.5"]["causal_mean"] == pytest.approx(1.51)
    assert rows["mod@0.5"]["causal_std"] == pytest.approx(np.std([1.5, 1.51, 1.52], ddof=1))
    assert rows["mod@0.5"]["dense_at_equal_flops"] == pytest.approx(3.0)
    text = "\n".join(out["verdicts"])
    assert "DTF < MoD" in text and "**reproduced**" in text and "DTF lower on 3 of 3" in text
    assert "mod@0.5: routed beats dense at equal FLOPs — **yes**" in text
    # Reversed: DTF above MoD is "not reproduced"; a gap inside the seed spread is named so.
    dtf_bad = [_run("dtf@0.5", s, [4, 3, 2, 1.6 + 0.01 * s], ratio=0.5) for s in range(3)]
    text = "\n".join(transfer.summarize({"runs": dense + mod + dtf_bad})["verdicts"])
    assert "**not reproduced**" in text
    dtf_close = [_run("dtf@0.5", s, [4, 3, 2, 1.48 + 0.02 * s], ratio=0.5) for s in range(3)]
    text = "\n".join(transfer.summarize({"runs": dense + mod + dtf_close})["verdicts"])
    assert "within seed noise" in text


def test_a_diverged_run_is_reported_not_averaged():
    dense = [_run("dense", 0, [4.0, 3.0, 2.0, 1.0])]
    mod = [_run("mod@0.5", 0, [4, 3, 2, 1.5], ratio=0.5)]
    bad = {**_run("dtf@0.5", 0, [], ratio=0.5), "diverged": "loss is not finite at step 18"}
    out = transfer.summarize({"runs": dense + mod + [bad]})
    assert [r["arm"] for r in out["rows"]] == ["dense", "mod@0.5"]
    assert any("dtf@0.5, seed 0: **diverged** (loss is not finite at step 18)" in v
               for v in out["verdicts"])


def test_loss_at_flops_interpolates_in_flops():
    run = _run("dense", 0, [4.0, 3.0, 2.0, 1.0])  # 1 GFLOP per step, evals at 10..40
    assert transfer.loss_at_flops(run, 15e9, "causal") == pytest.approx(3.5)
    assert transfer.loss_at_flops(run, 40e9, "causal") == pytest.approx(1.0)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """Pretrain → continue DTF from the dense checkpoint through the trainer (MoD and the
    dense continuation go the same way; two runs keep this short)."""
    cfg = schema.load(TINY, ["--config.experiment.scratch_arms=()",
                             "--config.experiment.arms=('dtf@0.5',)"])
    res = transfer.run_study(cfg, str(tmp_path))
    ((r),) = res["runs"]
    assert (r["variant"], r["arm"]) == ("transfer", "dtf@0.5") and not r["diverged"]
    assert len(r["causal"]) == len(r["topk"]) >= 1 and np.isfinite(r["causal"]).all()
    assert 0 < r["flop_ratio"] < 1.0
    # The routed model started from the pretrained dense one: the trainer logged the dense
    # source's loss on the first batch (a transfer row) ...
    assert set(r["transfer_row"]) >= {"transfer/dense_nll", "transfer/routed_nll"}
    # ... and it ends near the pretrained model, far below a random model's ln(258) ≈ 5.55.
    assert r["causal"][-1] < res["pretrain"]["causal"][0] + 0.5
    assert os.path.exists(tmp_path / "val_loss_vs_flops.png")
    assert "| transfer | dtf@0.5 | 1 |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["study"]["seeds"] == [0]
    # A finished run is not trained again: a rerun reads its study_run.json.
    again = transfer.run_study(cfg, str(tmp_path))
    assert again["runs"][0]["seconds"] == r["seconds"]
