"""The one decoder trunk: embeddings, a stack of scan units, final norm and the unembedding,
with two extension points.

`CausalLM(cfg)` is the plain decoder of every family and architecture (dense, MoD, DTF; the
units come from `jaxdyn.model.units`). Features attach to the same trunk instead of copying it:

- **extra heads** (`heads=`): a block that reads the output of one scan unit (the *tap*,
  e.g. the stem of a multi-token model) and returns hidden states of its own heads, in
  `ModelOutput.heads_hidden`. Protocol: `tap_unit(cfg) -> int`,
  `apply(cfg, tapped_BTD, cache, ctx) -> (hidden_hBTD, cache)` (creates its parameters under
  its own name, e.g. `heads/…`) and `init_cache(cfg, batch, max_len, dtype)`.
- **adapter units** (`adapter=`): conditioning computed once before the stack from
  `apply(..., conditioning=…)` and the embedding table, passed to every unit through `ctx`,
  and an update applied after each unit's body. Protocol:
  `prepare(cfg, embed_VD, conditioning, initializing) -> (cond or None, per-unit xs [U, …])`
  (creates its parameters, e.g. `temporal/…`) and `after_unit(x_BTD, xs, cond) -> x_BTD`.

Parameter names do not depend on the extensions: `embed/…`, `layers/…` (or `layers_{i}/…`
unrolled), `final_norm/…`, `unembed/…`, plus each extension's own subtree. LoRA factors, when
given as the `lora` collection, act inside the projections (`jaxdyn.model.lora`).

Dimension legend: B batch, T length, D width, V vocab, S cache slots, L layers, U units,
h extra heads.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdyn import sharding
from jaxdyn.model.block import constrain
from jaxdyn.model.config import ModelConfig
from jaxdyn.model.layers import dtype_of, make_norm, param_init
from jaxdyn.model.units import STACKED, num_units, remat_policy, unit_spec, with_hooks


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] fp32, None when compute_logits=False
    hidden: jax.Array  # [B, T, D] after the final norm
    unembed: jax.Array  # [D, V] the output projection (embedding.T when tied)
    cache: Any  # updated cache or None
    aux: Any  # per-unit metrics/losses stacked [U, ...]
    heads_hidden: jax.Array | None = None  # [h, B, T, D] of the extra heads (if attached)


class CausalLM(nn.Module):
    """Decoder-only language model. `apply({"params": p}, tokens_BT)` -> ModelOutput."""

    cfg: ModelConfig
    routing_mode: str = "topk"  # routed units only: "topk" (training) | "causal" (generation)
    heads: Any = None  # extra-heads extension (see module doc)
    adapter: Any = None  # adapter-unit extension (see module doc)

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, cache: dict | None = None,
                 compute_logits: bool = True, conditioning: dict | None = None,
                 attn_mask_BTT: jax.Array | None = None) -> ModelOutput:
        """`attn_mask_BTT`: an optional boolean mask among this call's tokens, AND'ed with the
        causal/segment rule in every attention layer (`jaxdyn.model.attention`; dense only)."""
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
        if attn_mask_BTT is not None and cfg.arch != "dense":
            raise ValueError(f"attn_mask_BTT needs arch='dense' (routed units reorder tokens), "
                             f"got {cfg.arch!r}")
        ctx = {"pos_BT": positions_BT, "seg_BT": segment_ids_BT, "index": index,
               "attn_mask_BTT": attn_mask_BTT}

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt,
                         param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=param_init(("vocab", "embed")), name="embed")
        # Look up in a replicated copy of the table: a gather from the vocab/fsdp-sharded table
        # makes the SPMD partitioner fall back to "involuntary full rematerialization" on the
        # way to batch-sharded activations; one explicit all-gather (the backward pass
        # reduce-scatters) is the cheap version of the same thing.
        table_VD = nn.with_logical_constraint(embed.embedding, (None, None))
        x_BTD = constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(dt))

        adapter_xs = None
        if self.adapter is not None:
            ctx["cond"], adapter_xs = self.adapter.prepare(
                cfg, embed.embedding, conditioning or {}, self.is_initializing())
        tap = -1 if self.heads is None else self.heads.tap_unit(cfg)
        layer_cache = None if cache is None else cache["layers"]
        x_BTD, tapped_BTD, layer_cache, aux = self._stack(x_BTD, layer_cache, ctx, adapter_xs,
                                                          tap)

        h_BTD = make_norm(cfg, "final_norm")(x_BTD)
        w_DV = embed.embedding.T if cfg.tie_embeddings else Unembed(cfg, name="unembed")()
        logits = None
        if compute_logits:
            logits = jnp.einsum("btd,dv->btv", h_BTD.astype(dt), w_DV.astype(dt),
                                preferred_element_type=jnp.float32)
        heads_hidden, head_cache = None, None
        if self.heads is not None:
            heads_hidden, head_cache = self.heads.apply(
                cfg, tapped_BTD, None if cache is None else cache["heads"], ctx)
        new_cache = None
        if cache is not None:
            new_cache = {"index": cache["index"] + T, "layers": layer_cache}
            if self.heads is not None:
                new_cache["heads"] = head_cache
        return ModelOutput(logits=logits, hidden=h_BTD, unembed=w_DV, cache=new_cache, aux=aux,
                           heads_hidden=heads_hidden)

    def _stack(self, x_BTD, layer_cache, ctx, adapter_xs, tap):
        """The U scan units (scanned or unrolled); returns (x, tapped x, cache, aux)."""
        cfg = self.cfg
        spec = unit_spec(cfg)
        n_units = num_units(cfg)
        hooked = self.adapter is not None or self.heads is not None
        unit_cls = with_hooks(spec.module) if hooked else spec.module
        if cfg.remat_policy != "none":
            unit_cls = nn.remat(unit_cls, policy=remat_policy(cfg.remat_policy),
                                prevent_cse=not cfg.scan_layers)
        kw = {"adapter": self.adapter, "tap": tap} if hooked else {}
        if cfg.scan_layers:
            stack = nn.scan(unit_cls, variable_axes=STACKED,
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, 0) if hooked else (0, nn.broadcast),
                            length=n_units, metadata_params={nn.PARTITION_NAME: "layers"})
            unit = spec.make(stack, cfg, self.routing_mode, name="layers", **kw)
            if not hooked:
                x_BTD, (layer_cache, aux) = unit(x_BTD, layer_cache, ctx)
                return x_BTD, None, layer_cache, aux
            xs = (jnp.arange(n_units), adapter_xs)
            (x_BTD, tapped_BTD), (layer_cache, aux) = unit((x_BTD, x_BTD), layer_cache, ctx, xs)
            return x_BTD, tapped_BTD, layer_cache, aux
        outs, tapped_BTD = [], x_BTD
        for i in range(n_units):
            take = lambda a, i=i: a[i]
            c_i = None if layer_cache is None else jax.tree.map(take, layer_cache)
            unit = spec.make(unit_cls, cfg, self.routing_mode, name=f"layers_{i}", **kw)
            if hooked:
                xs_i = (jnp.asarray(i), jax.tree.map(take, adapter_xs))
                (x_BTD, tapped_BTD), out_i = unit((x_BTD, tapped_BTD), c_i, ctx, xs_i)
            else:
                x_BTD, out_i = unit(x_BTD, c_i, ctx)
            outs.append(out_i)
        layer_cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x_BTD, tapped_BTD, layer_cache, aux


class Unembed(nn.Module):
    """Holds the untied output projection `unembed/kernel` [D, V]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.cfg
        return self.param("kernel", param_init(("embed", "vocab")),
                          (cfg.hidden_size, cfg.vocab_size), dtype_of(cfg.param_dtype))


