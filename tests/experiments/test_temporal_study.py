"""The TCG-Synth study (jaxdyn.experiments.temporal): backbone pretraining data, and the tiny
preset end to end through the one trainer (every run trained and scored, reports written)."""

import json
import os
import re

import jax
import numpy as np
import pytest

from jaxdyn.experiments import temporal as xp
from jaxdyn.model import init_params
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal import synth as ts
from jaxdyn.temporal.batching import (
    answer_text,
    pretrain_arrays,
    prompt_text,
    renamed_text,
    tokenize,
)
from jaxdyn.temporal.encoders import TemporalConfig
from jaxdyn.temporal.generate import load_temporal
from jaxdyn.train import make_objective, schema


@pytest.fixture(scope="module")
def records():
    cfg = ts.SynthConfig(n_companies=24, n_people=60, n_cities=8, n_sectors=4, n_train=40,
                         n_eval=4, n_max=24, e_max=64)
    return ts.generate(cfg, 0)["train"]


def test_renamed_text_renames_every_query_entity_consistently(records):
    rng = np.random.default_rng(123)  # not the world's seed: its first names are the world's
    words = lambda text: re.findall(r"\w+", text)
    for rec in records:
        prompt, answer = renamed_text(rec, rng)
        names = {n["id"]: n["name"] for n in rec["graph"]["nodes"]}
        old = {names[q] for q in rec["query_nodes"]}
        was, now = words(prompt_text(rec)), words(prompt)
        assert len(was) == len(now)
        table = {}
        for w0, w1 in zip(was, now, strict=True):
            if w0 in old:  # one fresh name per entity, the same at every mention
                assert table.setdefault(w0, w1) == w1 and w1 != w0
            else:
                assert w0 == w1  # the template is untouched
        assert len(set(table.values())) == len(table)  # distinct entities stay distinct
        assert answer == answer_text(table.get(rec["answer"], rec["answer"]))  # names or counts


def test_pretrain_weights_are_one_on_answer_tokens_only(records):
    pairs = [(prompt_text(r), answer_text(r["answer"])) for r in records[:6]]
    arr = pretrain_arrays(pairs, 64, prompt_weight=0.25)
    for (prompt, answer), t, w in zip(pairs, arr["tokens"], arr["weights"], strict=True):
        n_p, n = len(tokenize(prompt)), len(tokenize(prompt + answer))
        assert list(t[:n]) == tokenize(prompt + answer) and not t[n:].any()
        # w[j] weighs target token j (predicted at j-1): answer tokens are n_p … n−1.
        assert np.all(w[n_p:n] == 1.0) and np.all(w[1:n_p] == 0.25)
        assert w[0] == 0 and not w[n:].any()
        assert tokenize(answer) == list(t[n_p:n])


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path):
    cfg = schema.load("configs/temporal.py:tiny",
                      ["--config.experiment.runs=('base','full','date_in_prompt')",
                       "--config.log.tensorboard=false", "--config.checkpoint.async_save=false",
                       "--config.mesh.data=1"])
    res = xp.run_experiment(cfg, str(tmp_path), log=lambda line: None)
    assert list(res["runs"]) == ["base", "full", "date_in_prompt"]
    for f in ("results.json", "results.md", "accuracy_by_year.png", "backbone/checkpoints",
              "runs/full/metrics.jsonl", "runs/date_in_prompt/metrics.jsonl"):
        assert os.path.exists(tmp_path / f), f
    assert json.load(open(tmp_path / "results.json"))["runs"].keys() == res["runs"].keys()
    base, full, dip = (res["runs"][k] for k in ("base", "full", "date_in_prompt"))
    mcfg, tcfg = schema.model_config(cfg), TemporalConfig(**cfg.temporal)
    assert base["trainable"] == 0
    assert full["trainable"] == tm.count_temporal_params(mcfg, tcfg)["total"]
    c, r = mcfg, cfg.experiment.lora_rank
    assert dip["trainable"] == c.num_layers * r * (
        2 * c.hidden_size + (c.num_heads + c.num_kv_heads) * c.head_dim)
    assert full["frozen"] == base["frozen"] == dip["frozen"]  # one frozen backbone for all
    for run in res["runs"].values():
        for s, split in run["splits"].items():
            n = split["all"]["n"]
            assert n == cfg.synth.n_eval or (s == "test_edited_graph" and n > 0), (s, n)
            assert 0.0 <= split["all"]["rank"] <= 1.0
    assert base["js_within"] == base["js_across"] == 0.0  # no pathway: nothing can move
    rows = [json.loads(line) for line in open(tmp_path / "backbone" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"][-1] == 4  # pretrain_steps
    # the full run's workdir is a temporal checkpoint the generate CLI reads
    assert res["checkpoint"] == str(tmp_path / "runs" / "full")
    model = load_temporal(res["checkpoint"])
    assert model.tcfg == tcfg and "temporal" in model.params
    # the frozen backbone: every run's trunk equals the backbone's
    frozen = jax.tree.map(lambda a, b: bool((a == b).all()),
                          {k: v for k, v in model.params.items() if k != "temporal"},
                          xp.load_model(str(tmp_path / "backbone"))[1])
    assert all(jax.tree.leaves(frozen))


def test_architecture_ablations_change_only_the_temporal_pathway():
    cfg = schema.load("configs/temporal.py:tiny")
    cfg = schema.finalize(cfg, vocab_size=1664)
    study = xp.study_config(cfg)
    backbone = init_params(schema.model_config(cfg), jax.random.key(0))
    trees = {}
    for name in ("full", "token_conditioned", "mean_readout"):
        rcfg = xp.run_config(cfg, name, "unused", study)
        assert rcfg.train.to_dict() == cfg.train.to_dict()  # the full model's recipe
        trees[name], _ = make_objective(rcfg).extend_params(backbone, jax.random.key(1))
    adapters = {k: set(t["temporal"]["adapters"]) for k, t in trees.items()}
    graph = {k: set(t["temporal"]["graph"]) for k, t in trees.items()}
    assert adapters["token_conditioned"] - adapters["full"] == {"W_h", "h_norm"}
    assert adapters["mean_readout"] == adapters["full"]
    assert graph["full"] - graph["mean_readout"] == {"pool_query"}
    for tree in trees.values():
        same = jax.tree.map(lambda a, b: bool((a == b).all()),
                            {k: v for k, v in tree.items() if k != "temporal"}, backbone)
        assert all(jax.tree.leaves(same))  # the frozen backbone is the given one
