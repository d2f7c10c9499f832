"""Multi-token heads (DynaMo): targets, checkpoint import, LR groups, grid maths, verify and
multitoken decoding on a tiny trained model."""

import dataclasses
import itertools
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.checkpoint import load_model
from jaxdyn.cli.common import load_for_inference
from jaxdyn.cli.generate import divergence_summary, lossless_check_wanted
from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.evaluate.perplexity import evaluate as evaluate_ppl
from jaxdyn.model import build, tiny
from jaxdyn.multitoken.cooccur import CooccurTables, build_tables
from jaxdyn.multitoken.decode import (
    divergence,
    generate_multitoken,
    generate_verify,
    multitoken_step,
    plain_sampling,
    verify_steps,
)
from jaxdyn.multitoken.grid import DynamoOptions, blur, joint_grid, otsu_threshold, select
from jaxdyn.multitoken.heads import (
    all_logits,
    dense_params_of,
    from_dense,
    grad_scale,
    head_overhead,
    heads_of,
    init_mtp_cache,
    init_mtp_params,
    multitoken_model,
)
from jaxdyn.multitoken.objective import markov_corpus, multitoken_loss
from jaxdyn.train import schema, train_and_evaluate
from jaxdyn.train.metrics import read_metrics
from jaxdyn.train.optim import make_optimizer
from tests.multitoken.stats import chi2_ok

V = 32  # symbols of the Markov chain; the model adds EOS and pad (ids tokenizer)
# configs/mtp.py:tiny (GPT-NeoX, 3 heads) on the chain, 2 layers, trained from scratch.
OVERRIDES = ["--config.tokenizer.kind=ids", f"--config.tokenizer.vocab_size={V}",
             "--config.model.num_layers=2", "--config.train.batch_size=8",
             "--config.train.seq_len=32", "--config.train.lr=3e-3", "--config.train.steps=150",
             "--config.train.warmup_steps=1", "--config.train.lr_groups=()",
             "--config.log.every=10", "--config.log.tensorboard=false",
             "--config.eval.every=150", "--config.eval.batches=1",
             "--config.checkpoint.async_save=false", "--config.sample.max_new_tokens=0",
             "--config.mesh.data=1"]
CFG = schema.model_config(schema.finalize(schema.load("configs/mtp.py:tiny", OVERRIDES),
                                          vocab_size=V + 2))
VM = CFG.vocab_size
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [20]]


def loss_of(params, batch, weights=(1.0, 1.0, 1.0), scale=0.1, chunk=1024):
    """The `mtp` objective's loss and statistics on one batch (3 heads)."""
    out = multitoken_model(CFG, 3, 1, scale).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    return multitoken_loss(out, batch["tokens"], batch["segment_ids"], weights, scale, chunk)


@pytest.fixture(scope="module")
def corpus():
    return markov_corpus(V, n_docs=200, branching=2, order=1, seed=0)[0]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """T3 model trained from scratch for 150 steps by the trainer (`mtp` objective) on the
    chain's documents, written as id texts."""
    d = tmp_path_factory.mktemp("mtp")
    with open(d / "chain.jsonl", "w") as f:
        for doc in corpus:
            f.write(json.dumps({"text": " ".join(map(str, doc))}) + "\n")
    work = str(d / "run")
    train_and_evaluate(schema.load("configs/mtp.py:tiny", [
        *OVERRIDES, f"--config.data.source={d / 'chain.jsonl'}"]), work)
    mcfg, params, _ = load_model(work)
    assert mcfg == CFG
    history = [{k.removeprefix("train/"): v for k, v in r.items()}
               for r in read_metrics(work) if r["split"] == "train"]
    return types.SimpleNamespace(params=params, history=history, workdir=work)


@pytest.fixture(scope="module")
def untrained():
    return init_mtp_params(CFG, 3, jax.random.key(3))