def build(cfg: ModelConfig, routing_mode: str = "topk", **extensions) -> CausalLM:
    """The trunk for `cfg`; `extensions`: `heads=`, `adapter=` (see the module doc)."""
    unit_spec(cfg)  # validates the layer count for the architecture
    return CausalLM(cfg, routing_mode=routing_mode, **extensions)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, **extensions) -> dict:
    """Random parameters (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = build(cfg, **extensions).init(rng, tokens)
    return nn.unbox(variables["params"])


def abstract_params(cfg: ModelConfig, seq_len: int = 8, **extensions):
    """Boxed parameter shapes (with logical axis names) without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, t: build(cfg, **extensions).init(r, t)["params"],
                          jax.random.key(0), tokens)


def param_shardings(cfg: ModelConfig, mesh, **extensions) -> Any:
    """Shardings of the parameters from their logical axes (nothing is allocated)."""
    return sharding.logical_to_sharding(abstract_params(cfg, **extensions), mesh)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, heads=None) -> dict:
    """An empty KV cache with static shapes; `index` counts the slots written so far.

    Slots may outnumber positions (left padding takes slots, not positions), so the context
    limit is checked on positions by the caller (see `jaxdyn.decode`). With an extra-heads
    extension the cache also holds `heads`.
    """
    spec = unit_spec(cfg)
    dtype = dtype or dtype_of(cfg.dtype)
    n_units = num_units(cfg)
    one = spec.init_cache(cfg, batch, max_len, dtype)
    layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_units, *a.shape)).copy(), one)
    cache = {"index": jnp.zeros((), jnp.int32), "layers": layers}
    if heads is not None:
        cache["heads"] = heads.init_cache(cfg, batch, max_len, dtype)
    return cache


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
