"""DTF gate maths (docs/features/routing.md §4.2–4.3) against an independent NumPy reference.

The reference below is written from the equations only (no jaxdyn helpers): from the unit's
input H and the Decision layer's output H_post (both sown by DTFUnit under
`intermediates/gate_terms`) and the pair's parameters it recomputes Δ, Δ̂, D_st, D_ch, MA_W,
CE, CU, S_CE, S_CU and G in float64 and compares every sown term at a non-trivial state (gate
scalars far from their inits, a perturbed PriorFFN, a Decision layer with a large update). The
mutation tests evaluate the reference with one deliberate mistake each and assert the model
output is far from it, so the comparison can fail for exactly those mistakes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from jaxdyn.model import build, init_params
from jaxdyn.model.config import ModelConfig
from jaxdyn.train import schema

RTOL, ATOL = 1e-5, 1e-6  # fp32 model vs float64 reference
FAR = 1e-3  # a mutated reference must miss the model by more than this (max relative error)
PRIOR_EPS = 1e-6
# Non-trivial gate scalars per pair (raw values; the inits are -0.3, -0.6, 1.025, 1.1).
SCALARS = [{"beta_ce": 1.4, "beta_cu": 0.3, "o_ce": 0.45, "m_cu": 0.6},
           {"beta_ce": -1.2, "beta_cu": 2.0, "o_ce": 1.9, "m_cu": 1.7}]


# ----------------------------------------------------------------------------- NumPy reference


def np_softplus(x):
    return np.log1p(np.exp(x))


def np_sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


def np_silu(x):
    return x * np_sigmoid(x)


def np_moving_average(v_BT, window, seg_BT=None, padding="replicate"):
    """MA_W from its definition: the mean of the current and W−1 previous values of the same
    row and segment (a segment is a contiguous run of one id); "replicate" fills the missing
    left part of the window with the segment's first value, "available" averages what exists."""
    v = np.asarray(v_BT, np.float64)
    B, T = v.shape
    seg = np.zeros((B, T), np.int64) if seg_BT is None else np.asarray(seg_BT)
    out = np.empty((B, T))
    for b in range(B):
        for t in range(T):
            start = t
            while start > 0 and seg[b, start - 1] == seg[b, t]:
                start -= 1
            vals = list(v[b, max(start, t - window + 1):t + 1])
            if padding == "replicate":
                vals = [v[b, start]] * (window - len(vals)) + vals
            out[b, t] = np.mean(vals)
    return out


def np_prior(h_BTD, p):
    """Δ̂ = W2(SiLU(W1 u) ⊙ W3 u), u = RMSNorm_p(H) (scale, eps 1e-6)."""
    h = np.asarray(h_BTD, np.float64)
    u = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + PRIOR_EPS) * p["prior_norm"]["scale"]
    w1, w3, w2 = (np.asarray(p["prior"][n], np.float64) for n in ("w1", "w3", "w2"))
    return (np_silu(u @ w1) * (u @ w3)) @ w2


def np_gate_terms(h_BTD, hp_BTD, p, window, seg_BT=None, padding="replicate", gate="or",
                  mutate: str | None = None):
    """Every §4.2–4.3 term from H, H_post and the pair's params; `mutate` names a deliberate
    mistake (for the mutation tests)."""
    delta = np.asarray(hp_BTD, np.float64) - np.asarray(h_BTD, np.float64)
    dhat = np_prior(h_BTD, p)
    sc = {n: float(np.asarray(p[n])) for n in ("beta_ce", "beta_cu", "o_ce", "m_cu")}
    d_st = np.mean(delta ** 2, axis=-1)
    if mutate == "d_ch_plus":
        d_ch = np.mean((delta + dhat) ** 2, axis=-1)
    elif mutate == "d_ch_prior_only":
        d_ch = np.mean(dhat ** 2, axis=-1)
    elif mutate == "d_ch_sum":
        d_ch = np.sum((delta - dhat) ** 2, axis=-1)
    else:
        d_ch = np.mean((delta - dhat) ** 2, axis=-1)
    W = {"window_minus_1": window - 1, "window_plus_1": window + 1,
         "window_fixed_100": 100}.get(mutate, window)
    pad = {"padding_swapped": "available" if padding == "replicate" else "replicate"}.get(
        mutate, padding)
    ma = np_moving_average(d_st, W, None if mutate == "no_segment_restart" else seg_BT, pad)
    ce = d_st - d_ch + np.log(sc["o_ce"] + 1e-10)
    if mutate == "ma_sign_flipped":
        cu = d_st + sc["m_cu"] * ma
    elif mutate == "m_cu_on_d_st":
        cu = sc["m_cu"] * d_st - ma
    else:
        cu = d_st - sc["m_cu"] * ma
    s_ce = np_sigmoid(np_softplus(sc["beta_ce"]) * ce)
    s_cu = np_sigmoid(np_softplus(sc["beta_cu"]) * cu)
    g = s_ce if gate == "ce" else s_ce + s_cu - s_ce * s_cu
    return {"dhat": dhat, "d_st": d_st, "d_ch": d_ch, "ma": ma, "ce": ce, "cu": cu,
            "s_ce": s_ce, "s_cu": s_cu, "g": g}


