"""`python -m jaxdyn.bench` on CI-sized presets: JSON fields and the Markdown table (no timing
assertions; speed is reported by the bench, never asserted in tests)."""

import dataclasses
import json
import math

import pytest

from configs import presets as preset_table
from configs.presets import base_config
from jaxdyn.bench import SUITES, common, multitoken, run_suites
from jaxdyn.cli.bench import main

# Smaller than the `tiny` preset so the whole file stays short; registered in memory only.
MICRO = common.Preset(dict(family="qwen2", vocab_size=256, hidden_size=32, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                           max_position_embeddings=128),
                      batch=2, seq_len=32, prompt_len=4, new_tokens=6, repeats=1)
# The multitoken suite's `smoke` sizes cut further: the harness end to end, nothing measured.
MTP_MICRO = dict(multitoken.PRESETS["smoke"], dense_steps=4, mtp_steps=4, train_docs=24,
                 prompts=1, max_new=8, mechanism=4, eps=(0.0, 1.0), top_ks=(10,))


@pytest.fixture
def micro(monkeypatch):
    """The MICRO preset, registered in memory beside those of configs/bench.py."""
    monkeypatch.setitem(common.LOADED, "micro", MICRO)
    return "micro"


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_registry_has_every_suite():
    assert set(SUITES) == {"forward", "decode", "train", "routing", "inference", "multitoken",
                           "scaling", "conversion", "data", "attention", "kernels"}


def test_presets_come_from_the_config_table(monkeypatch):
    """A bench preset is configs/presets.py's entry: base_config's model, its bench block."""
    monkeypatch.setattr(common, "LOADED", {})
    bench_names = [n for n, p in preset_table.PRESETS.items() if "bench" in p]
    assert bench_names == ["tiny", "small", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    for name in bench_names:
        p = common.get_preset(name)
        assert p.model == base_config(name).model.to_dict()
        work = preset_table.PRESETS[name]["bench"]
        assert {f: getattr(p, f) for f in work} == work and p.torch is True
    tiny, small = common.get_preset("tiny"), common.get_preset("small")
    shape = lambda p: {k: p.model[k] for k in ("hidden_size", "num_layers", "vocab_size")}
    assert shape(tiny) == {"hidden_size": 64, "num_layers": 4, "vocab_size": 258}
    assert shape(small) == {"hidden_size": 384, "num_layers": 8, "vocab_size": 8192}
    assert common.get_preset("tiny") is tiny  # read once per process
    # An experiment config keeps its own arch/routing; every other model field is the preset's.
    cfg = common.train_config(small, "mod", capacity=0.125)
    assert cfg.model.arch == "mod" and cfg.model.routing.capacity == 0.125
    assert (cfg.model.hidden_size, cfg.model.vocab_size) == (384, 8192)
    assert (cfg.train.batch_size, cfg.train.seq_len) == (small.batch, small.seq_len)
    assert common.model_config(small).num_layers == 8
    # --repeats replaces the workload field for the rest of the process.
    assert common.override("small", repeats=7).repeats == 7
    assert common.get_preset("small") == dataclasses.replace(small, repeats=7)


@pytest.mark.slow
def test_cli_forward_decode_train(micro, tmp_path):
    """The CLI writes JSON + Markdown; jaxdyn and torch rows with ratios, MFU and a trace,
    timed in interleaved rounds under the measurement protocol."""
    out, prof = tmp_path / "r.json", tmp_path / "prof"
    assert main(["--suite", "forward", "--suite", "decode", "--suite", "train", "--preset",
                 micro, "--out", str(out), "--profile", str(prof), "--settle-s", "0"]) == 0
    doc = json.loads(out.read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["preset"] == "micro" and meta["env"]["jax"] and meta["env"]["torch"]
    assert meta["preset_shapes"] == MICRO.model and meta["batch"] == MICRO.batch
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
        for r in (jx, pt):  # the protocol's facts on every row
            assert r["rounds"] == MICRO.repeats and r["spread"] >= 0
            assert r["load_before"] >= 0 and isinstance(r["noisy"], bool)
            assert r["noisy"] == bool(r["noise"])
        # A verdict only where neither side is noisy.
        assert (jx["meets_target"] is None) == (jx["noisy"] or pt["noisy"])
    train = by[("train", "jaxdyn")]
    assert train["name"] == f"train B{MICRO.batch}xT{MICRO.seq_len}"
    assert train["peak_mem_bytes"] > 0
    # MFU is model FLOPs x tokens/s over the peak measured in the same run.
    assert train["mfu"] == pytest.approx(train["flops_per_token"] * train["tokens_per_s"]
                                         / meta["peaks"]["peak_flops_measured"])
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[0].startswith("| suite | name | impl | tokens/s | step ms | MFU")
    assert len(md) == 2 + len(rows)
    assert any(prof.rglob("*.xplane.pb")), "no profiler trace written"


def test_cli_rejects_unknown_preset_and_bare_worker(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])
    assert "unknown preset 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--worker", "scaling"])
    assert "needs --child" in capsys.readouterr().err


