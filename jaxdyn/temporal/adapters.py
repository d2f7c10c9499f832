"""Temporal-causal adapters on a frozen decoder (DYNAMO design, docs/features/temporal.md).

`build(cfg, tcfg)` is the dense decoder trunk (`CausalLM`: same parameter names `embed`,
`layers/...`, `final_norm`, `unembed`, so a backbone checkpoint loads in directly) with the
`TemporalAdapter` extension attached, which adds `temporal/...`:
Time2Vec and the graph encoder (`jaxdyn.temporal.encoders`) and one bottleneck adapter
per layer, ΔH = W_o·GELU(W_t φ + W_g f_g + b [+ W_h RMSNorm(Block(H))]) + b_o, stacked
[L_a, …], with W_o = b_o = 0 at init, so step 0 is the base model bit for bit.

Dimension legend: B batch, T length, D width, L layers, L_a adapted layers, r bottleneck.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.block import constrain
from jaxdyn.model.config import ConfigError, ModelConfig
from jaxdyn.model.decoder import CausalLM
from jaxdyn.model.decoder import abstract_params as abstract_trunk
from jaxdyn.model.decoder import build as build_trunk
from jaxdyn.model.layers import param_init
from jaxdyn.temporal.encoders import (  # noqa: F401  (re-exported API)
    GELU_LIP,
    OPEN_END,
    GraphEncoder,
    TemporalConfig,
    Time2Vec,
    dummy_graph,
    edge_activation,
    years_to_tau,
)

# ----------------------------------------------------------------------------- adapters


class Adapters(nn.Module):
    """The per-layer adapter weights, stacked [L_a, …]; W_o and b_o start at zero."""

    cfg: ModelConfig
    tcfg: TemporalConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        c, D = self.tcfg, self.cfg.hidden_size
        La = int((c.layer_slots(self.cfg.num_layers) >= 0).sum())
        lecun = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        zeros = nn.initializers.zeros
        t_init = zeros if c.time_init == 0 else nn.initializers.variance_scaling(
            c.time_init ** 2, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
            batch_axis=(0,))
        shapes = {"W_t": ((La, c.d_t, c.rank), t_init, ("layers", None, None)),
                  "W_g": ((La, c.d_g, c.rank), lecun, ("layers", None, None)),
                  "b": ((La, c.rank), zeros, ("layers", None)),
                  "W_o": ((La, c.rank, D), zeros, ("layers", None, "embed")),
                  "b_o": ((La, D), zeros, ("layers", "embed"))}
        if c.token_conditioned:
            shapes["W_h"] = ((La, D, c.rank), lecun, ("layers", "embed", None))
            shapes["h_norm"] = ((La, D), nn.initializers.ones, ("layers", "norm"))
        return {k: self.param(k, param_init(ax, ini), shp) for k, (shp, ini, ax) in
                shapes.items()}


def adapter_delta(p: dict, cond: dict, y_BTD: jax.Array, tcfg: TemporalConfig,
                  eps: float = 1e-6) -> jax.Array:
    """ΔH for one layer in fp32: [B, 1, D] (steering vector) or [B, T, D] (token-conditioned)."""
    pre_Br = p["b"][None, :]
    if cond.get("phi") is not None:
        pre_Br = pre_Br + cond["phi"] @ p["W_t"]
    if cond.get("fg") is not None:
        pre_Br = pre_Br + cond["fg"] @ p["W_g"]
    pre = pre_Br[:, None, :]
    if tcfg.token_conditioned:
        y32 = y_BTD.astype(jnp.float32)
        yn = y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, -1, keepdims=True) + eps)
        pre = pre + (yn * p["h_norm"][None, None, :]) @ p["W_h"]
    return jax.nn.gelu(pre, approximate=False) @ p["W_o"] + p["b_o"][None, None, :]


@dataclasses.dataclass(frozen=True)
class TemporalAdapter:
    """The trunk's adapter-unit extension (`jaxdyn.model.decoder`): φ(τ) and f_g are computed
    once from `conditioning={"time": τ_B, "graph": GraphsTuple}` and every adapted layer adds
    its ΔH after its block. Without time and graph the adapters are skipped: exactly the base
    model."""

    tcfg: TemporalConfig

    def prepare(self, cfg: ModelConfig, embed_VD: jax.Array, conditioning: dict,
                initializing: bool):
        if cfg.arch != "dense":
            raise ConfigError(f"temporal adapters adapt dense backbones; got arch={cfg.arch!r}")
        parts = TemporalParts(cfg, self.tcfg, name="temporal")
        time, graph = conditioning.get("time"), conditioning.get("graph")
        if time is None and graph is None:
            if initializing:
                parts(None, None, embed_VD)  # creates the temporal parameters
            return None, None
        phi, fg, adapters = parts(time, graph, embed_VD)
        slots = self.tcfg.layer_slots(cfg.num_layers)
        gate_L = jnp.asarray(slots >= 0, jnp.float32)
        per_layer = jax.tree.map(lambda a: a[np.maximum(slots, 0)], adapters)
        return {"phi": phi, "fg": fg}, (per_layer, gate_L)

    def after_unit(self, y_BTD: jax.Array, xs, cond: dict) -> jax.Array:
        p, gate = xs
        delta = adapter_delta(p, cond, y_BTD, self.tcfg) * gate
        return constrain((y_BTD + delta.astype(y_BTD.dtype)).astype(y_BTD.dtype))


class TemporalParts(nn.Module):
    """Holds `temporal/{time2vec, graph, adapters}`; returns (φ or None, f_g or None, adapters)."""

    cfg: ModelConfig
    tcfg: TemporalConfig

    @nn.compact
    def __call__(self, time, graph, embed_VD):
        t2v = Time2Vec(self.tcfg, name="time2vec")
        enc = GraphEncoder(self.tcfg, name="graph")
        adapters = Adapters(self.cfg, self.tcfg, name="adapters")()
        if self.is_initializing():  # create every parameter, whatever is switched off
            t2v(jnp.zeros((1,), jnp.float32))
            enc(dummy_graph(), embed_VD)
        phi = None if time is None else t2v(time)
        fg = None if graph is None else enc(graph, embed_VD)
        return phi, fg, adapters


def condition(params: dict, cfg: ModelConfig, tcfg: TemporalConfig, time=None, graph=None):
    """(φ(τ) [B, d_t] or None, f_g [B, d_g] or None) of the temporal pathway alone, from a
    full parameter tree (the embedding table feeds the graph's node names)."""
    parts = TemporalParts(cfg, tcfg)
    phi, fg, _ = parts.apply({"params": params["temporal"]}, time, graph,
                             params["embed"]["embedding"])
    return phi, fg


# ----------------------------------------------------------------------------- params


def build(cfg: ModelConfig, tcfg: TemporalConfig, routing_mode: str = "topk") -> CausalLM:
    """The trunk with the temporal adapters attached."""
    return build_trunk(cfg, routing_mode, adapter=TemporalAdapter(tcfg))


def init_params(cfg: ModelConfig, tcfg: TemporalConfig, rng: jax.Array,
                seq_len: int = 8) -> dict:
    """Random backbone + temporal parameters (plain arrays)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.unbox(jax.jit(build(cfg, tcfg).init)(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig, tcfg: TemporalConfig, seq_len: int = 8):
    """Boxed parameter shapes via `jax.eval_shape` (nothing is allocated)."""
    return abstract_trunk(cfg, seq_len, adapter=TemporalAdapter(tcfg))


def with_backbone(params: dict, backbone: dict) -> dict:
    """Replace every non-temporal entry by the (e.g. pretrained, dense) backbone's."""
    missing = set(params) - set(backbone) - {"temporal"}
    if missing:
        raise ValueError(f"backbone lacks {sorted(missing)}; is it a dense CausalLM tree?")
    return {**backbone, "temporal": params["temporal"]}


def is_trainable(path: tuple) -> bool:
    """Only `temporal/...` trains; the backbone is frozen."""
    return bool(path) and getattr(path[0], "key", None) == "temporal"


def count_temporal_params(cfg: ModelConfig, tcfg: TemporalConfig) -> dict[str, int]:
    """Parameter counts by part from the formulas in docs/features/temporal.md; `total`
    sums them."""
    c, D = tcfg, cfg.hidden_size
    La = int((tcfg.layer_slots(cfg.num_layers) >= 0).sum())
    per_layer = c.rank * (c.d_t + c.d_g + D) + c.rank + D
    if c.token_conditioned:
        per_layer += c.rank * D + D
    parts = {
        "adapters": La * per_layer,
        "time2vec": 2 * c.d_t,
        "node_input": D * c.d_n + c.d_n + (c.n_types + c.n_roles) * c.d_n + 2 * c.d_n,
        "id_table": c.id_table * c.d_n,
        "gcn": c.gcn_layers * ((2 * c.n_rel + 1) * c.d_n ** 2 + c.d_n + 2 * c.d_n),
        "readout": 2 * c.d_n * c.d_g + c.d_g + (c.d_n if c.readout == "attn" else 0),
    }
    parts["total"] = sum(parts.values())
    return parts
