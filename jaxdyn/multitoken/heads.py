"""Multi-token prediction heads (DynaMo; Tuli et al., NAACL 2024, arXiv 2405.00888).

The dense decoder is split into a *stem* (embedding + layers 0..L-2) and *head 1* (layer L-1 +
final norm + unembedding). Heads 2..n are one new decoder layer (same block type as the family)
plus their own final norm each, applied to the stem output; every head shares the unembedding.
All heads run in one forward pass: head i at position t models x_{t+i} given x_{<=t}.

The heads are the decoder trunk's extra-heads extension (`ExtraHeads`, see
`jaxdyn.model.decoder`): the trunk keeps the output of unit L-2 and hands it to them.
Parameter layout (a dense `CausalLM` checkpoint maps in unchanged):
`embed/embedding`, `layers/...` [L, ...] (or `layers_{i}/...` unrolled), `final_norm/...`,
`unembed/kernel` (absent when tied), and new `heads/layer/...`, `heads/norm/...` stacked
[n-1, ...] ([n-1, depth, ...] for the `head_depth` ablation).

Gradient from heads 2..n into the stem is scaled by `stem_grad_scale` (LR_MB / LR_B = 0.1 in the
paper) with `grad_scale`, an identity whose backward multiplies the cotangent.

Dimension legend: n heads, B batch, T length, D width, V vocab, S cache slots, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.block import DecoderLayer, init_layer_cache
from jaxdyn.model.config import ConfigError, ModelConfig
from jaxdyn.model.decoder import CausalLM, ModelOutput, build, init_cache
from jaxdyn.model.layers import dtype_of, make_norm
from jaxdyn.model.units import STACKED, num_units


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_scale(x: Any, s: float) -> Any:
    """Identity in the forward pass; the backward pass returns `s * g` (DynaMo's LR_MB)."""
    return x


def _gs_fwd(x, s):
    return x, None


def _gs_bwd(s, _, g):
    return (jax.tree.map(lambda t: (t * s).astype(t.dtype), g),)


grad_scale.defvjp(_gs_fwd, _gs_bwd)


class ExtraHead(nn.Module):
    """Head i >= 2: `depth` new decoder layers on the stem output, then its own final norm."""

    cfg: ModelConfig
    depth: int = 1

    @nn.compact
    def __call__(self, h_BTD: jax.Array, cache: Any, ctx: dict[str, Any]):
        if self.depth == 1:
            h_BTD, (cache, _) = DecoderLayer(self.cfg, name="layer")(h_BTD, cache, ctx)
        else:
            stack = nn.scan(DecoderLayer, variable_axes=STACKED,
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            h_BTD, (cache, _) = stack(self.cfg, name="layer")(h_BTD, cache, ctx)
        return make_norm(self.cfg, "norm")(h_BTD), cache


@dataclasses.dataclass(frozen=True)
class ExtraHeads:
    """The trunk's extra-heads extension (`jaxdyn.model.decoder`): heads 2..n read the output
    of unit U-2 (the stem) through `grad_scale(·, stem_grad_scale)`."""

    n_heads: int = 3
    head_depth: int = 1
    stem_grad_scale: float = 0.1  # LR_MB / LR_B

    def tap_unit(self, cfg: ModelConfig) -> int:
        check_mtp_config(cfg, self.n_heads, self.head_depth)
        return num_units(cfg) - 2

    def apply(self, cfg: ModelConfig, stem_BTD: jax.Array, cache: Any, ctx: dict[str, Any]):
        h_in = grad_scale(stem_BTD, self.stem_grad_scale)
        return extra_heads(cfg, self.n_heads, self.head_depth, "heads")(h_in, cache, ctx)

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype) -> Any:
        one = init_layer_cache(cfg, batch, max_len, dtype)
        lead = (self.n_heads - 1,) if self.head_depth == 1 else (self.n_heads - 1,
                                                                  self.head_depth)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (*lead, *a.shape)).copy(), one)


def multitoken_model(cfg: ModelConfig, n_heads: int = 3, head_depth: int = 1,
                     stem_grad_scale: float = 0.1, routing_mode: str = "topk") -> CausalLM:
    """The trunk with heads 2..n attached (the plain trunk for n = 1)."""
    check_mtp_config(cfg, n_heads, head_depth)
    heads = ExtraHeads(n_heads, head_depth, stem_grad_scale) if n_heads > 1 else None
    return build(cfg, routing_mode, heads=heads)


def all_hidden(out: ModelOutput) -> jax.Array:
    """[n, B, T, D]: head 1's states (after the final norm), then heads 2..n's."""
    if out.heads_hidden is None:
        return out.hidden[None]
    return jnp.concatenate([out.hidden[None], out.heads_hidden.astype(out.hidden.dtype)], 0)


def all_logits(out: ModelOutput) -> jax.Array:
    """[n, B, T, V] fp32 (decoding only; training uses chunked cross-entropy)."""
    h = all_hidden(out)
    return jnp.einsum("nbtd,dv->nbtv", h, out.unembed.astype(h.dtype),
                      preferred_element_type=jnp.float32)


