"""Temporal-causal adapters on a frozen decoder (DYNAMO design, temporal spec §1, §6, §9).

`TemporalLM(cfg, tcfg)` is the dense `CausalLM` (same parameter names: `embed`, `layers/...`,
`final_norm`, `unembed`, so a backbone checkpoint loads in directly) plus `temporal/...`:
Time2Vec and the graph encoder (`jaxdyn.model.temporal_encoders`) and one bottleneck adapter
per layer, ΔH = W_o·GELU(W_t φ + W_g f_g + b [+ W_h RMSNorm(Block(H))]) + b_o, stacked
[L_a, …], with W_o = b_o = 0 at init, so step 0 is the base model bit for bit.

Dimension legend: B batch, T length, D width, L layers, L_a adapted layers, r bottleneck.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.config import ConfigError, ModelConfig
from jaxdyn.model.layers import Norm, dtype_of, param_init
from jaxdyn.model.lm import ModelOutput, Unembed, remat_policy
from jaxdyn.model.temporal_encoders import (  # noqa: F401  (re-exported API)
    GELU_LIP,
    OPEN_END,
    GraphEncoder,
    TemporalConfig,
    Time2Vec,
    dummy_graph,
    edge_activation,
    years_to_tau,
)
from jaxdyn.model.transformer import DecoderLayer, constrain

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


class AdaptedLayer(DecoderLayer):
    """A `DecoderLayer` (same parameter names) followed by its adapter: Block(H) + ΔH."""

    tcfg: TemporalConfig | None = None

    def __call__(self, x_BTD, cache, ctx, adapter=None, cond=None):
        y_BTD, (cache, aux) = super().__call__(x_BTD, cache, ctx)
        if cond is not None:
            p, gate = adapter
            delta = adapter_delta(p, cond, y_BTD, self.tcfg) * gate
            y_BTD = constrain((y_BTD + delta.astype(y_BTD.dtype)).astype(y_BTD.dtype))
        return y_BTD, (cache, aux)


class TemporalLM(nn.Module):
    """`apply({"params": p}, tokens_BT, time=τ_B | None, graph=GraphsTuple | None)`.

    With time and graph both None the adapters are skipped: exactly the base `CausalLM`.
    """

    cfg: ModelConfig
    tcfg: TemporalConfig

    def setup(self):
        cfg = self.cfg
        if cfg.arch != "dense":
            raise ConfigError(f"TemporalLM adapts dense backbones; got arch={cfg.arch!r}")
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                              param_dtype=dtype_of(cfg.param_dtype),
                              embedding_init=param_init(("vocab", "embed")))
        self.temporal = TemporalParts(cfg, self.tcfg)
        unit = AdaptedLayer
        if cfg.remat_policy != "none":
            unit = nn.remat(unit, policy=remat_policy(cfg.remat_policy),
                            prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(unit, variable_axes={"params": 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, 0, nn.broadcast),
                                  length=cfg.num_layers,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.tcfg)
        else:
            self.layers = [unit(cfg, self.tcfg) for _ in range(cfg.num_layers)]
        self.final_norm = Norm(cfg.norm_type, cfg.norm_eps, dtype_of(cfg.dtype),
                               dtype_of(cfg.param_dtype))
        if not cfg.tie_embeddings:
            self.unembed = Unembed(cfg)

    def condition(self, time, graph):
        """φ(τ) [B, d_t] and f_g [B, d_g] (None where switched off), shared by all layers."""
        return self.temporal(time, graph, self.embed.embedding)

    def __call__(self, tokens_BT, time=None, graph=None, positions_BT=None,
                 segment_ids_BT=None, cache=None, compute_logits: bool = True) -> ModelOutput:
        cfg = self.cfg
        B, T = tokens_BT.shape
        dt = dtype_of(cfg.dtype)
        index = None if cache is None else cache["index"]
        if positions_BT is None:
            start = 0 if index is None else index
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        ctx = {"pos_BT": positions_BT, "seg_BT": segment_ids_BT, "index": index}
        x_BTD = constrain(self.embed(tokens_BT).astype(dt))
        cond = None
        if self.is_initializing() and time is None and graph is None:
            self.condition(None, None)  # creates the temporal parameters
        if time is not None or graph is not None:
            phi, fg, adapters = self.condition(time, graph)
            cond = {"phi": phi, "fg": fg}
            slots = self.tcfg.layer_slots(cfg.num_layers)
            gate_L = jnp.asarray(slots >= 0, jnp.float32)
            per_layer = jax.tree.map(lambda a: a[np.maximum(slots, 0)], adapters)
        layer_cache = None if cache is None else cache["layers"]
        if cfg.scan_layers:
            xs = None if cond is None else (per_layer, gate_L)
            x_BTD, (layer_cache, aux) = self.layers(x_BTD, layer_cache, ctx, xs, cond)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                take = lambda a, i=i: a[i]
                c_i = None if layer_cache is None else jax.tree.map(take, layer_cache)
                a_i = None if cond is None else jax.tree.map(take, (per_layer, gate_L))
                x_BTD, out_i = layer(x_BTD, c_i, ctx, a_i, cond)
                outs.append(out_i)
            layer_cache, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        h_BTD = self.final_norm(x_BTD)
        w_DV = self.embed.embedding.T if cfg.tie_embeddings else self.unembed()
        logits = None
        if compute_logits:
            logits = jnp.einsum("btd,dv->btv", h_BTD.astype(dt), w_DV.astype(dt),
                                preferred_element_type=jnp.float32)
        new_cache = None if cache is None else {"index": cache["index"] + T,
                                                "layers": layer_cache}
        return ModelOutput(logits=logits, hidden=h_BTD, unembed=w_DV, cache=new_cache, aux=aux)


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


# ----------------------------------------------------------------------------- params


def build(cfg: ModelConfig, tcfg: TemporalConfig) -> TemporalLM:
    return TemporalLM(cfg, tcfg)


def init_params(cfg: ModelConfig, tcfg: TemporalConfig, rng: jax.Array,
                seq_len: int = 8) -> dict:
    """Random backbone + temporal parameters (plain arrays)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.unbox(jax.jit(TemporalLM(cfg, tcfg).init)(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig, tcfg: TemporalConfig, seq_len: int = 8):
    """Boxed parameter shapes via `jax.eval_shape` (nothing is allocated)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r, t: TemporalLM(cfg, tcfg).init(r, t)["params"],
                          jax.random.key(0), tokens)


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
    """Parameter counts by part from the spec's formulas (§9); `total` sums them."""
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
