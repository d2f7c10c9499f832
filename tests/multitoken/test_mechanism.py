"""The mechanism check's maths (`jaxdyn.multitoken.mechanism`) against independent NumPy
computations on tiny second-order chains."""

import itertools

import numpy as np
import pytest

from jaxdyn.multitoken import mechanism as mech
from jaxdyn.multitoken.grid import blur, otsu_threshold
from jaxdyn.multitoken.objective import markov_corpus

V = 5


@pytest.fixture(scope="module")
def chain():
    docs, trans = markov_corpus(V, n_docs=400, doc_len=(60, 100), branching=3, order=2, seed=4)
    return docs, trans


def _loop_joint(trans, x_prev, x_t):
    """P(a | x_{t-1}, x_t) · P(b | x_t, a), one entry at a time."""
    out = np.zeros((V, V))
    for a, b in itertools.product(range(V), range(V)):
        out[a, b] = trans[x_prev, x_t, a] * trans[x_t, a, b]
    return out


def _loop_kl(p, q, floor=1e-9):
    total = 0.0
    for a, b in itertools.product(range(V), range(V)):
        if p[a, b] > 0:
            total += p[a, b] * np.log(p[a, b] / max(q[a, b], floor))
    return total


def test_true_joint_is_the_second_order_chain_rule_and_matches_the_corpus(chain):
    docs, trans = chain
    assert trans.shape == (V, V, V) and np.allclose(trans.sum(-1), 1.0)
    for ctx in itertools.product(range(V), repeat=2):
        got = mech.true_joint(trans, [3, *ctx])  # only the last two tokens matter
        assert np.allclose(got, _loop_joint(trans, *ctx)) and np.isclose(got.sum(), 1.0)
    # The corpus itself: frequency of (x_{t+1}, x_{t+2}) after each context (x_{t-1}, x_t).
    counts = np.zeros((V,) * 4)
    for d in docs:
        for w in np.lib.stride_tricks.sliding_window_view(d, 4):
            counts[tuple(w)] += 1
    for ctx in itertools.product(range(V), repeat=2):
        n = counts[ctx].sum()
        if n > 800:
            assert np.abs(counts[ctx] / n - mech.true_joint(trans, ctx)).max() < 0.06, ctx
    # The test has power: conditioning b on (a, x_t) instead of (x_t, a) is another joint.
    swapped = trans[1, 2][:, None] * trans[:, 2, :]
    assert not np.allclose(swapped, mech.true_joint(trans, [1, 2]))


def test_kl_of_each_estimate_equals_a_loop_computation(chain):
    _, trans = chain
    rng = np.random.default_rng(0)
    rho = rng.gamma(1.0, size=(V, V)) * (rng.random((V, V)) > 0.3)  # some unseen pairs
    for ctx in [(0, 1), (2, 2), (4, 3)]:
        true = _loop_joint(trans, *ctx)
        p1, p2 = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
        est = mech.joint_estimates(p1, p2, rho, threshold=0.2)
        prod = np.outer(p1, p2)
        co = prod * rho / (prod * rho).sum()
        keep = co > 0.2
        if keep.any():
            sm = blur(co * keep)
            keep &= co > otsu_threshold(sm[sm > 0])
        thr = co * keep / (co * keep).sum() if keep.any() else co
        for name, ref in (("product", prod), ("cooccur", co), ("cooccur+thresholds", thr)):
            assert np.allclose(est[name], ref)
            assert mech.kl_divergence(mech.true_joint(trans, ctx), est[name]) == \
                pytest.approx(_loop_kl(true, ref), rel=1e-9, abs=1e-12)
    true = _loop_joint(trans, 0, 1)
    assert mech.kl_divergence(true, true) == pytest.approx(0.0, abs=1e-12)
    # The true joint's own marginals as "heads": KL = mutual information of (a, b), > 0 here.
    prod = np.outer(true.sum(1), true.sum(0))
    assert mech.kl_divergence(true, prod) == pytest.approx(_loop_kl(true, prod)) and \
        _loop_kl(true, prod) > 0.01


def test_ancestral_samples_and_match_stats(chain):
    _, trans = chain
    rng = np.random.default_rng(2)
    prompt = [0, 1]
    new = mech.ancestral(trans, prompt, 200, rng)
    stats = mech.match_stats(trans, [prompt], [new])
    assert stats["match_rate"] == 1.0 and stats["tokens"] == 200
    seq = prompt + new
    ref = np.mean([np.log(trans[seq[i - 2], seq[i - 1], seq[i]]) for i in range(2, len(seq))])
    assert stats["mean_true_logp"] == pytest.approx(ref)
    # A token the chain cannot produce there, and an id outside the chain (EOS), do not match.
    bad = int(np.flatnonzero(trans[0, 1] == 0)[0])
    lp = mech.true_logprobs(trans, prompt, [bad, V])
    assert np.all(np.isneginf(lp))
    assert mech.match_stats(trans, [prompt, prompt], [[bad], new[:1]])["match_rate"] == 0.5