@pytest.fixture(scope="module")
def tables(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("cooc")
    build_tables(corpus[:100], VM, d)  # half the corpus: many plausible n-grams stay unseen
    return CooccurTables(d)


# ----------------------------------------------------------------------------- model + loss


def test_head_i_loss_uses_tokens_shifted_by_i_within_documents(untrained):
    params = untrained
    tokens = np.array([[4, 9, 1, 7, 3, 8, 2, 6, 5, 0]], np.int32)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]], np.int32)  # two documents + padding
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]], np.int32)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos}
    _, m = jax.jit(lambda p, b: loss_of(p, b, chunk=4))(params, batch)
    out = jax.jit(multitoken_model(CFG, 3).apply)({"params": params}, tokens, pos, seg)
    logp = np.asarray(jax.nn.log_softmax(all_logits(out), -1))[:, 0]  # [n, T, V]
    for i in (1, 2, 3):
        nll = [-logp[i - 1, t, tokens[0, t + i]] for t in range(10 - i)
               if seg[0, t] != 0 and seg[0, t + i] == seg[0, t]]
        assert len(nll) == {1: 7, 2: 5, 3: 3}[i]  # (4-i)+(5-i) targets stay in a document
        assert float(m[f"mtp/loss_{i}"]) == pytest.approx(np.mean(nll), rel=1e-5)
        assert float(m[f"mtp/tokens_{i}"]) == len(nll)


def test_from_dense_consumes_checkpoint_and_head1_is_the_dense_model():
    cfg = CFG.replace(num_layers=3)
    dense = nn.unbox(jax.jit(build(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    dense = dense["params"]
    params, rep = from_dense(cfg, dense, 3, jax.random.key(1))
    assert rep.dense_params == sum(x.size for x in jax.tree.leaves(dense))
    assert len(rep.copied) == len(jax.tree.leaves(dense))
    assert rep.new and all(p.startswith("heads/") for p in rep.new)
    assert jax.tree.leaves(params["heads"]["layer"])[0].shape[0] == 2  # stacked [n-1, ...]
    assert heads_of(params) == (3, 1) and heads_of(dense) == (1, 1)
    assert np.all(np.asarray(params["heads"]["norm"]["scale"]) == 1.0)
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    out = jax.jit(multitoken_model(cfg, 3).apply)({"params": params}, tokens)
    ref = jax.jit(build(cfg).apply)({"params": dense}, tokens).logits
    assert np.array_equal(np.asarray(all_logits(out)[0]), np.asarray(ref))
    copied, _ = from_dense(cfg, dense, 3, jax.random.key(1), init_from_last_layer=True)
    last = dense["layers"]["attn"]["q"]["kernel"][2]
    assert np.array_equal(copied["heads"]["layer"]["attn"]["q"]["kernel"][1], last)
    unrolled = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], dense["layers"])
                for i in range(3)} | {k: v for k, v in dense.items() if k != "layers"}
    _, rep_u = from_dense(cfg.replace(scan_layers=False), unrolled, 3, jax.random.key(1))
    assert "layers_2/attn/q/kernel" in rep_u.copied
    with pytest.raises(ValueError, match="missing"):
        from_dense(cfg, unrolled, 3, jax.random.key(1))


@pytest.mark.parametrize("D,L,N,V_,extra_m,overhead", [
    (512, 6, 8, 50304, 6.3, 8.95), (768, 12, 12, 50304, 14.2, 8.73),
    (1024, 24, 16, 50304, 25.2, 6.22), (2048, 16, 8, 50304, 100.7, 9.95),
    (2048, 24, 16, 50304, 100.7, 7.12), (2560, 32, 32, 50304, 157.4, 5.67),
    (4096, 32, 32, 50432, 402.8, 5.87)])
