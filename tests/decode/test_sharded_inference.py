"""Sharded inference on 8 fake CPU devices equals one device: greedy generation, perplexity
evaluation and the lm-eval adapter's log-likelihoods of a dense and a routed (MoD, causal
router) model, on meshes with fsdp and tensor > 1; parameters are really sharded (by the
training rules), loaded straight into their shardings, and the CLI mesh options parse."""

import argparse
import functools

import jax
import numpy as np
import pytest

from jaxdyn import sharding
from jaxdyn.checkpoint import load_model, save_params
from jaxdyn.cli.common import add_mesh_args, mesh_from_args
from jaxdyn.data.tokenizer import byte_tokenizer
from jaxdyn.decode.generate import cache_shardings, generate, place_params
from jaxdyn.evaluate.lm_eval import JaxdynScorer
from jaxdyn.evaluate.perplexity import evaluate
from jaxdyn.model import init_params, param_shardings, tiny

MESHES = {"d2f2t2": (2, 2, 2), "d1f4t2": (1, 4, 2)}
PROMPTS = [list(b"def f(x):"), list(b"import os\n"), list(b"a = [1, 2")]  # 3 rows: padded to 4
REQUESTS = [("1 + 1 =", " 2"), ("def f(x): return", " x"), ("", "hello"), ("abc ", "def")]
TEXTS = [b"def f(x):\n    return x + 1\n", b"import os\nprint(os.sep)\n", b"a = [1, 2, 3]\n",
         b"class A:\n    pass\n", b"for i in range(3):\n    print(i)\n"]


def batches():
    """Two packed-style batches of 4 rows x 32 (one document per row, padding segment 0)."""
    out = []
    for lo in (0, 4):
        b = {k: np.zeros((4, 32), np.int32) for k in ("tokens", "positions", "segment_ids")}
        for r, text in enumerate(TEXTS[lo:lo + 4]):
            ids = [256, *text[:30]]
            b["tokens"][r, :len(ids)] = ids
            b["positions"][r, :len(ids)] = np.arange(len(ids))
            b["segment_ids"][r, :len(ids)] = 1
        out.append(b)
    return out


@functools.cache
def model(arch):
    cfg = tiny("qwen2", arch=arch, vocab_size=258, max_position_embeddings=64)
    return cfg, jax.jit(lambda r: init_params(cfg, r))(jax.random.key(1))


@functools.cache
def one_device(arch):
    """(greedy tokens, evaluate() result, log-likelihoods) with no mesh."""
    cfg, params = model(arch)
    scorer = JaxdynScorer(cfg=cfg, params=params, tokenizer=byte_tokenizer(), batch_size=2,
                          bucket=32)
    return (generate(cfg, params, PROMPTS, 8).tokens,
            evaluate(cfg, params, batches(), routing_mode="causal"),
            scorer.loglikelihood(REQUESTS))


def assert_sharded(params):
    """Some leaf is split over a mesh axis: its device shard is smaller than the array."""
    split = [x for x in jax.tree.leaves(params)
             if any(a is not None for a in x.sharding.spec)
             and x.addressable_shards[0].data.size < x.size]
    assert split, "no parameter is sharded"
    return split


# Each architecture on one of the meshes (both meshes, both architectures, half the compiles).
@pytest.mark.parametrize("arch,mesh_name", [("dense", "d1f4t2"), ("mod", "d2f2t2")])
def test_sharded_generate_evaluate_loglikelihood_equal_one_device(arch, mesh_name):
    cfg, params = model(arch)
    want_tokens, want_eval, want_ll = one_device(arch)
    mesh = sharding.make_mesh(*MESHES[mesh_name])
    sharded = place_params(cfg, params, mesh)
    split = assert_sharded(sharded)
    assert {a for x in split for s in x.sharding.spec if s for a in np.atleast_1d(s)} >= {
        "fsdp", "tensor"}

    assert generate(cfg, sharded, PROMPTS, 8).tokens == want_tokens  # mesh taken from params
    got = evaluate(cfg, params, batches(), routing_mode="causal", mesh=mesh)
    assert got["tokens"] == want_eval["tokens"]
    for k in ("nll", "ppl"):
        assert got[k] == pytest.approx(want_eval[k], rel=1e-5)
    if arch != "dense":
        assert got["router/layer_0/selected_frac"] == pytest.approx(
            want_eval["router/layer_0/selected_frac"], rel=1e-5)

    scorer = JaxdynScorer(cfg=cfg, params=params, tokenizer=byte_tokenizer(), batch_size=2,
                          bucket=32, mesh=mesh)
    assert scorer.batch_size == 4  # rounded up to data x fsdp
    assert_sharded(scorer.params)
    ll = scorer.loglikelihood(REQUESTS)
    assert [g for _, g in ll] == [g for _, g in want_ll]
    assert [s for s, _ in ll] == pytest.approx([s for s, _ in want_ll], rel=1e-5)


def test_cache_is_split_over_batch_and_kv_heads():
    cfg, _ = model("dense")
    sh = cache_shardings(cfg, sharding.make_mesh(2, 2, 2))
    assert sh["layers"]["k"].spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None,
                                                                 "tensor", None)
    assert sh["layers"]["written"].spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"),
                                                                      None)
    assert sh["index"].spec == jax.sharding.PartitionSpec()


def test_import_loads_straight_into_rules_shardings(tmp_path):
    cfg, params = model("dense")
    save_params(str(tmp_path / "params"), params)
    cfg.save(str(tmp_path / "model_config.json"))
    mesh = sharding.make_mesh(1, 4, 2)
    _, got, _ = load_model(str(tmp_path), mesh=mesh)
    want_sh = param_shardings(cfg, mesh)
    jax.tree.map(lambda x, s: (x.sharding.spec == s.spec) or pytest.fail(
        f"{x.sharding.spec} != {s.spec}"), got, want_sh)
    assert_sharded(got)
    jax.tree.map(np.testing.assert_array_equal, got, params)


def parse(*argv):
    ap = argparse.ArgumentParser()
    add_mesh_args(ap)
    return mesh_from_args(ap.parse_args(list(argv)))


def test_cli_mesh_options():
    assert dict(parse().shape) == {"data": 8, "fsdp": 1, "tensor": 1}  # the trainer's default
    assert dict(parse("--mesh", "data=2,fsdp=2,tensor=2").shape) == {
        "data": 2, "fsdp": 2, "tensor": 2}
    assert dict(parse("--mesh.fsdp=4").shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse("--mesh", "data=1,tensor=2").devices.size == 2  # the first 2 devices
    assert dict(parse("--mesh", "data=1,tensor=2", "--mesh.fsdp", "-1").shape) == {
        "data": 1, "fsdp": 4, "tensor": 2}
    for bad, msg in ((("--mesh", "pipe=2"), "not KEY=N"), (("--mesh", "fsdp=x"), "integer"),
                     (("--mesh", "data=3,fsdp=-1"), "devices"),
                     (("--mesh", "data=16"), "devices"), (("--mesh.tensor=0",), "positive")):
        with pytest.raises(SystemExit, match=msg):
            parse(*bad)
