"""The TCG-Synth experiment pipeline (jaxdyn.experiments.temporal): backbone pretraining data,
and the tiny preset end to end (every run trained and scored, reports and checkpoint written)."""

import json
import os
import re

import jax
import numpy as np
import pytest

from jaxdyn.experiments import temporal as xp
from jaxdyn.temporal import synth as ts
from jaxdyn.temporal.batching import answer_text, prompt_text, tokenize


@pytest.fixture(scope="module")
def records():
    cfg = ts.SynthConfig(n_companies=24, n_people=60, n_cities=8, n_sectors=4, n_train=40,
                         n_eval=4, n_max=24, e_max=64)
    return ts.generate(cfg, 0)["train"]


def test_renamed_text_renames_every_query_entity_consistently(records):
    rng = np.random.default_rng(123)  # not the world's seed: its first names are the world's
    words = lambda text: re.findall(r"\w+", text)
    for rec in records:
        prompt, answer = xp.renamed_text(rec, rng)
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
    toks, wts = xp.pretrain_arrays(pairs, 64, prompt_weight=0.25)
    for (prompt, answer), t, w in zip(pairs, toks, wts, strict=True):
        n_p, n = len(tokenize(prompt)), len(tokenize(prompt + answer))
        assert list(t[:n]) == tokenize(prompt + answer) and not t[n:].any()
        # w[j] weighs predicting token j+1: answer tokens are n_p … n−1.
        assert np.all(w[n_p - 1:n - 1] == 1.0) and np.all(w[:n_p - 1] == 0.25)
        assert not w[n - 1:].any()
        assert tokenize(answer) == list(t[n_p:n])


def test_tiny_experiment_end_to_end(tmp_path):
    p = xp.load_preset("tiny", ["--config.experiment.runs=('base','full','date_in_prompt')"])
    logs = []
    res = xp.run_experiment(p, str(tmp_path), log=logs.append)
    assert list(res["runs"]) == ["base", "full", "date_in_prompt"]
    for f in ("results.json", "results.md", "accuracy_by_year.png", "metrics.jsonl",
              "checkpoint"):
        assert os.path.exists(tmp_path / f), f
    assert json.load(open(tmp_path / "results.json"))["runs"].keys() == res["runs"].keys()
    base, full, dip = (res["runs"][k] for k in ("base", "full", "date_in_prompt"))
    assert base["trainable"] == 0
    assert full["trainable"] == xp.tm.count_temporal_params(p.backbone, p.temporal)["total"]
    c = p.backbone
    assert dip["trainable"] == c.num_layers * p.lora_rank * (
        2 * c.hidden_size + (c.num_heads + c.num_kv_heads) * c.head_dim)
    assert full["frozen"] == base["frozen"] == dip["frozen"]  # one frozen backbone for all
    for r in res["runs"].values():
        for s, split in r["splits"].items():
            n = split["all"]["n"]
            assert n == p.synth.n_eval or (s == "test_edited_graph" and n > 0), (s, n)
            assert 0.0 <= split["all"]["rank"] <= 1.0
    assert base["js_within"] == base["js_across"] == 0.0  # no pathway: nothing can move
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["run"] for r in rows} == {"full", "date_in_prompt"}
    assert any(line.startswith("[backbone] step") for line in logs)


def test_architecture_ablations_change_only_the_temporal_pathway():
    p = xp.load_preset("tiny")
    backbone = xp.init_params(p.backbone, jax.random.key(0))
    trees = {name: xp.make_run(name, p, backbone)[1]
             for name in ("full", "token_conditioned", "mean_readout")}
    adapters = {k: set(t["temporal"]["adapters"]) for k, t in trees.items()}
    graph = {k: set(t["temporal"]["graph"]) for k, t in trees.items()}
    assert adapters["token_conditioned"] - adapters["full"] == {"W_h", "h_norm"}
    assert adapters["mean_readout"] == adapters["full"]
    assert graph["full"] - graph["mean_readout"] == {"pool_query"}
    for name, tree in trees.items():
        assert xp.run_spec(name, p) == p.train  # same training recipe as the full model
        same = jax.tree.map(lambda a, b: bool((a == b).all()),
                            {k: v for k, v in tree.items() if k != "temporal"}, backbone)
        assert all(jax.tree.leaves(same))  # the frozen backbone is the given one