def test_parameter_overhead_reproduces_paper_table(D, L, N, V_, extra_m, overhead):
    cfg = tiny("gpt_neox", vocab_size=V_, hidden_size=D, num_layers=L, num_heads=N,
               num_kv_heads=N, head_dim=D // N, intermediate_size=4 * D)
    extra, dense = head_overhead(cfg, 3)
    assert extra == 2 * (12 * D * D + 13 * D + 2 * D)  # (n-1)·(GPT-NeoX block + norm)
    assert round(extra / 1e6, 1) == extra_m
    assert abs(100 * extra / dense - overhead) <= 0.011
    if D == 512:  # head_depth ablation: (n-1)·(2 blocks + norm)
        assert head_overhead(cfg, 3, head_depth=2)[0] == 2 * (2 * (12 * D * D + 13 * D) + 2 * D)


def test_grad_scale_scales_only_the_heads_path_into_the_stem(untrained):
    x = jnp.arange(3.0)
    assert np.allclose(jax.grad(lambda v: jnp.sum(grad_scale(v, 0.1) ** 2))(x), 0.2 * x)
    toks = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    batch = {"tokens": toks, "segment_ids": jnp.ones_like(toks),
             "positions": jnp.arange(8)[None].astype(jnp.int32)}
    loss = lambda p, s: loss_of(p, batch, weights=[0.0, 1.0, 0.0], scale=s)[0]  # head 2 only
    g1, g01 = jax.jit(lambda p: (jax.grad(loss)(p, 1.0), jax.grad(loss)(p, 0.1)))(untrained)
    stem = lambda t: t["layers"]["mlp"]["up"]["kernel"][0]  # layer 0 = stem
    assert np.abs(stem(g1)).max() > 0
    close = lambda a, b: np.abs(a - b).max() <= 1e-5 * np.abs(b).max()  # fp reassociation
    assert close(stem(g01), 0.1 * stem(g1))
    assert close(g01["unembed"]["kernel"], 0.1 * g1["unembed"]["kernel"])
    head = lambda t: t["heads"]["layer"]["mlp"]["up"]["kernel"]
    assert close(head(g01), head(g1))  # heads themselves unscaled
    assert not np.any(np.asarray(g1["layers"]["mlp"]["up"]["kernel"][1]))  # head-1 layer


def test_lr_groups_give_heads_100x_the_base_step(untrained):
    """configs/mtp.py:pythia-70m's LR_M = 100 LR_B, through the one optimizer builder."""
    tc = schema.load("configs/mtp.py:pythia-70m", [
        "--config.train.lr=1e-4", "--config.train.warmup_steps=1",
        "--config.train.steps=100"]).train  # warm-up of 1 step: step 1 has the peak LR
    tree = {"params": untrained, "lora": {}}
    tx, _ = make_optimizer(tc, tree)
    grads = jax.tree.map(jnp.ones_like, tree)
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(tree), tree)
    upd, _ = update(grads, state, tree)
    base = float(upd["params"]["layers"]["mlp"]["up"]["kernel"].ravel()[0])
    head = float(upd["params"]["heads"]["layer"]["mlp"]["up"]["kernel"].ravel()[0])
    assert base == pytest.approx(-1e-4, rel=1e-3)  # Adam: |m/sqrt(v)| = 1
    assert head / base == pytest.approx(100.0, rel=1e-4)


# ----------------------------------------------------------------------------- grid maths


def test_otsu_matches_numpy_reference():
    rng = np.random.default_rng(0)
    for vals in (np.r_[rng.normal(1, 0.2, 300), rng.normal(5, 0.5, 100)],
                 rng.exponential(1.0, 500), np.array([0.1, 0.1, 0.9])):
        hist, edges = np.histogram(vals, 256, (vals.min(), vals.max()))
        c = (edges[:-1] + edges[1:]) / 2
        var = np.full(255, -1.0)
        for t in range(255):  # brute force over every split
            w0, w1 = hist[:t + 1].sum(), hist[t + 1:].sum()
            if w0 and w1:
                mu0 = (hist[:t + 1] * c[:t + 1]).sum() / w0
                mu1 = (hist[t + 1:] * c[t + 1:]).sum() / w1
                var[t] = w0 * w1 * (mu0 - mu1) ** 2
        ref = c[np.flatnonzero(var >= var.max() * (1 - 1e-9))[0]]  # plateau: lowest bin
        assert otsu_threshold(vals) == pytest.approx(ref, rel=1e-12)
        assert np.sum(vals > otsu_threshold(vals)) == np.sum(vals > c[np.argmax(var)])
    assert otsu_threshold(np.full(5, 0.3)) == 0.0


