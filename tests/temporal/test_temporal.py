"""Temporal-causal adapters (docs/features/temporal.md): identity at init, drift bound, JS, regimes,
padding/order invariance, gradient routing, parameter count, TCG-Synth + loader, generation."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
import pytest

from jaxdyn.cli.generate import main as generate_cli
from jaxdyn.cli.temporal import main as temporal_cli
from jaxdyn.model import build, tiny
from jaxdyn.temporal import adapters as tm
from jaxdyn.temporal import synth as ts
from jaxdyn.temporal.batching import Shapes, encode, load_split, make_graph
from jaxdyn.temporal.generate import generate_conditioned, load_temporal, save_temporal
from jaxdyn.temporal.objective import js_divergence, masked_mean_js
from jaxdyn.temporal.tokenizer import tokenizer
from jaxdyn.train import make_objective, schema
from jaxdyn.train.optim import make_optimizer, trainable_mask
from jaxdyn.train.state import trainable_rules
from jaxdyn.train.step import variables_of

CFG = tiny(vocab_size=tokenizer().vocab_size, hidden_size=32, head_dim=8,
           intermediate_size=64, max_position_embeddings=64)
TCFG = tm.TemporalConfig(d_t=8, d_n=16, d_g=16, rank=8)
SH = Shapes(seq_len=40, ans_len=6, n_max=8, e_max=16, name_len=4)

GRAPH = {"nodes": [{"id": "c0", "name": "Vornex", "type": "company"},
                   {"id": "p0", "name": "Kalo", "type": "person"},
                   {"id": "p1", "name": "Mira", "type": "person"},
                   {"id": "c1", "name": "Tandor", "type": "company"},
                   {"id": "s0", "name": "Belu", "type": "sector"}],
         "edges": [{"src": "p0", "dst": "c0", "rel": "leads", "weight": 1.0,
                    "valid_from": "2000-01-01", "valid_to": "2010-01-01"},
                   {"src": "p1", "dst": "c0", "rel": "leads", "weight": 1.0,
                    "valid_from": "2010-01-01", "valid_to": None},
                   {"src": "c1", "dst": "c0", "rel": "supplies", "weight": 0.6,
                    "valid_from": "2005-01-01", "valid_to": "2015-06-01"},
                   {"src": "c0", "dst": "s0", "rel": "belongs_to", "weight": 1.0,
                    "valid_from": "2000-01-01", "valid_to": None}]}
QUERY = ["c0", "p0", "p1"]


def record(time="2007-03-01", answer="Kalo", regime=("2005-01-01", "2010-01-01"), graph=GRAPH):
    return {"id": "r", "question": "Who leads Vornex: Kalo, Mira or Tandor?", "time": time,
            "answer": answer, "regime": list(regime), "graph": graph, "query_nodes": QUERY}


@pytest.fixture(scope="module")
def params():
    """Random backbone and temporal params with W_o, b_o made non-zero (a trained adapter)."""
    p = tm.init_params(CFG, TCFG, jax.random.key(0))
    ad = dict(p["temporal"]["adapters"])
    k1, k2 = jax.random.split(jax.random.key(1))
    ad["W_o"] = 0.5 * jax.random.normal(k1, ad["W_o"].shape)
    ad["b_o"] = 0.1 * jax.random.normal(k2, ad["b_o"].shape)
    return p, {**p, "temporal": {**p["temporal"], "adapters": ad}}


def batch_of(recs, sh=SH, **kw):
    arr = encode(recs, sh, **kw)
    return arr, make_graph(arr)


@functools.lru_cache(maxsize=4)
def _fg_fn(tcfg):
    return jax.jit(lambda p, g: tm.condition(p, CFG, tcfg, None, g)[1])


def f_g(p, graph, tcfg=TCFG):
    return _fg_fn(tcfg)(p, graph)


@functools.lru_cache(maxsize=2)
def _logits_fn(tcfg):
    model = tm.build(CFG, tcfg)
    return jax.jit(lambda p, tok, t, g: model.apply({"params": p}, tok,
                                                     conditioning={"time": t, "graph": g}).logits)


def logits(p, tokens, time=None, graph=None):
    return _logits_fn(TCFG)(p, tokens, time, graph)


def test_identity_with_base_model_at_init(params):
    p0, _ = params
    arr, g = batch_of([record(), record("2012-05-05", "Mira")])
    base = jax.jit(lambda q, t: build(CFG).apply({"params": q}, t).logits)(
        {k: v for k, v in p0.items() if k != "temporal"}, arr["tokens"])
    for time, graph in ((arr["tau"], g), (None, None)):
        out = logits(p0, arr["tokens"], time, graph)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_adapters_change_output_when_trained(params):
    _, p = params
    arr, g = batch_of([record()])
    a, b = logits(p, arr["tokens"], arr["tau"], g), logits(p, arr["tokens"])
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_drift_bound(params):
    """‖ΔH(τ+δ) − ΔH(τ)‖₂ ≤ ‖W_o‖₂·1.129·‖W_t‖₂·‖ω‖₂·|δ| with the graph fixed
    (docs/features/temporal.md)."""
    _, p = params
    rng = np.random.default_rng(0)
    t2v = tm.Time2Vec(TCFG)
    tp = p["temporal"]["time2vec"]
    ad = {k: v[0] for k, v in p["temporal"]["adapters"].items()}
    ad["W_t"] = ad["W_t"] * 3.0  # make the time pathway dominant
    fg = jnp.asarray(rng.normal(size=(1, TCFG.d_g)), jnp.float32)
    tau = rng.uniform(-2.0, 1.1, 256).astype(np.float32)
    delta = (rng.choice([-1, 1], 256) * 10.0 ** rng.uniform(-4, 0, 256)).astype(np.float32)

    @jax.jit
    def dh(t):
        phi = t2v.apply({"params": tp}, t)
        return tm.adapter_delta(ad, {"phi": phi, "fg": jnp.repeat(fg, t.shape[0], 0)}, None,
                                TCFG)[:, 0]

    diff = np.linalg.norm(np.asarray(dh(tau + delta) - dh(tau), np.float64), axis=-1)
    lip = (np.linalg.norm(np.asarray(ad["W_o"], np.float64), 2) * tm.GELU_LIP
           * np.linalg.norm(np.asarray(ad["W_t"], np.float64), 2)
           * np.linalg.norm(np.asarray(tp["omega"], np.float64)))
    bound = lip * np.abs(delta)
    assert np.all(diff <= bound * (1 + 1e-4) + 1e-6), float(np.max(diff / bound))
    assert np.max(diff / bound) > 1e-3  # the bound is exercised, not vacuous by 1000x
    assert 1.2 < float(tp["omega"][1]) < 1.3 and 750 < float(tp["omega"][-1]) < 760  # §2


def test_js_properties_and_float64_reference():
    rng = np.random.default_rng(0)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 3, 50)) * 4, jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 3, 50)) * 4, jnp.float32))
    assert float(jnp.max(jnp.abs(js_divergence(lp, lp)))) == 0.0
    np.testing.assert_allclose(js_divergence(lp, lq), js_divergence(lq, lp), rtol=1e-6)
    P, Q = np.exp(np.asarray(lp, np.float64)), np.exp(np.asarray(lq, np.float64))
    M = (P + Q) / 2
    ref = 0.5 * (P * np.log(P / M)).sum(-1) + 0.5 * (Q * np.log(Q / M)).sum(-1)
    np.testing.assert_allclose(js_divergence(lp, lq), ref, rtol=1e-4, atol=1e-7)
    far = jax.nn.log_softmax(jnp.asarray([[0.0, -200.0], [-200.0, 0.0]]))
    js = js_divergence(far[:1], far[1:])  # disjoint supports: ln 2, finite in log space
    assert abs(float(js[0]) - math.log(2)) < 1e-5
    m = jnp.ones((4, 3))
    assert float(masked_mean_js(lp, lp, m, jnp.ones(4))) == 0.0


def test_regime_constant_and_switch(params):
    _, p = params
    recs = [record(t) for t in ("2005-01-01", "2007-03-01", "2009-12-31", "2010-01-01",
                                "2004-12-31", "2015-06-01")]
    _, g = batch_of(recs)
    fg = np.asarray(f_g(p, g))
    np.testing.assert_array_equal(fg[0], fg[1])  # inside [2005-01-01, 2010-01-01)
    np.testing.assert_array_equal(fg[1], fg[2])
    for k in (3, 4, 5):  # a leads edge switches; the supplies edge starts; it ends
        assert np.max(np.abs(fg[k] - fg[1])) > 1e-4 and np.max(np.abs(fg[k] - fg[k - 1])) > 0
    a = tm.edge_activation({"weight": jnp.ones(3), "from": jnp.zeros(3), "to": jnp.ones(3),
                            "mask": jnp.asarray([1.0, 1.0, 0.0])}, jnp.asarray([0.0, 1.0, 0.5]))
    np.testing.assert_array_equal(a, [1.0, 0.0, 0.0])  # [from, to) and the edge mask
    s = tm.edge_activation({"weight": jnp.full(1, 0.5), "from": jnp.zeros(1),
                            "to": jnp.ones(1), "mask": jnp.ones(1)}, jnp.asarray([0.02]),
                           "soft", 0.01)
    np.testing.assert_allclose(s, 0.5 * jax.nn.sigmoid(2.0) * jax.nn.sigmoid(98.0), rtol=1e-6)


def test_padding_and_node_order_do_not_change_fg(params):
    _, p = params
    rng = np.random.default_rng(0)
    perm = {"nodes": [GRAPH["nodes"][i] for i in rng.permutation(5)],
            "edges": [GRAPH["edges"][i] for i in rng.permutation(4)]}
    big = Shapes(seq_len=40, ans_len=6, n_max=13, e_max=29, name_len=6)
    ref = np.asarray(f_g(p, batch_of([record()])[1]))[0]
    _, g_perm = batch_of([record(graph=perm)], big)
    _, g_pair = batch_of([record("2012-01-01", "Mira"), record(graph=perm)], big)
    np.testing.assert_allclose(np.asarray(f_g(p, g_perm))[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f_g(p, g_pair))[1], ref, rtol=1e-5, atol=1e-5)


def test_encoder_avoids_broken_jraph_helpers(params, monkeypatch):
    _, p = params
    _, g = batch_of([record()])
    ref = np.asarray(f_g(p, g))
    for name in ("zero_out_padding", "with_zero_out_padding_outputs",
                 "get_fully_connected_graph", "GraphConvolution"):
        monkeypatch.setattr(jraph, name, lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("forbidden jraph helper used")), raising=False)
    np.testing.assert_array_equal(np.asarray(f_g(p, g)), ref)


def test_jraph_padding_helper_still_broken():
    """Records that jraph.zero_out_padding fails on this JAX; if it passes, revisit the
    workaround described in docs/features/temporal.md."""
    g = jraph.GraphsTuple(nodes=jnp.ones((3, 2)), edges=jnp.ones((2, 1)),
                          senders=jnp.asarray([0, 1]), receivers=jnp.asarray([1, 2]),
                          n_node=jnp.asarray([2, 1]), n_edge=jnp.asarray([1, 1]), globals=None)
    with pytest.raises(AttributeError, match="tree_"):
        jraph.zero_out_padding(g)


def temporal_cfg(tcfg):
    """configs/temporal.py:tiny with this file's shapes (CFG, `tcfg`, SH), finalized."""
    t = dataclasses.asdict(tcfg)
    over = [f"--config.model.{k}={getattr(CFG, k)}" for k in (
        "hidden_size", "head_dim", "intermediate_size", "num_layers", "max_position_embeddings")]
    over += [f"--config.temporal.{k}={v}" for k, v in t.items() if k != "adapter_layers"]
    over += [f"--config.shapes.{k}={v}" for k, v in dataclasses.asdict(SH).items()]
    over += [f"--config.train.seq_len={SH.seq_len}", "--config.train.lr=1e-2",
             "--config.train.steps=4", "--config.train.warmup_steps=1"]
    return schema.finalize(schema.load("configs/temporal.py:tiny", over), vocab_size=CFG.vocab_size)


