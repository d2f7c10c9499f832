"""Building blocks shared by every family: norms, rotary embeddings, MLPs.

Dimension legend: B batch, T query length, D model width, F MLP width, Hd head dim, r rotary dims.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxdyn.model.config import ModelConfig

INIT_STD = 0.02


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param_init(axes: tuple[str, ...], init=None):
    """An initializer that carries logical axis names (used by jaxdyn.sharding)."""
    return nn.with_logical_partitioning(init or nn.initializers.normal(INIT_STD), axes)


class Norm(nn.Module):
    """RMSNorm (qwen2/llama) or LayerNorm with bias (gpt_neox); statistics in fp32.

    The RMSNorm order of operations matches Hugging Face: normalise in fp32, cast to the
    compute dtype, then scale.
    """

    kind: str  # "rms" | "layer"
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D = x_BTD.shape[-1]
        scale = self.param("scale", param_init(("norm",), nn.initializers.ones), (D,),
                           self.param_dtype)
        lead = (1,) * (x_BTD.ndim - 1)  # explicit broadcasting (rank promotion is an error)
        scale = scale.reshape(*lead, D)
        x32 = x_BTD.astype(jnp.float32)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return scale.astype(self.dtype) * y.astype(self.dtype)
        bias = self.param("bias", param_init(("norm",), nn.initializers.zeros), (D,),
                          self.param_dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.reshape(*lead, D).astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> Norm:
    return Norm(cfg.norm_type, cfg.norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype),
                name=name)


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [r/2] in fp32, with linear or Llama-3 scaling (docs/conversion.md)."""
    r = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, r, 2, dtype=np.int64).astype(np.float32) / r))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        f, lf, hf = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        c0 = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        smooth = (c0 / wavelen - lf) / (hf - lf)
        blended = (1 - smooth) * inv / f + smooth * inv
        inv = np.where(wavelen > c0 / lf, inv / f, np.where(wavelen < c0 / hf, inv, blended))
    return inv.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, pos_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, r] in fp32 for the given (original) positions."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    angle = pos_BT.astype(jnp.float32)[..., None] * inv[None, None, :]
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x_BTNH: jax.Array, cos_BTr: jax.Array, sin_BTr: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first r dims of each head; the rest pass through."""
    r = cos_BTr.shape[-1]
    x32 = x_BTNH.astype(jnp.float32)
    xr, xp = x32[..., :r], x32[..., r:]
    half = r // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    cos, sin = cos_BTr[:, :, None, :], sin_BTr[:, :, None, :]
    y = xr * cos + rot * sin
    return jnp.concatenate([y, xp], axis=-1).astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------- MLP

ACT_FNS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def flat_dot(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] · w [*in, *out] as one 2-D matmul [N, I] · [I, O], reshaped back.

    Same values as `einsum("...i,io->...o")`, but autodiff of an einsum with several batch
    dims ([B, T]) gives XLA:CPU a weight gradient contracting two dims, which it runs off its
    fast dot path behind transposed copies; the 2-D form's gradient is one plain xᵀ·dy. At the
    `small` shapes a SwiGLU MLP's forward+backward drops from 102 to 53 ms
    (docs/results/performance.md)."""
    lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
    x_NI = x.reshape(math.prod(lead), math.prod(x.shape[x.ndim - n_in:]))
    y_NO = x_NI @ w.reshape(x_NI.shape[1], math.prod(out))
    return y_NO.reshape(*lead, *out)


def dense(in_features: int, features: int, axes: tuple[str, str], cfg: ModelConfig, name: str,
          use_bias: bool = False) -> Proj:
    """A [in] -> [out] projection (`kernel`, optional `bias`), LoRA-capable like every Proj."""
    return Proj((in_features,), (features,), axes, use_bias, dtype_of(cfg.dtype),
                dtype_of(cfg.param_dtype), name=name)


class Proj(nn.Module):
    """A linear map between named multi-axis shapes, e.g. [D] -> [N, Hd] (one 2-D matmul).

    Unlike `nn.DenseGeneral`, the kernel is initialised at its full rank, so its logical axis
    names always match the value (DenseGeneral initialises a flattened kernel). With LoRA
    factors in the `lora` collection (`jaxdyn.model.lora`) the output adds (x·A)·B.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of kernel dims: in dims then out dims
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        w = self.param("kernel", param_init(self.axes), self.in_shape + self.out_shape,
                       self.param_dtype)
        y = flat_dot(x.astype(self.dtype), w.astype(self.dtype), n_in)
        if self.has_variable("lora", "a"):  # low-rank path; B already carries alpha / r
            a_ir = self.get_variable("lora", "a").astype(self.dtype)
            b_ro = self.get_variable("lora", "b").astype(self.dtype)
            x_i = x.astype(self.dtype).reshape(*x.shape[:x.ndim - n_in], -1)
            y = y + flat_dot(flat_dot(x_i, a_ir), b_ro).reshape(y.shape)
        if self.use_bias:
            b = self.param("bias", param_init(self.axes[n_in:], nn.initializers.zeros),
                           self.out_shape, self.param_dtype)
            y = y + b.reshape((1,) * (y.ndim - n_out) + self.out_shape).astype(self.dtype)
        return y


class MLP(nn.Module):
    """SwiGLU (`gate`, `up`, `down`) or a plain two-layer MLP (`up`, `down`) for gpt_neox."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        F, D = cfg.intermediate_size, cfg.hidden_size
        act = ACT_FNS[cfg.activation]
        x_BTD = checkpoint_name(x_BTD, "mlp_in")
        up_BTF = dense(D, F, ("embed", "mlp"), cfg, "up", cfg.mlp_bias)(x_BTD)
        if cfg.gated_mlp:
            gate_BTF = dense(D, F, ("embed", "mlp"), cfg, "gate", cfg.mlp_bias)(x_BTD)
            h_BTF = act(gate_BTF) * up_BTF
        else:
            h_BTF = act(up_BTF)
        out_BTD = dense(F, D, ("mlp", "embed"), cfg, "down", cfg.mlp_bias)(h_BTF)
        return checkpoint_name(out_BTD, "mlp_out")