# ----------------------------------------------------------------------------- the model


def train_model_cfg(seq_len: int = 64, **routing) -> ModelConfig:
    """configs/dtf.py:tiny through the training schema (W resolved from train.seq_len),
    unrolled so each pair's sown terms are separate."""
    c = mlc.ConfigDict(schema.load("configs/dtf.py:tiny").to_dict())
    c.train.seq_len = seq_len
    c.model.routing.update(routing)
    return schema.model_config(c).replace(scan_layers=False)


@functools.cache
def nontrivial_params(cfg: ModelConfig):
    """Init params moved well away from the init state: gate scalars set per pair, the Decision
    layer's output projections scaled up (D_st of order 1, not ~1e-4), the PriorFFN replaced
    by random weights of a useful size and its norm scale perturbed (D_ch ≠ D_st)."""
    p = jax.tree.map(np.asarray, init_params(cfg.replace(routing={}), jax.random.key(0)))
    rng = np.random.default_rng(0)
    n_pairs = cfg.num_layers // 2
    for j in range(n_pairs):
        u = p[f"layers_{j}"]
        for n, v in SCALARS[j % len(SCALARS)].items():
            u[n] = np.asarray(v, np.float32)
        dec = u["dec"]
        dec["attn"]["o"]["kernel"] = dec["attn"]["o"]["kernel"] * 40.0
        dec["mlp"]["down"]["kernel"] = dec["mlp"]["down"]["kernel"] * 40.0
        for w in ("w1", "w3", "w2"):
            shape = u["prior"][w].shape
            u["prior"][w] = (rng.normal(0, 1.2 / np.sqrt(shape[0]), shape)).astype(np.float32)
        D = u["prior_norm"]["scale"].shape[0]
        u["prior_norm"]["scale"] = (1.0 + 0.3 * rng.normal(size=D)).astype(np.float32)
    return jax.tree.map(jnp.asarray, p)


@functools.cache
def _apply(cfg: ModelConfig):
    return jax.jit(lambda p, t, pos, seg: build(cfg).apply(
        {"params": p}, t, pos, seg, mutable=["intermediates"])[1]["intermediates"])


def packed_batch(T: int, cut: int, seed: int = 1):
    """Two rows; row 0 packs two documents (segment ids 1, 2, positions restarting at `cut`),
    row 1 is one document."""
    t = jax.random.randint(jax.random.key(seed), (2, T), 0, 258)
    seg = np.ones((2, T), np.int32)
    seg[0, cut:] = 2
    pos = np.broadcast_to(np.arange(T), (2, T)).copy()
    pos[0, cut:] -= cut
    return t, jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


# (train seq_len -> W, forward T, padding, gate)
CASES = {
    "T64_replicate": (64, 64, "replicate", "or"),  # W = min(100, 64) = 64
    "W16_T40_available": (16, 40, "available", "or"),  # the window slides (T > W)
    "W16_T40_replicate_ce": (16, 40, "replicate", "ce"),
}


@functools.cache
def model_and_reference(case: str):
    seq_len, T, padding, gate = CASES[case]
    cfg = train_model_cfg(seq_len, ma_padding=padding, gate=gate)
    p = nontrivial_params(cfg)
    t, pos, seg = packed_batch(T, cut=T // 2 + 3)
    inter = _apply(cfg)(p, t, pos, seg)
    W = dict(cfg.routing)["ma_window"]
    pairs = []
    for j in range(cfg.num_layers // 2):
        got = jax.tree.map(np.asarray, inter[f"layers_{j}"]["gate_terms"][0])
        routing_gate = np.asarray(inter[f"layers_{j}"]["routing"][0]["gate"])
        pairs.append((got, routing_gate, jax.tree.map(np.asarray, p[f"layers_{j}"])))
    return dict(W=W, seg=np.asarray(seg), padding=padding, gate=gate, pairs=pairs)


def reference(case: str, j: int, mutate: str | None = None):
    m = model_and_reference(case)
    got, _, pp = m["pairs"][j]
    return np_gate_terms(got["h"], got["h_post"], pp, m["W"], m["seg"], m["padding"], m["gate"],
                         mutate)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (np.abs(b) + 1e-12)))