def two_record_loss(tcfg):
    """(loss(tree, rng) -> (loss, stats), cfg, rules) of the `temporal` objective on two
    records in one regime, frozen leaves behind stop_gradient as in the trainer's step."""
    arr, _ = batch_of([record(), record("2012-05-05", "Mira", ("2010-01-01", "2015-06-01"))])
    cfg = temporal_cfg(tcfg)
    objective = make_objective(cfg)
    model, rules = objective.model(), trainable_rules(cfg, objective)

    def loss(tree, rng):
        mask = trainable_mask(tree, cfg.train, rules)["params"]
        value, stats, _ = objective.loss(model, variables_of(tree, cfg, mask), arr, rng)
        return value, stats
    return loss, cfg, rules


def test_gradients_reach_only_trainable_params(params):
    _, p = params
    loss, cfg, rules = two_record_loss(TCFG)
    assert rules == ("^temporal/",)  # the objective's default trainable set
    tree = {"params": p, "lora": {}}
    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        tree, jax.random.key(0))
    assert float(stats["temporal/js"]) > 0 and np.isfinite(float(value))
    for k, v in grads["params"].items():
        if k != "temporal":
            assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(v)), k
    t = grads["params"]["temporal"]
    for group, name in (("adapters", "W_t"), ("adapters", "W_g"), ("adapters", "W_o"),
                        ("time2vec", "omega"), ("time2vec", "phase"), ("graph", "W_fwd_0"),
                        ("graph", "W_bwd_1"), ("graph", "pool_query")):
        assert float(jnp.max(jnp.abs(t[group][name]))) > 0, (group, name)
    opt, _ = make_optimizer(cfg.train, tree, rules)
    upd, _ = jax.jit(opt.update)(grads, opt.init(tree), tree)
    for k, v in upd["params"].items():
        if k != "temporal":
            assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(v)), k


