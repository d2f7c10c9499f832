"""Grouped-query self-attention with RoPE, segment masks and an explicit KV cache.

Dimension legend: B batch, T query length, S key length (cache slots), D width, N query heads,
K key/value heads, Hd head dim.

One mask rule for every caller (docs/attention.md): per query a position and a segment id, per
key a position and a segment id; query q sees key k iff `k_pos <= q_pos`, `q_seg == k_seg` and
`k_seg != 0`. Positions here are the order of the tokens in the row (slot index), not the RoPE
positions: self-attention uses 0..T-1 on both sides (dense layers, and routed layers on their
sorted gathered tokens), cached decoding uses `index + t` for queries and the slot index for
keys, with the key "segment" being the slot's `written` flag. Query rows that see no key
(padding) come out as zeros.

One extension point goes beyond that rule: an explicit boolean mask among the tokens of one
call, `ctx["attn_mask_BTT"]` [B, T, T] (query t may see token t' of the same call only where it
is True), AND'ed with the rule above. In cached decoding it applies to the call's block of
slots index..index+T-1; earlier slots are unaffected (`call_mask`). Tree verification of the
multi-token heads passes its ancestor mask this way. An explicit mask takes the dense-mask
path ([B, T, S] booleans), meant for short blocks.

`attend` is the one entry point; `pick_implementation` chooses the kernel per backend.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.flash import MaskSpec, blockwise_attention, visible
from jaxdyn.model.kernels import pallas_gpu_attention, splash_attention
from jaxdyn.model.layers import Proj, apply_rope, dtype_of, rope_cos_sin

LayerCache = dict[str, jax.Array]  # {"k": [B,S,K,Hd], "v": [B,S,K,Hd], "written": [B,S] bool}
SELF_ONLY = ("splash", "pallas_gpu")  # kernels that only do causal self-attention (T == S)


def pick_implementation(cfg: ModelConfig, dtype: jnp.dtype, segments: bool,
                        self_attention: bool) -> str:
    """The kernel for this call.

    `auto`: TPU → `splash` (self-attention) else `blockwise`; GPU → `cudnn` for mask-free half
    precision, `pallas_gpu` for other self-attention, else `blockwise`; CPU and anything else →
    `blockwise`. An explicit `splash`/`pallas_gpu` falls back to `blockwise` for cached decoding
    (queries and keys differ). `xla` is the dense-mask reference.
    """
    impl = cfg.attention_impl
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "tpu":
            impl = "splash" if self_attention else "blockwise"
        elif backend == "gpu":
            half = dtype in (jnp.bfloat16, jnp.float16)
            if self_attention and not segments and half and cfg.head_dim <= 256:
                impl = "cudnn"
            else:
                impl = "pallas_gpu" if self_attention else "blockwise"
        else:
            impl = "blockwise"
    if impl in SELF_ONLY and not self_attention:
        impl = "blockwise"
    return impl


def self_spec(seg_BT: jax.Array | None, B: int, T: int) -> MaskSpec:
    """Self-attention over the row's own tokens: positions 0..T-1, the given segments (or one
    segment when None)."""
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg_BT = jnp.ones((B, T), jnp.int32) if seg_BT is None else seg_BT.astype(jnp.int32)
    return MaskSpec(pos_BT, seg_BT, pos_BT, seg_BT)


def cache_spec(written_BS: jax.Array, index: jax.Array, T: int) -> MaskSpec:
    """Query t (at slot index+t) sees written slots s <= index+t."""
    B, S = written_BS.shape
    q_pos_BT = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return MaskSpec(q_pos_BT, jnp.ones((B, T), jnp.int32), k_pos_BS,
                    written_BS.astype(jnp.int32))


def call_mask(mask_BTT: jax.Array, index: jax.Array | None, S: int) -> jax.Array:
    """[B, T, S] keys allowed by a mask among the T tokens of one call: with a cache (`index`
    given) the call's tokens sit at slots index..index+T-1 and every earlier slot passes; without
    one (T == S) the mask itself."""
    if index is None:
        return mask_BTT
    B, T, _ = mask_BTT.shape
    block_BTS = jax.lax.dynamic_update_slice(jnp.zeros((B, T, S), bool), mask_BTT, (0, 0, index))
    return block_BTS | (jnp.arange(S) < index)[None, None, :]


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, spec: MaskSpec,
           cfg: ModelConfig, segments: bool = True, self_attention: bool = False,
           allow_BTS: jax.Array | None = None) -> jax.Array:
    """Masked GQA softmax attention [B, T, N, Hd] by the kernel `pick_implementation` chooses.

    `self_attention`: T == S and `spec` is `self_spec(...)` (index-causal plus segments), which
    the fused kernels need; `segments=False` says the segment ids are all one (no padding, one
    document), which lets XLA and cuDNN use their `is_causal` path instead of a dense mask.
    `allow_BTS`: an explicit extra mask AND'ed with the rule (see the module doc); it takes the
    dense-mask path.
    """
    impl = pick_implementation(cfg, q_BTNH.dtype, segments, self_attention)
    scale = cfg.head_dim ** -0.5
    if allow_BTS is not None:
        impl = "xla"
    if impl == "blockwise":
        return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, spec, scale, cfg.attention_block)
    if impl in ("xla", "cudnn") and self_attention and not segments and allow_BTS is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True,
                                            implementation=impl)
    if impl == "splash":
        out = splash_attention(q_BTNH, k_BSKH, v_BSKH, spec.q_seg_BT, scale, cfg.attention_block)
        any_key_BT = spec.q_seg_BT != 0
    elif impl == "pallas_gpu":
        out = pallas_gpu_attention(q_BTNH, k_BSKH, v_BSKH, spec.q_seg_BT, scale)
        any_key_BT = spec.q_seg_BT != 0
    else:  # the dense-mask reference: a [B, T, S] mask, T·S memory per row
        mask_BTS = visible(spec) if allow_BTS is None else visible(spec) & allow_BTS
        out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                           scale=scale, implementation=impl)
        any_key_BT = jnp.any(mask_BTS, axis=-1)
    # Rows with no visible key (padding queries) come out finite but meaningless: zero them.
    return jnp.where(any_key_BT[:, :, None, None], out, jnp.zeros_like(out))


class Attention(nn.Module):
    """q/k/v/o projections, RoPE at the tokens' original positions, GQA attention."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, ctx: dict[str, Any],
                 cache: LayerCache | None = None,
                 write_BT: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """`ctx` holds pos_BT, seg_BT (or None), optionally attn_mask_BTT (module doc) and,
        with a cache, the write `index`.

        `write_BT` says which tokens store their K/V in the cache (all valid ones by default;
        routed layers pass their decisions). `ctx["kv_write"]`, when set, replaces the cache
        write and mask: `(cache, k, v) -> (new cache, MaskSpec)` (routed caches,
        `jaxdyn.model.routing.causal`).
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

        B, T = x_BTD.shape[:2]
        seg_BT = ctx.get("seg_BT")
        mask_BTT = ctx.get("attn_mask_BTT")
        if cache is None:
            allow = None if mask_BTT is None else call_mask(mask_BTT, None, T)
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, self_spec(seg_BT, B, T), cfg,
                              segments=seg_BT is not None, self_attention=True, allow_BTS=allow)
            new_cache = None
        elif ctx.get("kv_write") is not None:  # a routed layer's own cache layout
            new_cache, spec = ctx["kv_write"](cache, k_BTKH, v_BTKH)
            out_BTNH = attend(q_BTNH, new_cache["k"].astype(dt), new_cache["v"].astype(dt), spec,
                              cfg)
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
            allow = None if mask_BTT is None else call_mask(mask_BTT, index, written.shape[1])
            out_BTNH = attend(q_BTNH, new_cache["k"].astype(dt), new_cache["v"].astype(dt),
                              cache_spec(written, index, T), cfg, allow_BTS=allow)
        out_BTNH = checkpoint_name(out_BTNH, "attn_out")
        o = Proj((N, Hd), (D,), ("heads", "head_dim", "embed"), cfg.o_bias, dt, pdt, name="o")
        return o(out_BTNH), new_cache
