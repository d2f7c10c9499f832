"""DynaMo selection on device (`multitoken/device.py`) against the host implementation
(`grid.select`, `CooccurTables`, `decode.generate_multitoken`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import tiny
from jaxdyn.multitoken import device
from jaxdyn.multitoken.cooccur import CooccurTables, build_tables
from jaxdyn.multitoken.decode import generate_multitoken
from jaxdyn.multitoken.grid import DynamoOptions, blur, otsu_threshold, select
from jaxdyn.multitoken.heads import init_mtp_params
from jaxdyn.multitoken.objective import markov_corpus

VT = 12  # table vocabulary of the random-tables tests
CFG = tiny("qwen2", vocab_size=34, max_position_embeddings=128)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [20]]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Random tables over VT ids (orders 2..4), host and device."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VT, int(rng.integers(1, 40))) for _ in range(60)]
    d = tmp_path_factory.mktemp("cooc_small")
    build_tables(docs, VT, d, max_order=4)
    host = CooccurTables(d)
    return host, device.device_tables(host)


def test_lookup_equals_host_count_and_ratio(small):
    host, dev = small
    rng = np.random.default_rng(1)
    for K in (1, 2, 3, 4):
        seen = np.asarray(host.keys[K]) if K > 1 else np.arange(VT)
        grams = rng.integers(-1, VT + 2, (300, K))  # mostly unseen, some outside V
        if K > 1:  # every seen n-gram too, decoded from its key
            picked = seen[rng.choice(len(seen), min(200, len(seen)), replace=False)]
            grams = np.r_[grams, np.stack([picked // VT ** (K - 1 - j) % VT
                                           for j in range(K)], 1)]
        ref = host.count(grams)
        got = np.asarray(device.count(dev, jnp.asarray(grams, jnp.int32)))
        assert np.array_equal(got, ref) and (ref > 0).sum() >= (100 if K > 1 else 0)
    ids = np.stack([rng.choice(VT, 5, replace=False) for _ in range(3)])
    for s in (0.0, 0.5):
        ref = host.grid_ratio(ids, s)
        got = np.asarray(device.grid_ratio(dev, jnp.asarray(ids, jnp.int32), s))
        np.testing.assert_allclose(got, ref, rtol=2e-6)
        assert (ref > 0).any() and (s > 0 or (ref == 0).any())


def test_blur_and_otsu_equal_host():
    rng = np.random.default_rng(2)
    x = rng.random((4, 5, 3))
    np.testing.assert_allclose(np.asarray(device.blur(jnp.asarray(x, jnp.float32))), blur(x),
                               rtol=1e-6)
    for vals in (np.r_[rng.normal(1, 0.2, 300), rng.normal(5, 0.5, 100)],
                 rng.exponential(1.0, 500), np.array([0.1, 0.1, 0.9]), np.full(5, 0.3)):
        pad = np.r_[vals, rng.random(37) * 9]  # masked-out entries must not count
        mask = np.r_[np.ones(len(vals), bool), np.zeros(37, bool)]
        got = float(device.otsu_threshold(jnp.asarray(pad, jnp.float32), jnp.asarray(mask)))
        ref = otsu_threshold(vals)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)
        assert np.sum(vals > got) == np.sum(vals > ref)


OPTIONS = [
    DynamoOptions(top_k=6, temperature=0.0, threshold=0.0),
    DynamoOptions(top_k=6, temperature=0.0, threshold=0.05, blur=False),
    DynamoOptions(top_k=6, temperature=0.7, threshold=0.02),
    DynamoOptions(top_k=6, temperature=1.0, threshold=0.0, adaptive=False,
                  repetition_penalty=2.0, alpha_c=0.5),
    DynamoOptions(top_k=6, temperature=1.0, threshold=0.3, smoothing=0.3),
    DynamoOptions(top_k=6, temperature=0.7, threshold=0.2, n_max=2),
    DynamoOptions(top_k=6, temperature=0.7, threshold=0.002, mode="paper", alpha_c=0.3),
    DynamoOptions(top_k=6, temperature=0.7, threshold=1.0),
]


@pytest.mark.parametrize("opts", OPTIONS)
def test_select_device_equals_host_select(small, opts):
    """Same tokens, n and back-offs; sampling gets the uniform the host's generator draws."""
    host, dev = small
    rng = np.random.default_rng(3)
    ns = set()
    for trial in range(40):
        ids = np.stack([rng.choice(VT, 6, replace=False) for _ in range(3)])
        if trial % 4 < 2:  # head 2 or 3 outside the tables: back-off to 1 or 2 tokens
            ids[2 - trial % 4] += VT
        f = rng.dirichlet(np.full(VT, 0.5), 3)[:, :6]
        recent = rng.integers(0, VT, int(rng.integers(0, 5)))
        fb = int(rng.integers(VT))
        ref, info = select(ids, f, fb, host, recent, opts, np.random.default_rng(trial))
        got, dinfo = device.select_device(ids, f, fb, dev, recent, opts,
                                          u=np.random.default_rng(trial).random())
        assert (got, dinfo) == (ref, info), trial
        ns.add(info["n"])
    assert ns == {1} if opts.threshold >= 1.0 else len(ns) >= 2  # back-off is exercised


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """An untrained 3-head tiny model and tables of a Markov chain over its ids."""
    corpus = markov_corpus(32, n_docs=200, branching=2, order=1, seed=0)[0]
    d = tmp_path_factory.mktemp("cooc_chain")
    build_tables(corpus[:100], CFG.vocab_size, d)
    return init_mtp_params(CFG, 3, jax.random.key(3)), CooccurTables(d)


@pytest.mark.parametrize("opts,eos", [
    (DynamoOptions(top_k=8, temperature=0.0, threshold=0.02), None),
    (DynamoOptions(top_k=8, temperature=0.8, threshold=0.01, penalty_window=4), 7),
])
def test_generate_device_equals_host_and_compiles_once(chain, opts, eos):
    params, tables = chain
    logs = ([], [])  # (step, new tokens per row) streamed by each
    ref = generate_multitoken(CFG, params, tables, PROMPTS, 20, opts, seed=5, eos_id=eos,
                              return_cache=True, on_tokens=lambda *a: logs[0].append(a))
    before = device.TRACES["decode"]
    got = device.generate_multitoken_device(CFG, params, tables, PROMPTS, 20, opts, seed=5,
                                            eos_id=eos, return_cache=True, steps_per_call=3,
                                            on_tokens=lambda *a: logs[1].append(a))
    assert got.tokens == ref.tokens and got.emissions == ref.emissions
    assert logs[1] == logs[0] and len(logs[0]) == ref.forwards + 1
    assert (got.forwards, got.emitted, got.row_forwards, got.backoffs) == (
        ref.forwards, ref.emitted, ref.row_forwards, ref.backoffs)
    assert np.array_equal(got.emission_hist, ref.emission_hist)
    assert ref.emission_hist[2:].sum() > 0 and ref.emission_hist[1] > 0  # 1 and >1 tokens
    for a, b in zip(jax.tree.leaves(got.cache), jax.tree.leaves(ref.cache), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=1e-5)
    assert got.forwards > 3 and device.TRACES["decode"] - before == 1  # several calls, 1 trace
    again = device.generate_multitoken_device(CFG, params, tables, [[4, 4], [9], [30, 31]], 20,
                                              opts, seed=6, eos_id=eos, steps_per_call=3)
    assert device.TRACES["decode"] - before == 1  # same shapes: no second compile
    assert all(1 <= len(t) <= 20 for t in again.tokens)