def test_silent_time_init_starts_at_zero_and_still_learns():
    """time_init=0: W_t starts at 0 (base model at step 0, φ silent) and trains once W_o ≠ 0.

    Needs the graph term: with graph=None too, every hidden unit is GELU(0) = 0 and the adapter
    can never leave b_o (so the CPU presets use a small non-zero scale, 0.1).
    """
    tcfg = dataclasses.replace(TCFG, time_init=0.0)
    p = tm.init_params(CFG, tcfg, jax.random.key(0))
    ref = tm.init_params(CFG, TCFG, jax.random.key(0))["temporal"]["adapters"]
    ad = p["temporal"]["adapters"]
    assert float(jnp.max(jnp.abs(ad["W_t"]))) == 0.0 and float(jnp.std(ref["W_t"])) > 0.1
    np.testing.assert_array_equal(np.asarray(ad["W_g"]), np.asarray(ref["W_g"]))
    loss, cfg, rules = two_record_loss(tcfg)
    tree = {"params": p, "lora": {}}
    opt, _ = make_optimizer(cfg.train, tree, rules)
    state = opt.init(tree)

    @jax.jit
    def step(q, s, k):
        gr = jax.grad(lambda q: loss(q, k)[0])(q)
        upd, s = opt.update(gr, s, q)
        return optax.apply_updates(q, upd), s, gr

    size = lambda x: float(jnp.max(jnp.abs(x["params"]["temporal"]["adapters"]["W_t"])))
    q, grads = tree, []
    for k in range(3):  # lr is 0 at step 0 (warm-up), W_o leaves 0 at step 1
        q, state, gr = step(q, state, jax.random.key(k))
        grads.append(size(gr))
    assert grads[0] == 0.0 and grads[2] > 0 and size(q) > 0  # W_t gets gradient via W_o ≠ 0
    with pytest.raises(Exception, match="time_init"):
        tm.TemporalConfig(time_init=-1.0)