def test_inference_suite_calibrates_routers_and_reports_savings(micro):
    """Routed prefill/decode/cache rows against dense: the calibrated routers select at most
    k = γ·T per row and layer (so the bucket matches the FLOP ratio), compact cache bytes are
    reported against the expected fraction."""
    rows, _ = run_suites(["inference"], micro, routing_variants=(("dense", None), ("mod", 0.5)),
                         inference_multitoken=False)  # its decoding rows: the multitoken test
    names = [r["name"] for r in rows]
    assert names == ["prefill dense B2xT32", "decode dense B2 P4+6",
                     "prefill mod c0.5 selected B2xT32", "prefill mod c0.5 masked B2xT32",
                     "decode mod c0.5 B2 P4+6", "cache mod c0.5 B2 S10"]
    pre = rows[2]
    assert 0 < pre["flop_ratio"] < 1 and pre["ref"] == "dense"
    assert "max 16," in pre["notes"] or "max 1" in pre["notes"]  # k = 16 of T = 32
    most = int(pre["notes"].split("max ")[1].split(",")[0])
    assert 0 < most <= 16
    cache = rows[-1]
    assert cache["cache_bytes"] < cache["dense_cache_bytes"]
    assert abs(cache["ratio"] - 1) < 0.25  # slot/pointer arrays on top of γ·K/V


def test_routing_rows_carry_flop_ratios(micro):
    from jaxdyn.bench.routing import VARIANTS

    assert VARIANTS == (("dense", None), ("mod", 0.125), ("mod", 0.5), ("dtf", 0.125),
                        ("dtf", 0.5))
    # Two of the five variants keep CI short; the bench itself runs all five.
    rows, _ = run_suites(["routing"], micro, routing_variants=(("dense", None), ("dtf", 0.125)))
    assert [r["name"] for r in rows] == ["dense", "dtf c0.125"]
    dense = rows[0]
    for r in rows[1:]:
        assert r["ref"] == "dense"
        # a verdict unless this row or the dense reference is noisy (a loaded CI machine)
        assert (r["meets_target"] is None) == (r["noisy"] or dense["noisy"])
        assert r["flop_ratio"] == pytest.approx(r["flops_per_token"] / dense["flops_per_token"])
        assert r["train_time_ratio"] == pytest.approx(r["step_ms"] / dense["step_ms"])
        assert r["forward_time_ratio"] == pytest.approx(r["forward_ms"] / dense["forward_ms"])
        assert r["train_over_flop"] == pytest.approx(r["train_time_ratio"] / r["flop_ratio"])
    assert 0 < rows[1]["flop_ratio"] < 1.0  # routed layers at k = T/8 (+ routers, PriorFFN)


def test_scaling_memory_falls_with_devices(micro):
    """Each N runs in a `python -m jaxdyn.bench --worker scaling` subprocess."""
    rows, _ = run_suites(["scaling"], micro, device_counts=(1, 2))
    assert [r["name"] for r in rows] == ["fsdp N=1", "fsdp N=2"], rows
    one, two = rows
    assert one["devices"] == 1 and two["devices"] == 2
    assert one["state_bytes_per_device"] == one["state_bytes_total"]
    # Sharded over fsdp=2, device 0 holds about half (norms and biases stay replicated).
    assert 0.45 < two["memory_ratio"] < 0.6
    assert two["state_bytes_total"] == one["state_bytes_total"]


def test_conversion_suite_reports_a_row(micro):
    """The import runs in a `python -m jaxdyn.bench --worker conversion` subprocess."""
    rows, _ = run_suites(["conversion"], "tiny")
    (row,) = rows
    assert row["suite"] == "conversion" and row["name"] == "from_hf peak RSS", row
    assert row["checkpoint_bytes"] > 0 and row["peak_rss"] >= row["baseline_rss"] > 0
    assert row["param_bytes"] == row["checkpoint_bytes"]  # fp32 in, fp32 params out
    assert row["ratio"] == pytest.approx(row["import_rss_over_checkpoint"])
    assert isinstance(row["meets_target"], bool)


