"""Model invariants that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import build, init_cache, init_params, tiny

FAMILIES = ["qwen2", "llama", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [True, False])
def test_cache_matches_full_forward(family, scan):
    cfg = tiny(family, scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    apply = jax.jit(build(cfg).apply)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    full = apply({"params": params}, tokens).logits
    out = apply({"params": params}, tokens[:, :7], cache=init_cache(cfg, 2, 16))
    steps = [out.logits]
    cache = out.cache
    for t in range(7, 12):
        out = apply({"params": params}, tokens[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=0)
    assert int(cache["index"]) == 12


def test_scan_and_unrolled_agree():
    cfg = tiny("qwen2")
    p_scan = init_params(cfg, jax.random.key(0))
    unrolled = {k: v for k, v in p_scan.items() if k != "layers"}
    for i in range(cfg.num_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], p_scan["layers"])
    tokens = jnp.arange(16).reshape(2, 8)
    a = build(cfg).apply({"params": p_scan}, tokens).logits
    b = build(cfg.replace(scan_layers=False)).apply({"params": unrolled}, tokens).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_segments_block_cross_document_attention():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    model = build(cfg)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    a = jnp.arange(12)[None] % cfg.vocab_size
    b = a.at[0, 1].set(99)  # change document 1 only
    la = model.apply({"params": params}, a, pos, seg).logits
    lb = model.apply({"params": params}, b, pos, seg).logits
    np.testing.assert_array_equal(la[0, 5:], lb[0, 5:])
    assert not np.allclose(la[0, 1:5], lb[0, 1:5])
    # Document 2 alone gives the same logits as inside the pack.
    alone = model.apply({"params": params}, a[:, 5:], pos[:, 5:]).logits
    np.testing.assert_allclose(la[0, 5:], alone[0], atol=1e-5)


def test_bf16_compute_close_to_fp32():
    cfg = tiny("qwen2")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    l32 = build(cfg).apply({"params": params}, tokens).logits
    l16 = build(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens).logits
    assert l16.dtype == jnp.float32
    # bf16 has 8 mantissa bits; logits here are O(1), so 5e-2 absolute is ~10 ulps.
    assert float(jnp.max(jnp.abs(l16 - l32))) < 5e-2


def test_sequence_too_long_is_a_clear_error():
    cfg = tiny("qwen2", max_position_embeddings=8)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        build(cfg).apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


def test_unknown_config_field_names_closest():
    from jaxdyn.model import ConfigError, ModelConfig
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict({"hiden_size": 3})


def test_remat_policies_give_same_gradients():
    cfg = tiny("qwen2")
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(16).reshape(2, 8)

    def loss(p, c):
        return jnp.mean(build(c).apply({"params": p}, tokens).logits ** 2)

    g0 = jax.grad(loss)(params, cfg)
    for policy in ["full", "dots", "minimal"]:
        g = jax.grad(loss)(params, cfg.replace(remat_policy=policy))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g)