def test_blur_is_separable_121_with_edge_replicate():
    x = np.random.default_rng(1).random((4, 5, 3))
    p = np.pad(x, 1, mode="edge")
    ref = np.zeros_like(x)
    w = {-1: 0.25, 0: 0.5, 1: 0.25}
    for i, j, k in itertools.product(*map(range, x.shape)):
        ref[i, j, k] = sum(w[a] * w[b] * w[c] * p[i + 1 + a, j + 1 + b, k + 1 + c]
                           for a, b, c in itertools.product((-1, 0, 1), repeat=3))
    assert np.allclose(blur(x), ref)


def test_joint_grid_matches_brute_force_and_sampling_follows_renormalised_grid(tables, corpus):
    tables_doc = corpus[0]
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(V, 6, replace=False) for _ in range(3)])
    ids[:, :2] = np.stack([tables_doc[3:6], tables_doc[10:13]], 1)  # two seen triples
    f = rng.dirichlet(np.ones(V), 3)[:, :6]
    opts = DynamoOptions(repetition_penalty=1.5, alpha_c=0.7, adaptive=False, threshold=0.0)
    recent = np.array([ids[0, 0], ids[2, 1]])
    J = joint_grid(ids, f, tables, opts, recent)
    for a, b, c in itertools.product(range(6), repeat=3):
        tup = (ids[0, a], ids[1, b], ids[2, c])
        ref = f[0, a] * f[1, b] * f[2, c] * tables.ratio(np.array([tup]))[0] ** 0.7
        if len(set(tup)) < 3 or set(tup) & set(recent.tolist()):
            ref /= 1.5
        assert J[a, b, c] == pytest.approx(ref, rel=1e-12, abs=1e-300)
    assert J.sum() > 0 and (J == 0).any()  # some tuples are masked, some seen
    Jn = J / J.sum()
    assert Jn.sum() == pytest.approx(1.0, abs=1e-12)
    draws = [tuple(select(ids, f, -1, tables, recent, opts, rng)[0]) for _ in range(3000)]
    best = np.unravel_index(np.argmax(Jn), Jn.shape)
    top = tuple(int(ids[h, i]) for h, i in enumerate(best))
    assert np.mean([d == top for d in draws]) == pytest.approx(Jn.max(), abs=0.035)
    assert all(tables.count(np.array([d]))[0] > 0 for d in set(draws))


def test_threshold_extremes_and_masking(tables, corpus, tmp_path):
    rng = np.random.default_rng(1)
    for _ in range(30):
        ids = np.stack([rng.choice(V, 8, replace=False) for _ in range(3)])
        ids[:, 0] = corpus[0][5:8]  # make sure one seen triple is in the grid
        f = rng.random((3, 8))
        one, info1 = select(ids, f, 7, tables, np.array([], np.int64),
                            DynamoOptions(threshold=1.0), rng)
        three, info3 = select(ids, f, 7, tables, np.array([], np.int64),
                              DynamoOptions(threshold=0.0), rng)
        assert one == [7] and info1["n"] == 1
        assert len(three) == 3 and tables.count(np.array([three]))[0] > 0
    unseen_ids = np.array([[0, 1], [0, 1], [0, 1]])
    build_tables([np.array([5, 6, 7])], V, tmp_path)  # no pair of {0, 1} is ever seen
    blank = CooccurTables(tmp_path)
    toks, info = select(unseen_ids, np.ones((3, 2)), 5, blank, np.array([], np.int64),
                        DynamoOptions(threshold=0.0), rng)
    assert toks == [5] and info["backoffs"] == 2