@pytest.mark.parametrize("kw", [{}, {"token_conditioned": True, "readout": "mean",
                                     "adapter_layers": (1,), "periodic": "sincos"}])
def test_param_counter_matches_tree(kw):
    tc = tm.TemporalConfig(d_t=8, d_n=16, d_g=16, rank=8, **kw)
    tree = tm.abstract_params(CFG, tc)["temporal"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert tm.count_temporal_params(CFG, tc)["total"] == n


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tcg"))
    temporal_cli(["synth", "--out", out, "--seed", "0", "--n-companies", "24", "--n-people",
                  "60", "--n-cities", "8", "--n-sectors", "4", "--n-train", "40", "--n-eval",
                  "12", "--n-max", "24", "--e-max", "64"])
    return out


def test_generator_splits_loader_and_static_batches(synth_dir):
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    assert set(meta["counts"]) == set(ts.SPLITS) and all(v > 0 for v in meta["counts"].values())
    sh = Shapes(seq_len=64, ans_len=6, n_max=24, e_max=64, name_len=4)
    shapes = set()
    for split in ts.SPLITS:
        recs = load_split(os.path.join(synth_dir, f"{split}.jsonl"))
        lo, hi = ts.SPLIT_DAYS[split]
        for r in recs:  # every answer recomputes from the record alone, time in the split
            assert ts.answer_from_record(r) == r["answer"] and r["split"] == split
            assert lo <= ts.to_day(r["time"]) < hi
            assert r["regime"][0] <= r["time"] < r["regime"][1]
        _, g = batch_of(recs[:4], sh)
        shapes.add(tuple((k, v.shape) for k, v in {**g.nodes, **g.edges}.items()))
        assert list(g.n_node) == [24] * 4 and list(g.n_edge) == [64] * 4
        assert int(g.senders.max()) < 4 * 24 and int(g.receivers.max()) < 4 * 24
    assert len(shapes) == 1  # one static layout for every split
    train = {(r["question"], r["time"]) for r in load_split(f"{synth_dir}/train.jsonl")}
    tid = {(r["question"], r["time"]) for r in load_split(f"{synth_dir}/test_id.jsonl")}
    assert not train & tid
    again = ts.generate(ts.SynthConfig(n_companies=24, n_people=60, n_cities=8, n_sectors=4,
                                       n_train=40, n_eval=12, n_max=24, e_max=64), 0)
    assert again["test_future"] == load_split(f"{synth_dir}/test_future.jsonl")  # deterministic


def test_generate_with_time_and_graph(params, tmp_path, capsys):
    _, p = params
    ckpt = str(tmp_path / "ckpt")
    save_temporal(ckpt, CFG, TCFG, SH, p)
    gpath = tmp_path / "graph.json"
    gpath.write_text(json.dumps({**GRAPH, "query_nodes": QUERY}))
    prompt = "Question: Who leads Vornex: Kalo, Mira or Tandor? Answer:"
    generate_cli(["--checkpoint", ckpt, "--prompt", prompt, "--time", "2025-06-02",
              "--graph", str(gpath), "--max_new_tokens", "3", "--stop", "\n"])
    printed = capsys.readouterr().out
    model = load_temporal(ckpt)
    text = generate_conditioned(model, prompt, "2025-06-02", str(gpath), max_new_tokens=3)
    assert printed.splitlines()[0].startswith("=== ") and printed.rstrip("\n").endswith(text)
    # The first generated token is the full model's argmax given time and graph.
    arr, g = batch_of([record("2025-06-02", "Mira")])
    n = len(tokenizer().encode(prompt))
    out = logits(p, arr["tokens"], arr["tau"], g)  # causal: positions ≥ n do not matter
    first = tokenizer().decode([int(jnp.argmax(out[0, n - 1]))])
    assert (text or "\n").startswith(first) or first == "\n"
    with pytest.raises(SystemExit, match="YYYY-MM-DD"):
        generate_cli(["--checkpoint", ckpt, "--prompt", prompt, "--time", "June 2025"])
    with pytest.raises(SystemExit, match="--time"):
        generate_cli(["--checkpoint", ckpt, "--prompt", prompt, "--graph", str(gpath)])


# ----------------------------------------------------------------------------- bad synth input

SMALL = ["--n-companies", "6", "--n-people", "7", "--n-cities", "3", "--n-sectors", "1",
         "--n-train", "4", "--n-eval", "2", "--n-max", "8", "--e-max", "16"]


def test_synth_cli_refuses_bad_sizes_in_one_line(tmp_path):
    """`--n-train -5` used to write an empty split and exit 0: now one line naming the flag,
    exit 2, no traceback, nothing written."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jaxdyn.temporal", "synth", "--out", "o",
                          "--n-train", "-5"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "JAXDYN_TRACEBACK": ""}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["error: --n-train -5 (synth.n_train): must be "
                                               "an integer >= 1"]
    assert out.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,value", [("--n-eval", "0"), ("--n-companies", "2"),
                                        ("--n-people", "-1"), ("--e-max", "0"),
                                        ("--seed", "-3")])
def test_synth_cli_names_each_bad_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        temporal_cli(["synth", "--out", str(tmp_path / "o"), *SMALL, flag, value])
    assert e.value.code == 2 and str(e.value).startswith(f"{flag} {value} ")
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_synth_output_is_whole_and_not_overwritten_by_accident(tmp_path, capsys):
    out = tmp_path / "o"
    temporal_cli(["synth", "--out", str(out), *SMALL])
    first = {p.name: p.read_text() for p in out.iterdir()}
    assert set(first) == set(ts.OUTPUT_FILES)
    with pytest.raises(SystemExit, match="not empty.*--overwrite") as e:
        temporal_cli(["synth", "--out", str(out), *SMALL, "--seed", "1"])
    assert e.value.code == 2 and {p.name: p.read_text() for p in out.iterdir()} == first
    temporal_cli(["synth", "--out", str(out), *SMALL, "--seed", "1", "--overwrite"])
    second = {p.name: p.read_text() for p in out.iterdir()}
    assert set(second) == set(first) and second != first
    (out / "notes.txt").write_text("mine")  # a file synth does not write: never replaced
    with pytest.raises(SystemExit, match="notes.txt"):
        temporal_cli(["synth", "--out", str(out), *SMALL, "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    # A failure while writing (a NaN, refused by allow_nan=False) leaves no partial output.
    with pytest.raises(ValueError):
        ts.write(str(tmp_path / "new" / "p"), {"train": [{"x": 1}, {"x": float("nan")}]}, {})
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
