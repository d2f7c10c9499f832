"""The dense pre-norm decoder layer, shared by every family and reused inside routed units.

Dimension legend: B batch, T length, D width, S cache slots, K kv heads, Hd head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdyn.model.attention import Attention, LayerCache
from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import MLP, make_norm

ACT_AXES = ("batch", "length", "act_embed")


def constrain(x_BTD: jax.Array) -> jax.Array:
    """Pin activations to the batch sharding at block boundaries (no-op without a mesh)."""
    return nn.with_logical_constraint(x_BTD, ACT_AXES)


class DecoderLayer(nn.Module):
    """One decoder layer: sequential residual (qwen2/llama, optional for neox) or parallel (neox).

    Surface shared by every scan unit: `(x, cache, ctx) -> (x, (cache, aux))`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cache: LayerCache | None, ctx: dict[str, Any],
                 write_BT: jax.Array | None = None):
        cfg = self.cfg
        x_BTD = constrain(x_BTD)
        attn_out, cache = Attention(cfg, name="attn")(
            make_norm(cfg, "attn_norm")(x_BTD), ctx, cache, write_BT)
        if cfg.parallel_residual:
            y_BTD = x_BTD + attn_out + MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BTD))
        else:
            h_BTD = x_BTD + attn_out
            y_BTD = h_BTD + MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(h_BTD))
        return constrain(y_BTD.astype(x_BTD.dtype)), (cache, empty_aux())


def empty_aux() -> dict:
    """Every unit returns `{"losses": {name: weighted scalar}, "metrics": {name: scalar}}`.

    Losses are already multiplied by their config weight; the trainer adds the mean over units
    of each. Metrics are logged per unit (`router/layer_{i}/name`) and averaged.
    """
    return {"losses": {}, "metrics": {}}


def init_layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> LayerCache:
    """Empty per-layer KV buffers with static shapes [B, S_max, K, Hd]."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "written": jnp.zeros((batch, max_len), bool)}
