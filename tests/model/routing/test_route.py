"""The routing primitive (docs/features/routing.md tests a-e), the causal MA, options and FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import ConfigError, routed_flops_per_token, tiny
from jaxdyn.model.block import DecoderLayer
from jaxdyn.model.routing import route as R
from jaxdyn.model.routing.options import capacity_k, prior_width

CFG = tiny("qwen2", hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


class Routed(nn.Module):
    """A DecoderLayer routed by given scores/gates (the primitive in isolation)."""

    cfg: object
    k: int
    dispatch: str = "gather"

    @nn.compact
    def __call__(self, x, score, gate, pos, valid=None, seg=None):
        layer = DecoderLayer(self.cfg, name="block")

        def block(xs, ps, ss):
            return layer(xs, None, {"pos_BT": ps, "seg_BT": ss, "index": None})[0]

        return R.route(x, score, gate, pos, valid, seg, self.k, block, self.dispatch)


def setup(B=2, T=16, k=4, seed=0, **kw):
    kx, ks, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (B, T, CFG.hidden_size))
    score = jax.random.normal(ks, (B, T))
    gate = jax.nn.sigmoid(jax.random.normal(kg, (B, T)))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mod = Routed(CFG, k, **kw)
    params = mod.init(jax.random.key(1), x, score, gate, pos)
    return mod, params, x, score, gate, pos


def test_a_future_tokens_do_not_change_the_past():
    mod, params, x, score, gate, pos = setup()
    t = 9
    x2 = x.at[:, t + 1:].add(3.0)
    (y1, info), (y2, _) = (mod.apply(params, a, score, gate, pos) for a in (x, x2))
    sel = np.asarray(info.idx_Bk)
    assert (sel > t).any() and (sel <= t).any()  # the selection straddles t
    np.testing.assert_allclose(y1[:, :t + 1], y2[:, :t + 1], atol=1e-6, rtol=0)
    assert np.all(np.diff(sel, axis=-1) > 0)  # sorted, distinct


def test_a_catches_unsorted_indices(monkeypatch):
    """Guard that test (a) can fail: top-k in score order lets tokens see their future."""
    unsorted = lambda s, v, k: jax.lax.top_k(s if v is None else jnp.where(v, s, -jnp.inf),
                                             k)[1]
    monkeypatch.setattr(R, "topk_indices", unsorted)
    mod, params, x, score, gate, pos = setup()
    t = 9
    y1, _ = mod.apply(params, x, score, gate, pos)
    y2, _ = mod.apply(params, x.at[:, t + 1:].add(3.0), score, gate, pos)
    assert not np.allclose(y1[:, :t + 1], y2[:, :t + 1], atol=1e-6)


def test_b_rows_are_independent():
    mod, params, x, score, gate, pos = setup(B=3)
    y1, _ = mod.apply(params, x, score, gate, pos)
    y2, _ = mod.apply(params, x.at[1].add(1.0), score.at[1].multiply(-1.0), gate, pos)
    np.testing.assert_array_equal(y1[0], y2[0])
    np.testing.assert_array_equal(y1[2], y2[2])
    assert not np.allclose(y1[1], y2[1])


def test_c_full_capacity_unit_gate_equals_dense_layer():
    T = 16
    mod, params, x, score, _, pos = setup(T=T, k=T)
    y, _ = mod.apply(params, x, score, jnp.ones_like(score), pos)
    dense = DecoderLayer(CFG).apply({"params": params["params"]["block"]}, x, None,
                                    {"pos_BT": pos, "seg_BT": None, "index": None})[0]
    np.testing.assert_array_equal(y, dense)


def test_d_unselected_tokens_pass_bit_exactly():
    mod, params, x, score, gate, pos = setup()
    y, info = mod.apply(params, x, score, gate, pos)
    m = np.asarray(info.mask_BT)
    assert m.sum(axis=1).tolist() == [4, 4]
    np.testing.assert_array_equal(np.asarray(y)[~m], np.asarray(x)[~m])
    assert not np.any(np.all(np.asarray(y)[m] == np.asarray(x)[m], axis=-1))


def test_e_compiled_cost_scales_with_k():
    T = 64
    flops = {}
    for k in (T // 8, T // 2):
        mod, params, x, score, gate, pos = setup(B=1, T=T, k=k)
        f = jax.jit(lambda p, *a, mod=mod: mod.apply(p, *a)[0])
        cost = f.lower(params, x, score, gate, pos).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[k] = cost["flops"]
    # matmuls scale with k, attention with k²: 4x more tokens must cost well over 3x.
    assert flops[T // 2] > 3.0 * flops[T // 8], flops
    # ... and routing half the tokens really saves compute against the dense layer on all T.
    dense = jax.jit(lambda p, x, pos: DecoderLayer(CFG).apply(
        {"params": p["params"]["block"]}, x, None, {"pos_BT": pos, "seg_BT": None,
                                                    "index": None})[0])
    cost = dense.lower(params, x, pos).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert flops[T // 2] < 0.7 * cost["flops"], (flops, cost["flops"])


def test_padding_never_competes_and_short_rows_add_nothing():
    B, T, k = 2, 16, 6
    mod, params, x, score, gate, pos = setup(B=B, T=T, k=k)
    valid = jnp.array([[True] * 12 + [False] * 4, [True] * 3 + [False] * 13])
    score = score.at[:, 12:].set(100.0)  # padding scores high: must still lose
    seg = valid.astype(jnp.int32)
    y, info = mod.apply(params, x, score, gate, pos, valid, seg)
    m = np.asarray(info.mask_BT)
    assert m[0].sum() == k and not m[0, 12:].any()
    assert m[1].sum() == 3 and m[1, :3].all()  # fewer valid tokens than k
    assert int(np.asarray(info.valid_Bk)[1].sum()) == 3
    np.testing.assert_array_equal(np.asarray(y)[~m], np.asarray(x)[~m])


def test_segments_isolate_documents():
    T = 16
    mod, params, x, score, gate, pos = setup(B=1, T=T, k=8)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    valid = seg != 0
    y1, info = mod.apply(params, x, score, gate, pos, valid, seg)
    y2, _ = mod.apply(params, x.at[:, :7].add(2.0), score, gate, pos, valid, seg)
    assert np.asarray(info.mask_BT)[0, 7:].any()
    np.testing.assert_array_equal(y1[:, 7:], y2[:, 7:])


def test_onehot_dispatch_matches_gather():
    mod, params, x, score, gate, pos = setup()
    y1, i1 = mod.apply(params, x, score, gate, pos)
    y2, i2 = Routed(CFG, 4, "onehot").apply(params, x, score, gate, pos)
    np.testing.assert_allclose(y1, y2, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(i1.mask_BT, i2.mask_BT)


def test_gradients_reach_gate_and_block_not_indices():
    mod, params, x, score, gate, pos = setup()
    loss = lambda p, g: jnp.sum(mod.apply(p, x, score, g, pos)[0] ** 2)
    gp, gg = jax.grad(loss, argnums=(0, 1))(params, gate)
    m = np.asarray(mod.apply(params, x, score, gate, pos)[1].mask_BT)
    assert np.all(np.asarray(gg)[m] != 0) and np.all(np.asarray(gg)[~m] == 0)
    assert all(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(gp))


def ma_reference(v, W, seg=None, padding="replicate"):
    B, T = v.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            s = t
            while seg is not None and s > 0 and seg[b, s - 1] == seg[b, t]:
                s -= 1
            if seg is None:
                s = 0
            hist = list(v[b, max(s, t - W + 1):t + 1])
            if padding == "replicate":
                hist = [v[b, s]] * (W - len(hist)) + hist
            out[b, t] = np.mean(hist)
    return out


@pytest.mark.parametrize("W", [1, 4, 100])
@pytest.mark.parametrize("padding", ["replicate", "available"])
@pytest.mark.parametrize("packed", [False, True])
def test_moving_average_matches_numpy(W, padding, packed):
    rng = np.random.default_rng(W)
    v = rng.random((2, 20)).astype(np.float32)
    seg = np.array([[1] * 6 + [2] * 10 + [0] * 4, [0] * 3 + [1] * 17]) if packed else None
    got = R.moving_average(jnp.asarray(v), W, None if seg is None else jnp.asarray(seg),
                           padding)
    np.testing.assert_allclose(got, ma_reference(v, W, seg, padding), rtol=1e-5, atol=1e-6)


def test_moving_average_spec_formula():
    v = jnp.arange(1.0, 9.0)[None]  # W = 3: MA_t = (S_t − S_{t−W}[t≥W] + max(0,W−1−t)·v_0)/W
    S = np.cumsum(np.arange(1.0, 9.0))
    ref = [(S[t] - (S[t - 3] if t >= 3 else 0) + max(0, 2 - t) * 1.0) / 3 for t in range(8)]
    np.testing.assert_allclose(R.moving_average(v, 3)[0], ref, rtol=1e-6)


def test_routing_options_are_validated():
    with pytest.raises(ConfigError, match="'capacity'"):
        tiny(arch="mod", routing={"capasity": 0.5})
    with pytest.raises(ConfigError, match="'ma_window'"):
        tiny(arch="dtf", routing={"ma_windw": 10})
    with pytest.raises(ConfigError, match="gate"):
        tiny(arch="mod", routing={"gate": "or"})
    with pytest.raises(ConfigError, match="capacity"):
        tiny(arch="dtf", routing={"capacity": 1.5})
    with pytest.raises(ConfigError, match="divisible by 2"):
        tiny(arch="dtf", num_layers=3)
    cfg = tiny(arch="dtf", routing={"capacity": 0.125, "gate": "ce"})
    assert cfg.routing_options == {"capacity": 0.125, "gate": "ce"}
    assert hash(cfg) == hash(tiny(arch="dtf", routing={"gate": "ce", "capacity": 0.125}))


def test_capacity_and_prior_width():
    assert capacity_k(0.125, 16) == 2 and capacity_k(0.01, 16) == 1 and capacity_k(1.0, 7) == 7
    assert capacity_k(0.125, 100, 8) == 16 and capacity_k(0.5, 20, 8) == 16  # int(12.5)=12 -> 16
    assert capacity_k(0.9, 20, 8) == 20 and capacity_k(0.5, 128, 128) == 128  # capped at T
    with pytest.raises(ConfigError, match="capacity_multiple"):
        tiny(arch="mod", routing={"capacity_multiple": 0})
    table = {(896, 0.0625): 56, (1536, 0.0625): 96, (2048, 0.125): 256, (896, 0.5): 448,
             (32, 0.0625): 2, (40, 0.0625): 4}
    assert {key: prior_width(*key) for key in table} == table


def test_routed_flops():
    base = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=256)
    dense = routed_flops_per_token(tiny(**base), 64)
    P = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    layer = 2 * P + 2 * 64 * 64
    assert dense["model"] == dense["dense_equivalent"] == 4 * layer + 2 * 64 * 256
    mod = routed_flops_per_token(tiny(arch="mod", routing={"capacity": 0.125}, **base), 64)
    routed = (8 / 64) * 2 * P + 2 * 64 * 64 / 64
    assert mod["dense_equivalent"] == dense["model"]
    assert mod["model"] == pytest.approx(2 * (layer + routed + 2 * 64 + 64 * 64 + 64)
                                         + 2 * 64 * 256)
    dtf = routed_flops_per_token(tiny(arch="dtf", **base), 64)
    assert mod["model"] < dtf["model"] < dense["model"]
