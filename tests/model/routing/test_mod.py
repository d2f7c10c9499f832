"""Mixture-of-Depths units: identities, isolation, gradients, causal routing and KV caches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import ConfigError, build, init_cache, init_params, tiny
from jaxdyn.model.routing.flops import routed_flops_per_token
from jaxdyn.model.routing.options import unit_slots
from jaxdyn.model.routing.transfer import unstack_layers

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=128, num_layers=4)


def mod_cfg(**routing):
    return tiny("qwen2", arch="mod", routing=routing, **SMALL)


LAYOUT = ("route_every", "route_offset")


def params_for(cfg):
    """Parameters depend on the layout, not on the other routing options: share one init."""
    return _params(cfg.replace(routing={k: v for k, v in cfg.routing if k in LAYOUT}))


@functools.cache
def _params(cfg):
    return jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


@functools.cache
def fwd(cfg, mode="topk"):
    return jax.jit(lambda p, t, pos=None, seg=None: build(cfg, mode).apply(
        {"params": p}, t, pos, seg))


def tokens(B=2, T=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, SMALL["vocab_size"])


@pytest.mark.parametrize("scan,every,offset", [(True, 2, 1), (False, 2, 1), (False, 1, 0),
                                               (False, 4, 2)])
def test_full_capacity_unit_gate_equals_dense_exactly(scan, every, offset):
    cfg = mod_cfg(capacity=1.0, gate="ones", route_every=every,
                  route_offset=offset).replace(scan_layers=scan)
    p = params_for(cfg)
    dense_cfg = tiny("qwen2", **SMALL).replace(scan_layers=False)
    u = unstack_layers(p)
    dense_p = {k: v for k, v in u.items() if not k.startswith("layers_")}
    slots = unit_slots(cfg)
    assert len(slots) == every and slots["routed"] == offset
    for j in range(4 // every):
        for name, pos in slots.items():
            dense_p[f"layers_{every * j + pos}"] = u[f"layers_{j}"][name]
    t = tokens()
    a = fwd(cfg)(p, t).logits
    b = fwd(dense_cfg)(dense_p, t).logits
    if scan:  # XLA fuses a 2-layer scan body differently from unrolled layers
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    else:
        np.testing.assert_array_equal(a, b)


def test_rows_are_independent_and_capacity_is_exact():
    cfg = mod_cfg(capacity=0.25)
    p = params_for(cfg)
    apply = fwd(cfg)
    t = tokens(B=3)
    o1, o2 = apply(p, t), apply(p, t.at[1, 3:].set(7))
    np.testing.assert_array_equal(o1.logits[0], o2.logits[0])
    np.testing.assert_array_equal(o1.logits[2], o2.logits[2])
    np.testing.assert_array_equal(o1.aux["metrics"]["selected_frac"], [0.25, 0.25])
    assert set(o1.aux["losses"]) == {"router_bce", "router_z", "causal_router"}


def test_capacity_multiple_rounds_k_up():
    cfg = mod_cfg(capacity=0.25, capacity_multiple=8)  # k = int(0.25·16) = 4 -> 8 of 16
    out = fwd(cfg)(params_for(cfg), tokens())
    np.testing.assert_array_equal(out.aux["metrics"]["selected_frac"], [0.5, 0.5])


def test_padding_excluded_from_capacity_and_metrics():
    cfg = mod_cfg(capacity=0.5)
    p = params_for(cfg)
    seg = jnp.array([[1] * 12 + [0] * 4, [1] * 16])
    out = fwd(cfg)(p, tokens(), None, seg)
    # k = 8 of 16 slots; row 0 has 12 valid tokens: 8 + 8 selected over 12 + 16 valid.
    np.testing.assert_allclose(out.aux["metrics"]["selected_frac"], 16 / 28, rtol=1e-6)


def test_gradients_reach_router_but_predictor_is_detached():
    cfg = mod_cfg()
    p = params_for(cfg)
    t = tokens()

    def lm_loss(p):
        return jnp.mean(build(cfg).apply({"params": p}, t).logits ** 2)

    def causal_loss(p):
        return jnp.sum(build(cfg).apply({"params": p}, t).aux["losses"]["causal_router"])

    g, gc = jax.jit(lambda p: (jax.grad(lm_loss)(p), jax.grad(causal_loss)(p)))(p)
    g = g["layers"]
    assert float(jnp.abs(g["router"]["w"]).min(axis=-1).min()) > 0  # via the σ(r) gate
    assert float(jnp.abs(g["routed"]["mlp"]["down"]["kernel"]).sum()) > 0
    assert float(jnp.abs(gc["layers"]["predictor"]["fc1"]).sum()) > 0
    trunk = [a for path, a in jax.tree_util.tree_leaves_with_path(gc)
             if "predictor" not in jax.tree_util.keystr(path)]
    assert all(float(jnp.abs(a).max()) == 0 for a in trunk)  # sg(x): trunk untouched


def test_topk_mode_refuses_a_cache():
    cfg = mod_cfg()
    p = params_for(cfg)
    with pytest.raises(ValueError, match="routing_mode='causal'"):
        build(cfg).apply({"params": p}, tokens(T=4), cache=init_cache(cfg, 2, 8))


def test_causal_mode_future_does_not_change_past():
    cfg = mod_cfg()
    p = params_for(cfg)
    apply = fwd(cfg, "causal")
    t = tokens()
    a, b = apply(p, t).logits, apply(p, t.at[:, 10:].set(5)).logits
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def _generate_vs_full(cfg, p, t, prefill):
    apply = jax.jit(build(cfg, routing_mode="causal").apply)
    B, T = t.shape
    full = apply({"params": p}, t).logits
    out = apply({"params": p}, t[:, :prefill], cache=init_cache(cfg, B, T + 4))
    steps, cache = [out.logits], out.cache
    for i in range(prefill, T):
        out = apply({"params": p}, t[:, i:i + 1], cache=cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=0)
    return cache


@pytest.mark.parametrize("scan,B", [(True, 2), (False, 2), (True, 1)])
def test_kv_cached_generation_equals_causal_forward(scan, B):
    """B = 1 decodes through `nn.cond` (the block is skipped when d = 0), B = 2 masks."""
    cfg = mod_cfg().replace(scan_layers=scan)
    p = params_for(cfg)
    t = tokens(B=B, T=12, seed=3)
    cache = _generate_vs_full(cfg, p, t, prefill=5)
    written = np.asarray(cache["layers"]["routed"]["written"])  # [U, B, S]
    assert np.asarray(cache["layers"]["dense"]["written"])[:, :, :12].all()
    decode_written = written[:, :, 5:12]
    assert decode_written.any() and not decode_written.all()  # both branches were taken
    if scan:
        return
    _, state = jax.jit(lambda p, t: build(cfg, routing_mode="causal").apply(
        {"params": p}, t, mutable=["intermediates"]))(p, t)
    for j in range(2):
        d = np.asarray(state["intermediates"][f"layers_{j}"]["decision"][0])
        np.testing.assert_array_equal(written[j, :, :12], d)
        assert not written[j, :, 12:].any()
        assert 0 < d.sum() < d.size  # both decisions occur, so the check has teeth


def test_routed_layer_placement_is_configurable():
    """route_every n / route_offset o: one routed layer per n layers; FLOPs and caches follow."""
    cfg = mod_cfg(route_every=4, route_offset=2, capacity=0.25)
    assert set(unit_slots(cfg)) == {"dense", "dense_1", "dense_2", "routed"}
    p = params_for(cfg)
    assert jax.tree.leaves(p["layers"])[0].shape[0] == 1  # one unit of four layers
    out = fwd(cfg)(p, tokens())
    np.testing.assert_array_equal(out.aux["metrics"]["selected_frac"], [0.25])
    every2 = routed_flops_per_token(mod_cfg(capacity=0.25), 16)["model"]
    every4 = routed_flops_per_token(cfg, 16)["model"]
    assert every2 < every4 < routed_flops_per_token(mod_cfg(capacity=1.0), 16)["model"]
    t = tokens(T=10, seed=4)
    cache = _generate_vs_full(cfg, p, t, prefill=4)
    assert np.asarray(cache["layers"]["dense_2"]["written"])[:, :, :10].all()
    for bad, match in (({"route_every": 3}, "divisible by 3"),
                       ({"route_offset": 2}, "0 <= route_offset < route_every"),
                       ({"route_every": 0}, "route_every >= 1")):
        with pytest.raises(ConfigError, match=match):
            mod_cfg(**bad)
    with pytest.raises(ConfigError, match="a DTF unit is a"):
        tiny("qwen2", arch="dtf", routing={"route_every": 4}, **SMALL)


def test_raw_gate_and_onehot_dispatch_run():
    t = tokens()
    for routing in ({"gate": "raw"}, {"dispatch": "onehot"}):
        cfg = mod_cfg(**routing)
        p = params_for(cfg)
        out = fwd(cfg)(p, t)
        assert np.isfinite(out.logits).all()
    g = fwd(mod_cfg())(p, t).logits
    np.testing.assert_allclose(out.logits, g, atol=1e-5, rtol=0)  # onehot == gather