# ----------------------------------------------------------------------------- decoding


def test_training_logs_each_head_and_learns(trained):
    first, last = trained.history[0], trained.history[-1]
    for i in (1, 2, 3):
        assert f"mtp/loss_{i}" in last and last[f"mtp/loss_{i}"] < first[f"mtp/loss_{i}"]
    # on held-out documents: 3 steps ahead is harder than 1 on a V=32 chain, 2 successors each
    val = [r for r in read_metrics(trained.workdir) if r["split"] == "val"][-1]
    assert val["val/mtp/loss_1"] < val["val/mtp/loss_3"] < 1.5


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_verify_greedy_equals_plain_greedy(trained, penalty):
    s = SamplingConfig(repetition_penalty=penalty)
    ref = generate(CFG, dense_params_of(trained.params), PROMPTS, 40, s).tokens
    _, step = verify_steps(CFG, 3, 1, s)  # shared (lru_cache) with other tests of this CFG
    before = step._cache_size()
    res = generate_verify(CFG, trained.params, PROMPTS, 40, s)
    assert res.tokens == ref
    assert res.tokens_per_forward >= 1.5 and res.acceptance[0] > 0.5
    assert step._cache_size() - before <= 1  # 40 tokens, the decode step compiled at most once


def _written_kv(cache, b):
    """Every layer's K/V at row b's written slots, in slot order."""
    def rows(c):
        w = np.asarray(c["written"])[..., b, :]  # [..., S]
        k, v = np.asarray(c["k"])[..., b, :, :, :], np.asarray(c["v"])[..., b, :, :, :]
        flat_w = w.reshape(-1, w.shape[-1])
        return [(kk[ww], vv[ww]) for kk, vv, ww in zip(
            k.reshape(-1, *k.shape[-3:]), v.reshape(-1, *v.shape[-3:]), flat_w, strict=True)]
    return rows(cache["layers"]) + rows(cache["heads"])


@jax.jit
def _prefill_cache(params, tokens_BT, seg_BT):
    cache = init_mtp_cache(CFG, 3, 1, tokens_BT.shape[1])
    return multitoken_model(CFG, 3).apply({"params": params}, tokens_BT, None, seg_BT, cache).cache


def _check_cache(params, cache, ctx_rows, min_len):
    """Each row's written K/V (every layer and head) equal a fresh prefill of its tokens."""
    for b, ctx in enumerate(ctx_rows):
        got = _written_kv(cache, b)
        n_written = len(got[0][0])
        assert n_written >= min_len[b]
        m = min(n_written, len(ctx))
        tokens, seg = np.zeros((1, 64), np.int32), np.zeros((1, 64), np.int32)
        tokens[0, :m], seg[0, :m] = ctx[:m], 1  # right padding is never written
        full = _prefill_cache(params, tokens, seg)
        for (k, v), (rk, rv) in zip(got, _written_kv(full, 0), strict=True):
            assert len(rk) == m
            assert np.allclose(k[:m], rk, atol=1e-5) and np.allclose(v[:m], rv, atol=1e-5)


def test_caches_equal_full_recompute_after_accepting_1_2_3(trained, untrained, tables):
    for params in (trained.params, untrained):
        res = generate_verify(CFG, params, PROMPTS, 24, return_cache=True)
        assert res.tokens == generate(CFG, dense_params_of(params), PROMPTS, 24).tokens
        assert res.emission_hist[1:].sum() == res.row_forwards
        ctx = [p + t for p, t in zip(PROMPTS, res.tokens, strict=True)]
        _check_cache(params, res.cache, ctx, [len(c) - 1 for c in ctx])
    hists = []
    for eps in (1.0, 0.0, 0.3):
        res = generate_multitoken(CFG, trained.params, tables, PROMPTS, 24,
                                  DynamoOptions(threshold=eps, top_k=8), return_cache=True)
        hists.append(res.emission_hist)
        ctx = [p + t for p, t in zip(PROMPTS, res.tokens, strict=True)]
        _check_cache(trained.params, res.cache, ctx, [len(p) for p in PROMPTS])
    assert hists[0][1] == hists[0].sum()  # ε_b = 1: one token per forward
    assert hists[1][3] > 0.8 * hists[1].sum() and sum(h[2] + h[3] for h in hists) > 0


