"""Dynamic Transformer pairs: gate maths, gradients, losses, causal routing and KV caches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.config.errors import ConfigError
from jaxdyn.decode.generate import generate
from jaxdyn.model import build, dense_to_routed, init_cache, init_params, tiny
from jaxdyn.model.routing.options import trained_window

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=128, num_layers=2)


def dtf_cfg(**routing):
    return tiny("qwen2", arch="dtf", routing=routing, **SMALL)


def params_for(cfg):
    """Parameters depend on the layout, not on these routing options: share one init."""
    return _params(cfg.replace(routing={}))


@functools.cache
def _params(cfg):
    return jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


@functools.cache
def fwd(cfg, mode="topk"):
    return jax.jit(lambda p, t, pos=None, seg=None: build(cfg, mode).apply(
        {"params": p}, t, pos, seg))


def tokens(B=2, T=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, SMALL["vocab_size"])


def test_param_names_shapes_and_init_metrics():
    cfg = dtf_cfg()
    p = params_for(cfg)["layers"]
    assert set(p) == {"dec", "dyn", "prior_norm", "prior", "beta_ce", "beta_cu", "o_ce", "m_cu",
                      "predictor"}
    assert p["prior"]["w1"].shape == (1, 32, 2) and p["prior"]["w2"].shape == (1, 2, 32)
    np.testing.assert_allclose(p["beta_ce"], [-0.3])
    np.testing.assert_allclose(p["m_cu"], [1.1])
    m = fwd(cfg)(params_for(cfg), tokens()).aux["metrics"]
    np.testing.assert_allclose(m["beta_ce_eff"], np.log1p(np.exp(-0.3)), rtol=1e-6)
    np.testing.assert_allclose(m["beta_cu_eff"], np.log1p(np.exp(-0.6)), rtol=1e-6)
    np.testing.assert_allclose(m["selected_frac"], 0.5)
    # At init the prior predicts ~0 and CU ~0: S_CE ≈ σ(0.554·log 1.025), S_CU ≈ ½, G ≈ 0.75.
    np.testing.assert_allclose(m["G_mean"], 0.7517, atol=2e-3)
    assert np.all(m["G_min"] <= m["G_mean"]) and np.all(m["G_mean"] <= m["G_max"])


def test_lm_gradients_reach_gate_scalars_prior_and_both_blocks():
    cfg = dtf_cfg()
    p = params_for(cfg)
    t = tokens()
    lm = lambda p: jnp.mean(build(cfg).apply({"params": p}, t).logits ** 2)  # LM path only
    g = jax.jit(jax.grad(lm))(p)["layers"]
    for name in ("beta_ce", "beta_cu", "o_ce", "m_cu"):
        assert np.all(np.abs(np.asarray(g[name])) > 0), name
    for w in ("w1", "w2", "w3"):
        assert float(jnp.abs(g["prior"][w]).sum()) > 0, w
    assert float(jnp.abs(g["prior_norm"]["scale"]).sum()) > 0
    assert float(jnp.abs(g["dec"]["mlp"]["up"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["dyn"]["mlp"]["up"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["predictor"]["fc1"]).sum()) == 0  # causal router input detached


def test_prior_loss_forms_and_detach_flag():
    t = tokens()

    p = params_for(dtf_cfg())

    def prior_loss(**routing):
        cfg = dtf_cfg(**routing)
        return lambda p: jnp.sum(build(cfg).apply({"params": p}, t).aux["losses"]["prior"])

    l_res, g_res = jax.jit(jax.value_and_grad(prior_loss()))(p)
    l_det, g_det = jax.jit(jax.value_and_grad(prior_loss(prior_detach_input=True)))(p)
    l_th = jax.jit(prior_loss(prior_loss_form="thesis"))(p)
    np.testing.assert_allclose(l_res, l_th, rtol=1e-4)  # same value, different gradient paths
    np.testing.assert_allclose(l_res, l_det, rtol=1e-6)
    emb = lambda g: float(jnp.abs(g["embed"]["embedding"]).sum())
    assert emb(g_res) > 0 and emb(g_det) == 0  # the prior's input H is not detached by default
    assert float(jnp.abs(g_det["layers"]["prior"]["w1"]).sum()) > 0


def test_ce_gate_is_s_ce():
    cfg = dtf_cfg(gate="ce")
    m = fwd(cfg)(params_for(cfg), tokens()).aux["metrics"]
    np.testing.assert_allclose(m["G_mean"], m["S_CE_mean"], rtol=1e-6)
    np.testing.assert_allclose(m["G_max"], m["S_CE_max"], rtol=1e-6)


def test_rows_are_independent():
    cfg = dtf_cfg()
    p = params_for(cfg)
    t = tokens(B=3)
    a, b = fwd(cfg)(p, t).logits, fwd(cfg)(p, t.at[1].set(3)).logits
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])


def test_causal_mode_future_does_not_change_past():
    cfg = dtf_cfg(ma_window=4)
    p = params_for(cfg)
    t = tokens()
    a = fwd(cfg, "causal")(p, t).logits
    b = fwd(cfg, "causal")(p, t.at[:, 9:].set(5)).logits
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)


def test_left_padding_matches_unpadded_in_causal_mode():
    cfg = dtf_cfg(ma_window=4)
    p = params_for(cfg)
    t = tokens(T=10)
    pad = 3
    tp = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), t], axis=1)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.zeros(pad, jnp.int32), jnp.arange(10)]),
                           (2, 10 + pad))
    seg = (jnp.arange(10 + pad) >= pad).astype(jnp.int32)[None].repeat(2, 0)
    a = fwd(cfg, "causal")(p, t).logits
    b = fwd(cfg, "causal")(p, tp, pos, seg).logits
    np.testing.assert_allclose(b[:, pad:], a, atol=1e-5, rtol=0)


def test_kv_cached_generation_equals_causal_forward():
    cfg = dtf_cfg(ma_window=4).replace(scan_layers=False)  # W < T: the window slides
    p = params_for(cfg)
    B, T, P = 2, 12, 5
    t = tokens(T=T)
    apply = jax.jit(lambda p, t, c=None: build(cfg, "causal").apply(
        {"params": p}, t, cache=c, mutable=["intermediates"]))
    (full, state) = apply(p, t)
    out, _ = apply(p, t[:, :P], init_cache(cfg, B, T + 3))
    steps, cache = [out.logits], out.cache
    for i in range(P, T):
        out, _ = apply(p, t[:, i:i + 1], cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full.logits, atol=1e-5, rtol=0)
    written = np.asarray(cache["layers"]["dyn"]["written"])
    d = np.asarray(state["intermediates"]["layers_0"]["decision"][0])
    np.testing.assert_array_equal(written[0, :, :T], d)
    assert 0 < d.sum() < d.size
    assert not written[:, :, T:].any()
    assert np.asarray(cache["layers"]["dec"]["written"])[:, :, :T].all()


def test_batched_left_padded_generation_is_greedy_under_causal_forward():
    """`jaxdyn.decode.generate` (left padding, prefill + cached decode) picks, at every step, the
    argmax of the unpadded causal full forward over the same sequence."""
    cfg = dtf_cfg(ma_window=3)
    p = params_for(cfg)
    prompts = [[5, 9, 1, 4, 7, 2, 8], [3, 6]]
    res = generate(cfg, p, prompts, max_new_tokens=5, bucket=8)
    for prompt, new in zip(prompts, res.tokens, strict=True):
        seq = jnp.array([prompt + new])
        pred = np.asarray(jnp.argmax(fwd(cfg, "causal")(p, seq).logits[0], -1))
        assert pred[len(prompt) - 1:-1].tolist() == new


INITS = {"beta_ce_init": 0.7, "beta_cu_init": -2.0, "o_ce_init": 0.5, "m_cu_init": 0.8}


def test_gate_scalar_inits_are_routing_options():
    cfg = dtf_cfg(**INITS)
    p = _params(cfg)["layers"]  # not params_for: these options do change the init
    for name, v in INITS.items():
        np.testing.assert_allclose(p[name.removesuffix("_init")], [v], rtol=1e-7)
    m = fwd(cfg)(_params(cfg), tokens()).aux["metrics"]
    np.testing.assert_allclose(m["beta_ce_eff"], np.log1p(np.exp(0.7)), rtol=1e-6)
    np.testing.assert_allclose(m["o_ce"], [0.5])
    for bad in ({"o_ce_init": 0.0}, {"o_ce_init": -1.0}, {"m_cu_init": "1.1"},
                {"beta_ce_init": float("nan")}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            dtf_cfg(**bad)


def test_transfer_inits_new_gate_scalars_from_the_options():
    dense = tiny("qwen2", **SMALL)
    dense_p = jax.jit(lambda r: init_params(dense, r))(jax.random.key(0))
    p, report = dense_to_routed(dense, dense_p, dtf_cfg(**INITS), jax.random.key(1))
    assert "layers_0/o_ce" in report.new  # the report names unrolled layers
    for name, v in INITS.items():
        np.testing.assert_allclose(p["layers"][name.removesuffix("_init")], [v], rtol=1e-7)


def test_kv_cached_generation_at_the_trained_window():
    """A run trained at T = 8 fixes W = min(100, 8) = 8 in its model config: decoding 14 tokens
    in cached chunks equals the causal full forward although the window slides, and the window
    matters (the MA and the logits differ from W = 100)."""
    routing = trained_window("dtf", {}, 8)
    assert routing == {"ma_window": 8}
    cfg = dtf_cfg(**routing).replace(scan_layers=False)
    p = params_for(cfg)
    B, T, P = 2, 14, 3
    t = tokens(T=T)
    apply = jax.jit(lambda cfg, p, t, c=None: build(cfg, "causal").apply(
        {"params": p}, t, cache=c, mutable=["intermediates"]), static_argnums=0)
    full, state = apply(cfg, p, t)
    out, _ = apply(cfg, p, t[:, :P], init_cache(cfg, B, T))
    steps, cache = [out.logits], out.cache
    for i in range(P, T, 2):  # chunks of 2 tokens
        out, _ = apply(cfg, p, t[:, i:i + 2], cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full.logits, atol=1e-5, rtol=0)
    wide, wide_state = apply(cfg.replace(routing={}), p, t)  # W = 100
    ma = state["intermediates"]["layers_0"]["gate_terms"][0]["ma"]
    ma_wide = wide_state["intermediates"]["layers_0"]["gate_terms"][0]["ma"]
    assert not np.allclose(ma, ma_wide, rtol=1e-4)
    assert not np.array_equal(np.asarray(wide.logits), np.asarray(full.logits))
