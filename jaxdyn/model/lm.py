"""CausalLM: embeddings, a stack of scan units, final norm and the (tied or untied) unembedding.

A *scan unit* is the homogeneous body that `nn.scan` repeats: one dense layer for `arch="dense"`,
a (dense, routed) superblock for MoD, a (decision, dynamic) pair for DTF. Units share one
surface, `(x, cache, ctx) -> (x, (cache, aux))`, and register themselves in `UNITS`, so the
decoder, the cache and generation never special-case an architecture.

Dimension legend: B batch, T length, D width, V vocab, S cache slots, L layers, U units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdyn.model.config import ConfigError, ModelConfig
from jaxdyn.model.layers import dtype_of, make_norm, param_init
from jaxdyn.model.routing_options import layers_per_unit
from jaxdyn.model.transformer import DecoderLayer, constrain, init_layer_cache


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """How an architecture's scan unit is built and what its cache looks like."""

    make: Callable[..., nn.Module]  # (cls, cfg, routing_mode, name) -> unit instance
    module: type[nn.Module]
    init_cache: Callable[[ModelConfig, int, int, Any], Any]  # one unit's cache


UNITS: dict[str, UnitSpec] = {
    "dense": UnitSpec(make=lambda cls, cfg, mode, name: cls(cfg, name=name), module=DecoderLayer,
                      init_cache=init_layer_cache),
}


def register_unit(arch: str, spec: UnitSpec) -> None:
    UNITS[arch] = spec


def unit_spec(cfg: ModelConfig) -> UnitSpec:
    spec = UNITS[cfg.arch]
    n = layers_per_unit(cfg)
    if cfg.num_layers % n:
        raise ConfigError(f"arch={cfg.arch!r} needs num_layers divisible by {n}, "
                          f"got {cfg.num_layers}")
    return spec


def num_units(cfg: ModelConfig) -> int:
    """U: how many scan units the decoder stacks (L / layers per unit)."""
    unit_spec(cfg)  # validates the layer count
    return cfg.num_layers // layers_per_unit(cfg)


def remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.dots_with_no_batch_dims_saveable,
        "minimal": cp.save_only_these_names("qkv", "attn_out"),
        "offload": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("qkv", "attn_out"),
            offload_src="device", offload_dst="pinned_host"),
    }[name]


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] fp32, None when compute_logits=False
    hidden: jax.Array  # [B, T, D] after the final norm
    unembed: jax.Array  # [D, V] the output projection (embedding.T when tied)
    cache: Any  # updated cache or None
    aux: Any  # per-unit metrics/losses stacked [U, ...]


class CausalLM(nn.Module):
    """Decoder-only language model. `apply({"params": p}, tokens_BT)` -> ModelOutput."""

    cfg: ModelConfig
    routing_mode: str = "topk"  # routed units only: "topk" (training) | "causal" (generation)

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, cache: dict | None = None,
                 compute_logits: bool = True) -> ModelOutput:
        cfg = self.cfg
        B, T = tokens_BT.shape
        dt = dtype_of(cfg.dtype)
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}; shorten the input or raise the limit")
        index = None if cache is None else cache["index"]
        if positions_BT is None:
            start = 0 if index is None else index
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        ctx = {"pos_BT": positions_BT, "seg_BT": segment_ids_BT, "index": index}

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt,
                         param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=param_init(("vocab", "embed")), name="embed")
        # Look up in a replicated copy of the table: a gather from the vocab/fsdp-sharded table
        # makes the SPMD partitioner fall back to "involuntary full rematerialization" on the
        # way to batch-sharded activations; one explicit all-gather (the backward pass
        # reduce-scatters) is the cheap version of the same thing.
        table_VD = nn.with_logical_constraint(embed.embedding, (None, None))
        x_BTD = constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(dt))

        spec = unit_spec(cfg)
        unit_cls = spec.module
        if cfg.remat_policy != "none":
            unit_cls = nn.remat(unit_cls, policy=remat_policy(cfg.remat_policy),
                                prevent_cse=not cfg.scan_layers)
        n_units = num_units(cfg)
        layer_cache = None if cache is None else cache["layers"]
        if cfg.scan_layers:
            stack = nn.scan(unit_cls, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast), length=n_units,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, (layer_cache, aux) = spec.make(stack, cfg, self.routing_mode, "layers")(
                x_BTD, layer_cache, ctx)
        else:
            outs = []
            for i in range(n_units):
                c_i = None if layer_cache is None else jax.tree.map(
                    lambda a, i=i: a[i], layer_cache)
                x_BTD, out_i = spec.make(unit_cls, cfg, self.routing_mode, f"layers_{i}")(
                    x_BTD, c_i, ctx)
                outs.append(out_i)
            layer_cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)

        h_BTD = make_norm(cfg, "final_norm")(x_BTD)
        if cfg.tie_embeddings:
            w_DV = embed.embedding.T
        else:
            w_DV = Unembed(cfg, name="unembed")()
        logits = None
        if compute_logits:
            logits = jnp.einsum("btd,dv->btv", h_BTD.astype(dt), w_DV.astype(dt),
                                preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = {"index": cache["index"] + T, "layers": layer_cache}
        return ModelOutput(logits=logits, hidden=h_BTD, unembed=w_DV, cache=new_cache, aux=aux)


class Unembed(nn.Module):
    """Holds the untied output projection `unembed/kernel` [D, V]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.cfg
        return self.param("kernel", param_init(("embed", "vocab")),
                          (cfg.hidden_size, cfg.vocab_size), dtype_of(cfg.param_dtype))


def build(cfg: ModelConfig, routing_mode: str = "topk") -> CausalLM:
    unit_spec(cfg)  # validates the layer count for the architecture
    return CausalLM(cfg, routing_mode=routing_mode)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = build(cfg).init(rng, tokens)
    return nn.unbox(variables["params"])


def abstract_params(cfg: ModelConfig, seq_len: int = 8):
    """Boxed parameter shapes (with logical axis names) without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, t: build(cfg).init(r, t)["params"],
                          jax.random.key(0), tokens)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache with static shapes; `index` counts the slots written so far.

    Slots may outnumber positions (left padding takes slots, not positions), so the context
    limit is checked on positions by the caller (see `jaxdyn.generate`).
    """
    spec = unit_spec(cfg)
    dtype = dtype or dtype_of(cfg.dtype)
    n_units = num_units(cfg)
    one = spec.init_cache(cfg, batch, max_len, dtype)
    layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_units, *a.shape)).copy(), one)
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