# ----------------------------------------------------------------------------- tests


def test_reference_moving_average_by_hand():
    """The NumPy MA itself, on values small enough to check by hand."""
    v = np.array([[4.0, 2.0, 6.0, 8.0, 1.0, 3.0]])
    np.testing.assert_allclose(np_moving_average(v, 3), [[4, 10 / 3, 4, 16 / 3, 5, 4]])
    np.testing.assert_allclose(np_moving_average(v, 3, padding="available"),
                               [[4, 3, 4, 16 / 3, 5, 4]])
    seg = np.array([[1, 1, 1, 2, 2, 2]])  # the window restarts at index 3 (value 8)
    np.testing.assert_allclose(np_moving_average(v, 3, seg), [[4, 10 / 3, 4, 8, 17 / 3, 4]])
    np.testing.assert_allclose(np_moving_average(v, 3, seg, "available"),
                               [[4, 3, 4, 8, 4.5, 4]])


def test_schema_window_is_min_100_and_train_seq_len():
    assert dict(train_model_cfg(64).routing)["ma_window"] == 64  # every tiny run: W = 64
    assert dict(train_model_cfg(16).routing)["ma_window"] == 16
    assert "ma_window" not in dict(train_model_cfg(256).routing)  # default 100 applies
    assert dict(train_model_cfg(256, ma_window=32).routing)["ma_window"] == 32
    assert dict(train_model_cfg(8, ma_window=32).routing)["ma_window"] == 8


@pytest.mark.parametrize("case", list(CASES))
def test_every_gate_term_matches_numpy_reference(case):
    m = model_and_reference(case)
    for j, (got, routing_gate, pp) in enumerate(m["pairs"]):
        ref = reference(case, j)
        # The state is non-trivial: large updates, an imperfect prior, unsaturated gates.
        assert np.mean(ref["d_st"]) > 0.05, j
        assert np.mean(np.abs(ref["d_st"] - ref["d_ch"])) > 0.1 * np.mean(ref["d_st"]), j
        assert 0.02 < np.mean(ref["s_ce"]) < 0.98 and 0.02 < np.mean(ref["s_cu"]) < 0.98, j
        assert np.std(ref["g"]) > 1e-3, j
        np.testing.assert_allclose(np.asarray(pp["o_ce"]), SCALARS[j]["o_ce"])
        for name in ("dhat", "d_st", "d_ch", "ma", "ce", "cu", "s_ce", "s_cu", "g"):
            np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case} pair {j} {name}")
        np.testing.assert_allclose(routing_gate, ref["g"], rtol=RTOL, atol=ATOL)


# mutation -> the sown term it corrupts first (G is checked too)
MUTATIONS = {
    "ma_sign_flipped": "cu",
    "m_cu_on_d_st": "cu",
    "window_minus_1": "ma",
    "window_plus_1": "ma",
    "window_fixed_100": "ma",  # 100 instead of min(100, T)
    "padding_swapped": "ma",
    "no_segment_restart": "ma",
    "d_ch_plus": "d_ch",
    "d_ch_prior_only": "d_ch",
    "d_ch_sum": "d_ch",
}


@pytest.mark.parametrize("case", ["T64_replicate", "W16_T40_available"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutated_reference_is_detected(case, mutation):
    """The comparison above fails for each of these mistakes: the model is far from the mutated
    reference in the term it corrupts and in the gate G (a reference with the mistake would not
    pass the RTOL/ATOL check)."""
    m = model_and_reference(case)
    for j, (got, _, _) in enumerate(m["pairs"]):
        bad = reference(case, j, mutation)
        term = MUTATIONS[mutation]
        assert max_rel(got[term], bad[term]) > FAR, (case, j, mutation, term)
        assert not np.allclose(got["g"], bad["g"], rtol=RTOL, atol=ATOL), (case, j, mutation)
        assert max_rel(got["g"], bad["g"]) > 10 * RTOL, (case, j, mutation)