def extra_heads(cfg: ModelConfig, n_heads: int, head_depth: int, name: str | None = None):
    """Heads 2..n as one module vmapped over a leading [n-1] parameter/cache axis."""
    stacked = nn.vmap(ExtraHead, variable_axes=STACKED,
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(None, 0, None), out_axes=0, axis_size=n_heads - 1,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return stacked(cfg, head_depth, name=name)


@functools.lru_cache(maxsize=8)
def _heads_init(cfg: ModelConfig, n_heads: int, head_depth: int):
    def init(rng):
        x = jnp.zeros((1, 8, cfg.hidden_size), dtype_of(cfg.dtype))
        ctx = {"pos_BT": jnp.zeros((1, 8), jnp.int32), "seg_BT": None, "index": None}
        return nn.unbox(extra_heads(cfg, n_heads, head_depth).init(rng, x, None, ctx)["params"])
    return jax.jit(init)


def init_extra_heads(cfg: ModelConfig, n_heads: int, rng: jax.Array, head_depth: int = 1
                     ) -> dict:
    """Random parameters of heads 2..n alone (no second copy of the dense model)."""
    return _heads_init(cfg, n_heads, head_depth)(rng)


def check_mtp_config(cfg: ModelConfig, n_heads: int, head_depth: int = 1) -> None:
    if cfg.arch != "dense":
        raise ConfigError(f"multi-token heads need arch='dense', got {cfg.arch!r}")
    if cfg.num_layers < 2:
        raise ConfigError("multi-token heads need num_layers >= 2 (stem + head-1 layer)")
    if n_heads < 1 or head_depth < 1:
        raise ConfigError(f"n_heads={n_heads} and head_depth={head_depth} must be >= 1")


def init_mtp_params(cfg: ModelConfig, n_heads: int, rng: jax.Array, head_depth: int = 1,
                    seq_len: int = 8) -> dict:
    init = jax.jit(multitoken_model(cfg, n_heads, head_depth).init)
    return nn.unbox(init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])


def init_mtp_cache(cfg: ModelConfig, n_heads: int, batch: int, max_len: int,
                   head_depth: int = 1, dtype=None) -> dict:
    """Explicit KV caches: stem/head-1 layers [L, ...], extra heads [n-1, (depth,) ...]."""
    heads = ExtraHeads(n_heads, head_depth) if n_heads > 1 else None
    return init_cache(cfg, batch, max_len, dtype, heads=heads)


def heads_of(params: dict) -> tuple[int, int]:
    """(n_heads, head_depth) of an MTP parameter tree (1, 1 for a dense one)."""
    if "heads" not in params:
        return 1, 1
    scale = params["heads"]["layer"]["attn_norm"]["scale"]  # [n-1, D] or [n-1, depth, D]
    return scale.shape[0] + 1, (1 if scale.ndim == 2 else scale.shape[1])


def dense_params_of(params: dict) -> dict:
    """The head-1 path as a plain `CausalLM` parameter tree (drops `heads`)."""
    return {k: v for k, v in params.items() if k != "heads"}


@dataclasses.dataclass
class HeadsReport:
    copied: list[str]  # dense tensors placed unchanged
    new: list[str]  # randomly initialised (or copied from the last layer) head tensors
    dense_params: int
    extra_params: int

    @property
    def overhead(self) -> float:
        return self.extra_params / self.dense_params


def _paths(tree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in flat}


def from_dense(dense_cfg: ModelConfig, dense_params: dict, n_heads: int, rng: jax.Array,
               head_depth: int = 1, init_from_last_layer: bool = False
               ) -> tuple[dict, HeadsReport]:
    """MTP parameters from a dense checkpoint: every dense tensor is consumed unchanged; heads
    2..n are random (family init, norms 1/0) or, with `init_from_last_layer` (the paper's "C"
    ablation), copies of layer L-1."""
    check_mtp_config(dense_cfg, n_heads, head_depth)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda r, t: multitoken_model(dense_cfg, n_heads, head_depth).init(
        r, t), jax.random.key(0), tokens)
    want, have = _paths(dense_params_of(nn.unbox(shapes["params"]))), _paths(dense_params)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"dense checkpoint does not match the MTP stem: missing {missing[:4]}, "
                         f"unused {extra[:4]} (scan_layers/tie_embeddings must agree)")
    for k, v in want.items():
        if tuple(have[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: dense shape {have[k].shape} != expected {v.shape}")
    params = {k: v for k, v in dense_params.items()}
    if n_heads > 1:
        heads = init_extra_heads(dense_cfg, n_heads, rng, head_depth)
        if init_from_last_layer:
            if dense_cfg.scan_layers:
                last = jax.tree.map(lambda a: a[-1], dense_params["layers"])
            else:
                last = dense_params[f"layers_{dense_cfg.num_layers - 1}"]
            lead = (n_heads - 1,) if head_depth == 1 else (n_heads - 1, head_depth)
            heads = dict(heads, layer=jax.tree.map(
                lambda a: jnp.broadcast_to(a, (*lead, *a.shape)).copy(), last))
        params["heads"] = heads
    new = sorted(_paths({"heads": params.get("heads", {})}))
    n_dense = sum(int(np.prod(v.shape)) for v in have.values())
    n_extra = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params.get("heads", {})))
    return params, HeadsReport(sorted(want), new, n_dense, n_extra)


def head_overhead(cfg: ModelConfig, n_heads: int, head_depth: int = 1) -> tuple[int, int]:
    """(extra, dense) parameter counts from shapes only; extra = (n-1)(block + norm)."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda r, t: multitoken_model(cfg, n_heads, head_depth).init(r, t),
                            jax.random.key(0), tokens)
    params = nn.unbox(shapes["params"])
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    extra = count(params.get("heads", {}))
    return extra, count(params) - extra
