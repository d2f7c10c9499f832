"""experiments.compare: the three runs are matched, and the table/plot are written."""

import json

import pytest

from jaxdyn.experiments import compare


def test_runs_are_matched_in_shape_data_and_capacity():
    cfgs = compare.matched_configs("cpu", ["--config.model.routing.capacity=0.125"])
    assert list(cfgs) == ["standard", "mod", "dtf"]
    assert [c.model.arch for c in cfgs.values()] == ["dense", "mod", "dtf"]
    assert {c.model.num_layers for c in cfgs.values()} == {4}  # dense gets the routed count
    assert {c.model.routing.capacity for c in list(cfgs.values())[1:]} == {0.125}
    assert {(c.train.steps, c.train.batch_size, c.train.seq_len, c.train.seed, c.data.source)
            for c in cfgs.values()} == {(600, 8, 64, 0, "builtin")}
    with pytest.raises(ValueError, match="unknown compare preset"):
        compare.matched_configs("huge", [])


def test_results_table_and_plot(tmp_path):
    rows = [{"model": m, "capacity": c, "val_loss": v, "val_causal_loss": v + 0.1,
             "train_tflops": f, "flop_ratio": r,
             "tokens_per_sec": 1000.0, "curve": [(50, v + 1), (100, v)], "flops_per_step": 1e9}
            for m, c, v, f, r in (("standard", 1.0, 2.5, 1.0, 1.0), ("mod", 0.5, 2.6, 0.8, 0.8),
                                  ("dtf", 0.5, 2.55, 0.81, 0.81))]
    table = compare.write_results(rows, str(tmp_path))
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[3].startswith("| mod | 0.5 | 2.7000 | 2.6000 | 0.800 | 0.800 |")
    assert (tmp_path / "results.md").read_text() == table + "\n"
    assert json.loads((tmp_path / "results.json").read_text())[2]["model"] == "dtf"
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
