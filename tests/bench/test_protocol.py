"""The measurement protocol (jaxdyn.bench.protocol): interleaved rounds, spread, load and
foreign-CPU facts, and no verdict on a noisy row or against a noisy reference."""

import subprocess
import sys
import time

import pytest

from jaxdyn.bench import protocol


def test_interleave_alternates_the_order_and_reports_median_and_spread():
    calls = []
    fake = {"a": [0.10, 0.12, 0.11], "b": [0.20, 0.20, 0.30]}

    def make(name):
        def fn():
            calls.append(name)
            return fake[name][calls.count(name) - 2]  # after 1 warm-up (index -1 then)
        return fn

    out = protocol.interleave({"a": make("a"), "b": make("b")}, rounds=3, warmup=1, pause_s=0)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then AB BA AB
    assert out["a"]["times"] == [0.10, 0.12, 0.11] and out["a"]["median_s"] == 0.11
    assert out["b"]["range"] == pytest.approx((0.30 - 0.20) / 0.20)
    # spread is the interquartile range (linear quantiles) / median: q1 0.20, q3 0.25
    assert out["b"]["spread"] == pytest.approx((0.25 - 0.20) / 0.20)
    five = protocol.summary([1.0, 1.0, 1.0, 1.0, 2.0])  # one slow round: range, not spread
    assert five["range"] == pytest.approx(1.0) and five["spread"] == 0.0
    assert out["b"]["best_s"] == 0.20 and out["b"]["rounds"] == 3


def test_wall_time_counts_when_the_callable_reports_nothing():
    out = protocol.interleave({"sleep": lambda: time.sleep(0.02)}, rounds=2)
    assert 0.015 < out["sleep"]["median_s"] < 1.0


def _rows():
    return [{"suite": "train", "name": "x", "impl": "jaxdyn", "ref": "torch", "ratio": 1.3,
             "meets_target": True, "target": ">= 1.0x torch (CPU)", "spread": 0.02},
            {"suite": "train", "name": "x", "impl": "torch", "spread": 0.03}]


QUIET = {"load_before": 0.3, "load_after": 2.0, "foreign_cpu": 0.01, "cpu_count": 2,
         "suite_noise": []}


def test_a_quiet_suite_keeps_its_verdict_and_records_the_facts():
    jx, pt = protocol.judge(_rows(), QUIET)
    assert jx["meets_target"] is True and not jx["noisy"] and jx["noise"] == ""
    assert jx["load_before"] == 0.3 and pt["foreign_cpu"] == 0.01 and "suite_noise" not in jx


def test_a_loaded_machine_gets_no_verdict():
    loud = dict(QUIET, load_before=3.2, suite_noise=["load 3.20 > 1.5 before the suite"])
    jx, pt = protocol.judge(_rows(), loud)
    assert jx["meets_target"] is None and jx["noisy"] and pt["noisy"]
    assert "not judged: noisy" in jx["target"] and "load 3.20" in jx["noise"]


def test_a_noisy_reference_row_of_another_name_withholds_the_verdict():
    rows = [{"name": "dense", "impl": "jaxdyn", "spread": 0.3},
            {"name": "dtf c0.5", "impl": "jaxdyn", "ref": "dense", "spread": 0.01,
             "meets_target": True, "target": "t"}]
    dense, dtf = protocol.judge(rows, QUIET)
    assert dense["noisy"] and dtf["noisy"] and dtf["meets_target"] is None


def test_load_cannot_void_a_verdict_that_is_not_about_time():
    """Kernel parity or compiled memory: no spread, so a loaded machine keeps the verdict."""
    loud = dict(QUIET, load_before=3.2, suite_noise=["load 3.20 > 1.5 before the suite"])
    (row,) = protocol.judge([{"suite": "kernels", "name": "k", "impl": "blockwise",
                              "meets_target": True}], loud)
    assert row["meets_target"] is True and not row["noisy"] and row["load_before"] == 3.2


def test_a_wide_spread_on_the_reference_withholds_the_verdict():
    rows = _rows()
    rows[1]["spread"] = 0.25
    jx, pt = protocol.judge(rows, QUIET)
    assert pt["noisy"] and "spread 25%" in pt["noise"]
    assert jx["noisy"] and jx["noise"] == "reference torch is noisy"
    assert jx["meets_target"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="foreign CPU is read from /proc/stat (Linux; CI runs Linux)")
def test_watch_sees_another_process_using_the_cores():
    """A busy process that is not this one (nor a waited-for child) counts as foreign CPU."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\n"
                             "while time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        with protocol.Watch(settle_s=0) as w:
            time.sleep(1.0)
        facts = w.facts()
    finally:
        busy.kill()
        busy.wait()
    assert facts["foreign_cpu"] is not None, "Linux has /proc/stat: foreign CPU must be measured"
    # one spinning process = one core's worth: at least about 1 / cpu_count of the machine
    assert facts["foreign_cpu"] >= 0.6 / facts["cpu_count"]
    assert facts["foreign_cpu"] > protocol.MAX_FOREIGN or facts["cpu_count"] > 4
    assert facts["load_before"] >= 0 and "suite_noise" in facts
