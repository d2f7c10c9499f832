"""`python -m jaxdyn.bench` on a CI-sized preset: JSON fields and the Markdown table (no timing
assertions; speed is reported by the bench, never asserted in tests)."""

import json
import math

import jax
import pytest

from jaxdyn.bench import SUITES, common, run_suites
from jaxdyn.bench.__main__ import main

# Smaller than the bench's own `tiny` preset so the whole file stays well under a minute.
MICRO = common.Preset(dict(family="qwen2", vocab_size=256, hidden_size=32, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                           max_position_embeddings=128),
                      batch=2, seq_len=32, prompt_len=4, new_tokens=6, repeats=1)


@pytest.fixture
def micro(monkeypatch):
    """The MICRO preset, compiled with most XLA optimisations off (JAX practices §10: this is
    a compile-heavy smoke test and nothing here is timed against anything)."""
    monkeypatch.setitem(common.PRESETS, "micro", MICRO)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # scaling's subprocesses
    jax.config.update("jax_disable_most_optimizations", True)
    yield "micro"
    jax.config.update("jax_disable_most_optimizations", False)


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_registry_has_every_suite():
    assert set(SUITES) == {"forward", "decode", "train", "routing", "multitoken", "scaling",
                           "conversion"}


def test_cli_forward_decode_train(micro, tmp_path):
    """The CLI writes JSON + Markdown; jaxdyn and torch rows with ratios, MFU and a trace."""
    out, prof = tmp_path / "r.json", tmp_path / "prof"
    assert main(["--suite", "forward", "--suite", "decode", "--suite", "train", "--preset",
                 micro, "--out", str(out), "--profile", str(prof)]) == 0
    doc = json.loads(out.read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["preset"] == "micro" and meta["env"]["jax"] and meta["env"]["torch"]
    assert _finite_positive(meta["peaks"]["peak_flops_measured"])
    by = {(r["suite"], r["impl"]): r for r in rows}
    assert set(by) == {(s, i) for s in ("forward", "decode", "train") for i in ("jaxdyn", "torch")}
    for suite in ("forward", "decode", "train"):
        jx, pt = by[(suite, "jaxdyn")], by[(suite, "torch")]
        for r in (jx, pt):
            assert _finite_positive(r["tokens_per_s"]) and _finite_positive(r["step_ms"])
        # The ratio is exactly the quotient of the two rows measured in this run.
        assert jx["ref"] == "torch"
        assert jx["ratio"] == pytest.approx(jx["tokens_per_s"] / pt["tokens_per_s"])
    train = by[("train", "jaxdyn")]
    assert train["peak_mem_bytes"] > 0 and isinstance(train["meets_target"], bool)
    # MFU is model FLOPs x tokens/s over the peak measured in the same run.
    assert train["mfu"] == pytest.approx(train["flops_per_token"] * train["tokens_per_s"]
                                         / meta["peaks"]["peak_flops_measured"])
    assert isinstance(by[("decode", "jaxdyn")]["meets_target"], bool)
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[0].startswith("| suite | name | impl | tokens/s | step ms | MFU")
    assert len(md) == 2 + len(rows)
    assert any(prof.rglob("*.xplane.pb")), "no profiler trace written"


def test_routing_rows_carry_flop_ratios(micro):
    from jaxdyn.bench.routing import VARIANTS

    assert VARIANTS == (("dense", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125),
                        ("dtf", 0.5))
    # Two of the five variants keep CI short; the bench itself runs all five.
    rows, _ = run_suites(["routing"], micro, routing_variants=(("dense", None), ("dtf", 0.125)))
    assert [r["name"] for r in rows] == ["dense", "dtf c0.125"]
    dense = rows[0]
    for r in rows[1:]:
        assert r["ref"] == "dense" and isinstance(r["meets_target"], bool)
        assert r["flop_ratio"] == pytest.approx(r["flops_per_token"] / dense["flops_per_token"])
        assert r["train_time_ratio"] == pytest.approx(r["step_ms"] / dense["step_ms"])
        assert r["forward_time_ratio"] == pytest.approx(r["forward_ms"] / dense["forward_ms"])
        assert r["train_over_flop"] == pytest.approx(r["train_time_ratio"] / r["flop_ratio"])
    assert 0 < rows[1]["flop_ratio"] < 1.0  # routed layers at k = T/8 (+ routers, PriorFFN)


def test_scaling_memory_falls_with_devices(micro):
    rows, _ = run_suites(["scaling"], micro, device_counts=(1, 2))
    assert [r["name"] for r in rows] == ["fsdp N=1", "fsdp N=2"], rows
    one, two = rows
    assert one["devices"] == 1 and two["devices"] == 2
    assert one["state_bytes_per_device"] == one["state_bytes_total"]
    # Sharded over fsdp=2, device 0 holds about half (norms and biases stay replicated).
    assert 0.45 < two["memory_ratio"] < 0.6
    assert two["state_bytes_total"] == one["state_bytes_total"]


def test_conversion_suite_reports_a_row(micro):
    rows, _ = run_suites(["conversion"], "tiny")
    (row,) = rows
    assert row["suite"] == "conversion"
    if row["notes"].startswith("skipped"):
        assert row["meets_target"] is None
    else:
        assert row["checkpoint_bytes"] > 0 and row["peak_rss"] >= row["baseline_rss"]
        assert row["ratio"] == pytest.approx(row["import_rss_over_checkpoint"])


def test_unknown_suite_and_preset_are_named():
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(["fwd"], "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        common.get_preset("huge")


def test_markdown_table_formats_ratios_and_flags():
    md = common.markdown_table([{"suite": "s", "name": "n", "impl": "jaxdyn", "ratio": 1.234,
                                 "meets_target": False, "mfu": 0.5}])
    assert "1.23" in md and "NO" in md and "50.0%" in md