@pytest.mark.slow
def test_multitoken_suite_trains_through_the_trainer(monkeypatch, tmp_path):
    """Bench `tiny` -> multitoken `smoke` (cut to a few steps): dense then mtp workdirs, PPL
    from jaxdyn.evaluate, verify == plain greedy, the Markov check on an ids corpus."""
    monkeypatch.setitem(multitoken.PRESETS, "smoke", MTP_MICRO)
    rows, _ = run_suites(["multitoken"], "tiny", multitoken_dir=str(tmp_path))
    assert not [r for r in rows if r["name"] == "error"], rows
    for stage, objective in (("dense", "lm"), ("mtp", "mtp")):
        cfg = json.loads((tmp_path / stage / "config.json").read_text())
        assert cfg["train"]["objective"] == objective
        assert cfg["train"]["steps"] == MTP_MICRO[f"{stage}_steps"]
        assert (cfg["model"]["family"], cfg["model"]["num_layers"]) == ("gpt_neox", 2)
    mtp_cfg = json.loads((tmp_path / "mtp" / "config.json").read_text())
    assert mtp_cfg["init"]["checkpoint"] == str(tmp_path / "dense")
    assert [list(g) for g in mtp_cfg["train"]["lr_groups"]] == [["^heads/", 100.0]]
    assert mtp_cfg["train"]["lr"] == MTP_MICRO["lr_base"]
    by = {r["name"]: r for r in rows}
    plain, ver = by["plain-greedy"], by["verify-greedy"]
    assert plain["tokens_per_forward"] == 1.0 and plain["ratio"] == 1.0
    assert ver["identical"] is True  # lossless: verify decoding == plain greedy decoding
    assert ver["ref"] == "single-token" and _finite_positive(float(ver["ratio"]))
    for k in ("ppl_1", "ppl_2", "ppl_3", "ppl_1:3"):
        assert _finite_positive(float(plain[k])), k
    tree = by[f"tree-verify-greedy tree={multitoken.TREE}"]
    assert tree["identical"] is True and isinstance(tree["meets_target"], bool)
    assert 1.0 <= tree["tokens_per_forward"] <= 3.0
    dyn = [r for r in rows if r["mode"] == "dynamic"]
    dev = [r for r in rows if r["mode"] == "dynamic-device"]
    grid = [(k, e) for k in MTP_MICRO["top_ks"] for e in MTP_MICRO["eps"]]
    assert [(r["top_k"], r["eps_b"]) for r in dyn] == [(r["top_k"], r["eps_b"]) for r in dev] \
        == grid
    assert all(1.0 <= r["tokens_per_forward"] <= 3.0 for r in dyn + dev)
    # the device selection emits the host's tokens (same seed, same uniforms)
    assert all(r["identical"] is True for r in dev), [r["name"] for r in dev]
    (kl,) = [r for r in rows if r["mode"] == "mechanism-kl"]
    assert all(math.isfinite(kl[k]) and kl[k] >= 0 for k in
               ("kl_product", "kl_cooccur", "kl_cooccur+thresholds"))
    assert (kl["chain_order"], kl["chain_vocab"]) == (2, 64)  # the spec's second-order chain
    mech = [r for r in rows if r["mode"] == "mechanism-dynamic"]
    assert [(r["weighting"], r["eps_b"]) for r in mech] == \
        [(w, e) for w in ("cooccur", "none") for e in multitoken.EPS]
    assert all(0.0 <= r["match_rate"] <= 1.0 and 1.0 <= r["tokens_per_forward"] <= 3.0
               for r in mech)
    (anc,) = [r for r in rows if r["mode"] == "mechanism-ancestral"]
    assert anc["match_rate"] == 1.0  # the true chain always matches itself
    assert len({r["name"] for r in rows}) == len(rows)
    ids_cfg = json.loads((tmp_path / "mechanism" / "run" / "config.json").read_text())
    assert ids_cfg["tokenizer"] == {"kind": "ids", "vocab_size": 64}
    assert ids_cfg["model"]["vocab_size"] == 66  # 64 chain ids, EOS, pad
    saved = json.loads((tmp_path / "multitoken.json").read_text())
    assert [r["mode"] for r in saved] == [r["mode"] for r in rows]
    assert (tmp_path / "multitoken_eps.png").stat().st_size > 0


def test_unknown_suite_and_preset_are_named():
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(["fwd"], "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        common.get_preset("huge")
    with pytest.raises(ValueError, match="unknown preset"):
        multitoken.run("huge")


def test_markdown_table_formats_ratios_and_flags():
    md = common.markdown_table([{"suite": "s", "name": "n", "impl": "jaxdyn", "ratio": 1.234,
                                 "meets_target": False, "mfu": 0.5}])
    assert "1.23" in md and "NO" in md and "50.0%" in md


def test_kernels_suite_checks_every_kernel_against_xla():
    """The accelerator check's parity step, here in Pallas interpret mode on the CPU: a kernel
    that drifted from the reference or let a document see another would come out NO."""
    rows, _ = run_suites(["kernels"], "tiny", kernels_seq_len=128)
    assert {r["impl"] for r in rows} == {"blockwise", "splash", "pallas_gpu"}
    for r in rows:
        assert r["meets_target"] is True, r
        assert r["leak"] == 0.0 and r["max_abs_out"] <= 3e-2 and r["max_abs_grad"] <= 3e-2
