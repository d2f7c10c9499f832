"""Checkpoints written by the flat layout before the package restructure (commit 06c9112,
`tests/fixtures/old_layout`) load with today's code and give the logits the old code computed:
every architecture through the one decoder trunk, multi-token heads through its extra-heads
extension, temporal adapters through its adapter extension, and a LoRA training workdir."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxdyn.checkpoint import load_model, load_params
from jaxdyn.model import ModelConfig, abstract_params, build
from jaxdyn.multitoken.heads import ExtraHeads, all_logits, multitoken_model
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal.batching import make_graph
from jaxdyn.temporal.generate import load_temporal

pytestmark = pytest.mark.parity  # equality against a reference

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "old_layout")
TOL = dict(rtol=1e-6, atol=1e-6)


def case(name):
    d = os.path.join(ROOT, name)
    cfg = ModelConfig.load(os.path.join(d, "model_config.json"))
    return cfg, load_params(os.path.join(d, "params")), dict(np.load(os.path.join(d,
                                                                               "expected.npz")))


@pytest.mark.parametrize("name", ["dense_qwen2", "dense_llama", "dense_gpt_neox",
                                  "dense_qwen2_unrolled", "mod", "dtf"])
def test_trunk_checkpoints_give_the_old_logits(name):
    cfg, params, exp = case(name)
    for mode in ("topk", "causal") if cfg.arch != "dense" else ("topk",):
        out = build(cfg, mode).apply({"params": params}, exp["tokens"], exp["positions"],
                                     exp["segment_ids"])
        np.testing.assert_allclose(np.asarray(out.logits), exp[f"logits_{mode}"], **TOL)


def test_multitoken_checkpoint_gives_the_old_logits():
    cfg, params, exp = case("mtp")
    out = multitoken_model(cfg, 3).apply({"params": params}, exp["tokens"], exp["positions"],
                                         exp["segment_ids"])
    np.testing.assert_allclose(np.asarray(all_logits(out)), exp["logits_heads"], **TOL)


def test_temporal_checkpoint_gives_the_old_logits():
    d = os.path.join(ROOT, "temporal")
    model = load_temporal(d)
    exp = dict(np.load(os.path.join(d, "expected.npz")))
    arr = {k[4:]: v for k, v in exp.items() if k.startswith("arr_")}
    trunk = tm.build(model.cfg, model.tcfg)
    cond = trunk.apply({"params": model.params}, arr["tokens"],
                       conditioning={"time": arr["tau"], "graph": make_graph(arr)})
    base = trunk.apply({"params": model.params}, arr["tokens"])
    np.testing.assert_allclose(np.asarray(cond.logits)[:, :20], exp["logits_conditioned"], **TOL)
    np.testing.assert_allclose(np.asarray(base.logits)[:, :20], exp["logits_base"], **TOL)
    assert np.abs(exp["logits_conditioned"] - exp["logits_base"]).max() > 1e-3  # adapters act
    with open(os.path.join(d, "temporal_config.json")) as f:
        assert json.load(f)["temporal"]["rank"] == model.tcfg.rank


def test_lora_workdir_gives_the_old_logits():
    d = os.path.join(ROOT, "lora_workdir")
    cfg, params, _ = load_model(d)
    exp = dict(np.load(os.path.join(d, "expected.npz")))
    out = build(cfg).apply({"params": params}, exp["tokens"])
    np.testing.assert_allclose(np.asarray(out.logits), exp["logits"], **TOL)


def test_parameter_paths_are_pinned():
    """The parameter path list of every architecture equals the old layout's, path for path."""
    for name in ("dense_qwen2", "dense_llama", "dense_gpt_neox", "dense_qwen2_unrolled", "mod",
                 "dtf"):
        cfg, params, _ = case(name)
        assert paths(abstract_params(cfg)) == paths(params), name
    cfg, params, _ = case("mtp")
    assert paths(abstract_params(cfg, heads=ExtraHeads(3))) == paths(params)
    model = load_temporal(os.path.join(ROOT, "temporal"))
    assert paths(tm.abstract_params(model.cfg, model.tcfg)) == paths(model.params)


def paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    return sorted(("/".join(str(getattr(k, "key", k)) for k in p), tuple(x.shape))
                  for p, x in flat)