def test_divergence_counts_differing_positions():
    div = divergence([[1, 2, 3], [4, 5], [7]], [[1, 9, 3], [4, 5, 6], [7]], "bfloat16")
    assert (div.diverged_steps, div.first_divergence, div.compared_steps) == (2, (1, 2, None), 7)
    assert div.diverged_rows == 2 and not div.lossless and div.dtype == "bfloat16"
    assert divergence([[1, 2]], [[1, 2]]).lossless
    with pytest.raises(ValueError, match="rows"):
        divergence([[1]], [[1], [2]])


def _independent_diff(a_rows, b_rows):
    """(differing positions, first per row) by direct comparison of padded arrays."""
    steps, first = 0, []
    for a, b in zip(a_rows, b_rows, strict=True):
        n = max(len(a), len(b))
        pa, pb = np.full(n, -1), np.full(n, -2)
        pa[:len(a)], pb[:len(b)] = a, b
        bad = np.flatnonzero(pa != pb)
        steps += len(bad)
        first.append(int(bad[0]) if len(bad) else None)
    return steps, tuple(first)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_check_lossless_reports_divergence_from_plain_greedy(untrained, dtype):
    """fp32: identical, 0 diverged. bf16: the reported count (whatever it is) equals an
    independent comparison with plain greedy decoding in the same dtype."""
    cfg = dataclasses.replace(CFG, dtype=dtype)
    prompts = PROMPTS + [[int(t) for t in np.random.default_rng(5).integers(0, 34, 9)]]
    res = generate_verify(cfg, untrained, prompts, 32, check_lossless=True)
    ref = generate(cfg, dense_params_of(untrained), prompts, 32).tokens
    div = res.divergence
    assert div.dtype == dtype and div.compared_steps == sum(max(len(a), len(b)) for a, b in
                                                            zip(res.tokens, ref, strict=True))
    assert (div.diverged_steps, div.first_divergence) == _independent_diff(res.tokens, ref)
    if dtype == "float32":
        assert res.tokens == ref and div.lossless and div.diverged_rows == 0
    assert generate_verify(cfg, untrained, prompts, 8).divergence is None  # only when asked
    with pytest.raises(ValueError, match="greedy"):
        generate_verify(cfg, untrained, prompts, 8, SamplingConfig(temperature=1.0),
                        check_lossless=True)


def test_cli_checks_lossless_by_default_outside_fp32_and_reports_it():
    args = lambda mode, t=0.0: types.SimpleNamespace(check_lossless=mode, temperature=t)
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    assert lossless_check_wanted(args("auto"), bf16)
    assert not lossless_check_wanted(args("auto"), CFG)  # fp32: exact, no second decode
    assert not lossless_check_wanted(args("auto", 0.7), bf16)  # sampling: no token reference
    assert lossless_check_wanted(args("on"), CFG) and not lossless_check_wanted(args("off"), bf16)
    with pytest.raises(SystemExit, match="temperature 0"):
        lossless_check_wanted(args("on", 0.7), CFG)
    line = divergence_summary(divergence([[1, 2, 3], [4]], [[1, 5, 6], [4]], "bfloat16"))
    assert "2 of 4 tokens differ" in line and "1 of 2 rows" in line and "1, -" in line
    assert "identical" in divergence_summary(divergence([[1]], [[1]]))
    assert divergence_summary(None) == ""


