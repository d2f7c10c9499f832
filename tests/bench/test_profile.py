"""The profile suite (jaxdyn/bench/profile.py) at the tiny preset: both sides compute the same
function (forwards equal where the weights are shared), every op has both sides and both
passes, the step split adds up. One timed round; no assertion on a time's size."""

import json
import subprocess

import numpy as np
import pytest

from jaxdyn.bench import DIAGNOSTICS, ORDER, SUITES, common, profile, protocol
from jaxdyn.cli import bench as cli

pytest.importorskip("torch")
pytest.importorskip("transformers")

PASSES = {"fwd", "fwd+bwd"}


@pytest.fixture(scope="module")
def pairs():
    """The tiny preset's pairs, PyTorch on one thread: on a shared 2-core machine OpenMP's
    barriers wait for descheduled threads and make small backward passes erratic."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "torch_threads", lambda: torch.set_num_threads(1) or 1)
        yield profile.build("tiny")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(pairs):
    with protocol.Watch(0.0) as watch:
        out = profile.time_pairs(pairs, rounds=1, warmup=1, pause_s=0.0)
    return protocol.judge(out, watch.facts())


def test_forwards_match_the_reference(pairs):
    """Same weights, same inputs: each component's jaxdyn forward equals the transformers
    module's (so the rows time the same computation)."""
    checked = {}
    for p in pairs:
        if p.check is None:
            continue
        a, b = p.check()
        assert a.shape == b.shape, p.op
        checked[p.op] = float(np.max(np.abs(a - b)))
    assert set(checked) == {*profile.COMPONENTS, profile.STEP}
    for op, err in checked.items():
        assert err < 1e-4, (op, err)


def test_converted_weights_are_the_reference_weights(pairs):
    import torch

    mcfg = common.model_config(common.get_preset("tiny"))
    ref = common.hf_model(mcfg, dtype="float32")
    params = profile.params_from_torch(mcfg, ref)
    want = ref.model.layers[1].mlp.down_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["down"]["kernel"][1]), want)
    assert isinstance(ref.model.layers[0].mlp.up_proj.weight, torch.Tensor)


def test_rows_cover_every_op_on_both_sides(rows):
    by = {(r["op"], r["pass"]): r for r in rows}
    for op in profile.COMPONENTS:
        assert {ps for o, ps in by if o == op} == PASSES, op
    assert (("optimizer", "update")) in by
    assert {ps for o, ps in by if o == profile.STEP} == {"fwd", "fwd+bwd", "backward", "whole"}
    for r in rows:
        assert r["suite"] == "profile" and r["impl"] == "jaxdyn"
        assert r["name"] == f"{r['op']} {r['pass']}"
        for k in ("jaxdyn_ms", "torch_ms", "share", "torch_share", "spread"):
            assert isinstance(r[k], float), (r["name"], k)
        if r.get("derived"):  # backward = fwd+bwd − fwd: one noisy round can make it <= 0
            continue
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["jaxdyn_ms"])
        assert r["per_step"] >= 1
        assert isinstance(r["noisy"], bool) and "load_before" in r
    whole = by[(profile.STEP, "whole")]
    assert whole["share"] == pytest.approx(1.0) and whole["torch_share"] == pytest.approx(1.0)
    L = common.get_preset("tiny").model["num_layers"]
    assert by[("mlp", "fwd")]["per_step"] == L and by[("rmsnorm", "fwd")]["per_step"] == 2 * L + 1


def test_step_split_adds_up(rows):
    """fwd + bwd (+ optimizer) is the whole step within a generous factor (one round on a
    shared machine); backward is the difference of the two timed passes."""
    by = {(r["op"], r["pass"]): r for r in rows}
    fwd, both = by[(profile.STEP, "fwd")], by[(profile.STEP, "fwd+bwd")]
    back, opt = by[(profile.STEP, "backward")], by[("optimizer", "update")]
    whole = by[(profile.STEP, "whole")]
    for side in ("jaxdyn_ms", "torch_ms"):
        assert back[side] == pytest.approx(both[side] - fwd[side])
        total = fwd[side] + back[side] + opt[side]
        assert whole[side] / 10 < total < 10 * whole[side], (side, total, whole[side])


def test_markdown_has_the_profile_columns(rows):
    md = common.markdown_table(rows)
    header = md.splitlines()[0]
    for h in ("op", "pass", "jaxdyn ms", "torch ms", "ratio", "share of step", "spread"):
        assert f"| {h} |" in header
    json.dumps(common._clean(rows), allow_nan=False)


def test_profile_is_a_named_suite_not_part_of_all():
    assert "profile" in DIAGNOSTICS and "profile" not in SUITES and "profile" not in ORDER
    args = cli.parser().parse_args(["--suite", "profile", "--xla-sweep"])
    assert args.suite == ["profile"] and args.xla_sweep == "candidates"
    args = cli.parser().parse_args(["--xla-sweep=--xla_cpu_enable_fast_math=true;"])
    assert args.xla_sweep.startswith("--xla_cpu")


def test_sweep_rows_against_the_bracketing_defaults(monkeypatch):
    """Row assembly of the XLA_FLAGS sweep, workers faked: ratio against the mean of the two
    default runs, their drift folded into the spread, a failing set reported."""
    times = iter([100.0, 80.0, 0.0, 120.0])  # default, set A, set B (fails), default again
    seen = []

    def fake_run(cmd, env, **kw):
        seen.append(env["XLA_FLAGS"])
        ms = next(times)
        if not ms:
            return subprocess.CompletedProcess(cmd, 1, "", "Unknown flag in XLA_FLAGS")
        res = {"xla_flags": env["XLA_FLAGS"], "facts": {"suite_noise": []},
               "ops": {"train step whole": {"ms": ms, "spread": 0.01}}}
        return subprocess.CompletedProcess(cmd, 0, profile.MARK + json.dumps(res), "")

    monkeypatch.setattr(profile.subprocess, "run", fake_run)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    rows = profile.sweep("tiny", ("--a=1", "--b=1"), {})
    assert seen == ["", "--a=1", "--b=1", ""]
    assert [r["name"] for r in rows] == ["xla default", "xla --a=1", "xla --b=1",
                                         "xla default (again)"]
    a = rows[1]
    assert a["ratio"] == pytest.approx(110.0 / 80.0)
    assert a["spread"] == pytest.approx(20.0 / 110.0)  # the defaults' drift
    assert "failed" in rows[2]["notes"] and "jaxdyn_ms" not in rows[2]
    judged = protocol.judge(rows, {"load_before": 0.0, "load_after": 0.0, "foreign_cpu": 0.0,
                                   "cpu_count": 2, "suite_noise": []})
    assert judged[1]["noisy"]  # 18 % drift > MAX_SPREAD
