"""Grouped-query self-attention with RoPE, padding/segment masks and an explicit KV cache.

Dimension legend: B batch, T query length, S key length (cache slots), D width, N query heads,
K key/value heads, Hd head dim.

Masks are built from three facts per key slot: its slot index (causality), its segment id
(packed documents never attend to each other; 0 marks padding) and, for cached decoding, the
`written` flag (a slot that holds no key is never attended). Routed layers reuse the same
function with gathered tokens; their caches simply write fewer slots.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import Proj, apply_rope, dtype_of, rope_cos_sin

LayerCache = dict[str, jax.Array]  # {"k": [B,S,K,Hd], "v": [B,S,K,Hd], "written": [B,S] bool}


def pick_implementation(cfg: ModelConfig, dtype: jnp.dtype, dense_mask: bool) -> str:
    """cuDNN where it applies (GPU, half precision, no dense mask), XLA everywhere else."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not dense_mask and dtype in (jnp.bfloat16, jnp.float16) and cfg.head_dim <= 256:
        return "cudnn"
    return "xla"


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """Softmax attention; `mask_BTS=None` means plain causal (T == S), the fast path."""
    impl = pick_implementation(cfg, q_BTNH.dtype, mask_BTS is not None)
    scale = cfg.head_dim ** -0.5
    if mask_BTS is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True,
                                            implementation=impl)
    out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                       scale=scale, implementation=impl)
    # Rows with no visible key (padding queries) come out finite but meaningless: zero them.
    any_key_BT = jnp.any(mask_BTS, axis=-1)
    return jnp.where(any_key_BT[:, :, None, None], out, jnp.zeros_like(out))


def self_mask(seg_BT: jax.Array | None, T: int) -> jax.Array | None:
    """Causal mask over the tokens themselves; segments and padding (seg 0) restrict it."""
    if seg_BT is None:
        return None
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BTT = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)
    return causal_TT[None] & same_BTT


def cache_mask(written_BS: jax.Array, index: jax.Array, T: int) -> jax.Array:
    """Query t (at slot index+t) sees written slots s <= index+t."""
    S = written_BS.shape[1]
    q_slot_T = index + jnp.arange(T)
    causal_TS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
    return causal_TS[None] & written_BS[:, None, :]


class Attention(nn.Module):
    """q/k/v/o projections, RoPE at the tokens' original positions, GQA attention."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, ctx: dict[str, Any],
                 cache: LayerCache | None = None,
                 write_BT: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """`ctx` holds pos_BT, seg_BT (or None) and, with a cache, the write `index`.

        `write_BT` says which tokens store their K/V in the cache (all valid ones by default;
        routed layers pass their decisions).
        """
        cfg = self.cfg
        N, K, Hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        def proj(name, heads, axis_name, bias):
            return Proj((D,), (heads, Hd), ("embed", axis_name, "head_dim"), bias, dt, pdt,
                        name=name)

        q_BTNH = proj("q", N, "heads", cfg.qkv_bias)(x_BTD)
        k_BTKH = proj("k", K, "kv_heads", cfg.qkv_bias)(x_BTD)
        v_BTKH = proj("v", K, "kv_heads", cfg.qkv_bias)(x_BTD)
        if cfg.rotary_dim:
            cos, sin = rope_cos_sin(cfg, ctx["pos_BT"])
            q_BTNH, k_BTKH = apply_rope(q_BTNH, cos, sin), apply_rope(k_BTKH, cos, sin)
        q_BTNH = checkpoint_name(q_BTNH, "qkv")
        k_BTKH = checkpoint_name(k_BTKH, "qkv")
        v_BTKH = checkpoint_name(v_BTKH, "qkv")

        T = x_BTD.shape[1]
        seg_BT = ctx.get("seg_BT")
        if cache is None:
            mask = self_mask(seg_BT, T)
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, mask, cfg)
            new_cache = None
        else:
            index = ctx["index"]
            if write_BT is None:
                write_BT = jnp.ones(x_BTD.shape[:2], bool) if seg_BT is None else seg_BT != 0
            upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
                buf, new.astype(buf.dtype), index, axis=1)
            written = upd(cache["written"], write_BT)
            keep = write_BT[:, :, None, None]
            new_cache = {
                # Slots a token does not write keep their old content (zeros) for clarity.
                "k": upd(cache["k"], jnp.where(keep, k_BTKH, jnp.zeros_like(k_BTKH))),
                "v": upd(cache["v"], jnp.where(keep, v_BTKH, jnp.zeros_like(v_BTKH))),
                "written": written,
            }
            mask = cache_mask(written, index, T)
            out_BTNH = attend(q_BTNH, new_cache["k"].astype(dt), new_cache["v"].astype(dt),
                              mask, cfg)
        out_BTNH = checkpoint_name(out_BTNH, "attn_out")
        o = Proj((N, Hd), (D,), ("heads", "head_dim", "embed"), cfg.o_bias, dt, pdt, name="o")
        return o(out_BTNH), new_cache
