"""The one LoRA: a low-rank path inside the projections, x·W + s·(x·A)·B, equal to merging
s·A·B into W, for every family, both layer layouts, routed units and the extra heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.config.errors import ConfigError
from jaxdyn.model import build, init_params, tiny
from jaxdyn.model.lora import from_flat, init_lora, merge_lora, scaled
from jaxdyn.multitoken.heads import ExtraHeads, all_logits

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _noisy(lora, seed=2):
    """Factors with B != 0, so the low-rank path changes the output."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("cfg", [tiny("qwen2"), tiny("gpt_neox"), tiny("llama", scan_layers=False),
                                 tiny("qwen2", num_layers=4, arch="mod")],
                         ids=["qwen2", "gpt_neox", "llama-unrolled", "mod"])
def test_low_rank_path_equals_merged_kernels(cfg):
    params = init_params(cfg, jax.random.key(0))
    lora = init_lora(params, TARGETS, 4, jax.random.key(1))
    tokens = jnp.arange(24).reshape(2, 12) % cfg.vocab_size
    model = build(cfg)
    base = model.apply({"params": params}, tokens).logits
    at_init = model.apply({"params": params, "lora": scaled(lora, 8.0, 4)}, tokens).logits
    np.testing.assert_array_equal(at_init, base)  # B = 0: training starts at W
    lora = _noisy(lora)
    path = model.apply({"params": params, "lora": scaled(lora, 8.0, 4)}, tokens).logits
    merged = model.apply({"params": merge_lora(params, lora, 8.0, 4)}, tokens).logits
    np.testing.assert_allclose(path, merged, atol=2e-5)
    assert float(jnp.abs(path - base).max()) > 1e-2


def test_low_rank_path_reaches_the_extra_heads():
    cfg = tiny("gpt_neox", num_layers=3)
    model = build(cfg, heads=ExtraHeads(3))
    params = init_params(cfg, jax.random.key(0), heads=ExtraHeads(3))
    lora = _noisy(init_lora(params, ("q", "up"), 2, jax.random.key(1)))
    assert lora["heads"]["layer"]["attn"]["q"]["a"].shape[0] == 2  # stacked like the heads
    tokens = jnp.arange(10)[None]
    path = all_logits(model.apply({"params": params, "lora": scaled(lora, 2.0, 2)}, tokens))
    merged = all_logits(model.apply({"params": merge_lora(params, lora, 2.0, 2)}, tokens))
    np.testing.assert_allclose(path, merged, atol=2e-5)


def test_old_flat_factors_convert_and_bad_targets_are_named():
    params = init_params(tiny(), jax.random.key(0))
    lora = _noisy(init_lora(params, ("q", "down"), 2, jax.random.key(1)))
    flat = {"layers.attn.q.kernel": lora["layers"]["attn"]["q"],
            "layers.mlp.down.kernel": lora["layers"]["mlp"]["down"]}
    assert jax.tree.structure(from_flat(flat)) == jax.tree.structure(lora)
    a, b = merge_lora(params, flat, 4.0, 2), merge_lora(params, lora, 4.0, 2)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ConfigError, match="not projections"):
        init_lora(params, ("qq",), 2, jax.random.key(0))