def test_multitoken_emits_only_seen_ngrams_and_is_deterministic(trained, tables):
    step = multitoken_step(CFG, 3, 1, plain_sampling(DynamoOptions(top_k=10)))
    before = step._cache_size()  # the jitted step is shared with other tests of this CFG
    runs = [generate_multitoken(CFG, trained.params, tables, PROMPTS, 30,
                                DynamoOptions(threshold=0.2, top_k=10), seed=3)
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens
    multi = [e for row in runs[0].emissions for e in row if len(e) > 1]
    assert multi and all(tables.count(np.array([e]))[0] > 0 for e in multi)
    assert runs[0].tokens_per_forward > 1.2
    assert step._cache_size() - before <= 2  # prefill + decode block, for both runs


def test_verify_sampling_preserves_head1_distribution(untrained):
    params = untrained  # random heads: drafts disagree with head 1 often
    s = SamplingConfig(temperature=1.0)
    prompt, B = [4, 9, 2], 3000
    res = generate_verify(CFG, params, [prompt] * B, 3, s, seed=11)
    toks = np.array(res.tokens)
    assert 0.05 < res.acceptance[0] < 0.95  # both acceptance and residual paths are used
    # Exact marginals of the 2nd and 3rd tokens from head 1 by full forwards.
    model = build(CFG)
    dense = dense_params_of(params)
    probs = lambda seqs: np.asarray(jax.nn.softmax(
        model.apply({"params": dense}, jnp.asarray(seqs)).logits[:, -1], -1), np.float64)
    p1 = probs([prompt])[0]
    p2_given = probs([prompt + [a] for a in range(VM)])  # [x1, x2]
    pairs = [prompt + [a, b] for a in range(VM) for b in range(VM)]
    p3_given = probs(pairs).reshape(VM, VM, VM)
    joint12 = p1[:, None] * p2_given
    marg2, marg3 = joint12.sum(0), np.einsum("ab,abc->c", joint12, p3_given)
    for j, marg in ((1, marg2), (2, marg3)):
        ok, stat, crit = chi2_ok(np.bincount(toks[:, j], minlength=VM), marg)
        assert ok, (j, stat, crit)
    # The test has power: the drafting head's own distribution is rejected.
    out = multitoken_model(CFG, 3).apply({"params": params}, jnp.asarray([prompt]))
    q2 = np.asarray(jax.nn.softmax(all_logits(out)[1, 0, -1]), np.float64)
    assert not chi2_ok(np.bincount(toks[:, 1], minlength=VM), q2)[0]


def test_trainer_writes_a_multitoken_checkpoint_that_generate_and_evaluate_load(tmp_path):
    """`python -m jaxdyn.train --config configs/mtp.py:tiny` -> a workdir with heads/ params,
    per-head metrics logged separately, loadable by generate (verify == plain) and evaluate."""
    cfg = schema.load("configs/mtp.py:tiny", [
        "train.steps=3", "train.batch_size=2", "train.seq_len=32", "data.max_documents=30",
        "model.num_layers=2", "log.every=1", "log.tensorboard=false", "eval.batches=1",
        "checkpoint.async_save=false", "sample.max_new_tokens=0", "mesh.data=1"])
    train_and_evaluate(cfg, str(tmp_path))
    mcfg, params, tok = load_for_inference(str(tmp_path))
    assert heads_of(params) == (3, 1)
    rows = read_metrics(str(tmp_path))
    assert all(f"train/mtp/loss_{i}" in rows[0] for i in (1, 2, 3))
    assert any(f"val/mtp/ppl_{i}" in r for r in rows for i in (2, 3))
    prompt = [tok.encode("def ")]
    plain = generate(mcfg, params, prompt, 8).tokens
    assert generate_verify(mcfg, params, prompt, 8, n_heads=3).tokens == plain
    t = np.arange(40, dtype=np.int32)[None]
    batch = {"tokens": t % 250, "positions": t, "segment_ids": np.ones_like(t)}
    assert np.isfinite(evaluate_ppl(mcfg, params, [batch])["mtp/ppl_1:3"])
