"""Conditioning encoders of the temporal adapters (docs/features/temporal.md): what φ(τ) and
f_g are.

- `TemporalConfig`: widths and switches of the whole temporal pathway.
- `Time2Vec` (Kazemi et al., 2019): φ(τ) = [ω₀τ + ϕ₀, sin(ω_k τ + ϕ_k)], log-spaced periods.
- `edge_activation`: a_e(τ) = w_e·1[from_e ≤ τ < to_e] (hard) or a sigmoid window (soft).
- `GraphEncoder`: weighted, relational, bidirectional GCN (Kipf & Welling 2017; R-GCN,
  Schlichtkrull et al. 2018) with symmetric degree normalisation on a fixed-layout padded
  `jraph.GraphsTuple`, and a masked-mean ‖ attention-pooled readout. Only `jax.ops.segment_*`
  is used (jraph's padding helpers crash on current JAX, docs/features/temporal.md).

Dimension legend: B batch (= graphs), d_t Time2Vec width, d_n node width, d_g graph width,
Nn = B·N_max node slots, E = B·E_max edge slots, Ln name tokens per node, R relations.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from jaxdyn.model.config import ConfigError
from jaxdyn.model.layers import param_init

OPEN_END = 1e6  # sentinel for an open validity interval (never inf)
GELU_LIP = 1.129  # max |GELU'(x)| (exact GELU, at x = √2)

@dataclasses.dataclass(frozen=True)
class TemporalConfig:
    """Widths and switches of the temporal pathway; defaults are the design's (0.5B widths)."""

    d_t: int = 64  # Time2Vec width d_t
    periodic: str = "sin"  # "sin" (Kazemi et al.) | "sincos" (sin and cos halves)
    period_min: float = 1 / 12  # shortest Time2Vec period at init, years
    period_max: float = 50.0  # longest Time2Vec period at init, years
    d_n: int = 128  # GCN node width d_n
    d_g: int = 128  # graph summary width d_g
    gcn_layers: int = 2  # L_g message-passing layers
    n_rel: int = 4  # relations: leads, hq_in, supplies, belongs_to
    n_types: int = 4  # node types: company, person, city, sector
    n_roles: int = 3  # query role of a node: 0 none, 1 subject, 2 candidate
    rank: int = 64  # adapter bottleneck r
    token_conditioned: bool = False  # add W_h·RMSNorm(Block(H)) (per-token ΔH; ≈2x params)
    adapter_layers: tuple[int, ...] = ()  # decoder layers with an adapter; () = every layer
    edge_mode: str = "hard"  # "hard" a_e = w·1[from ≤ τ < to] | "soft" sigmoid window (∂/∂τ)
    soft_temp: float = 0.01  # T_s of the soft window, τ units (0.1 year)
    readout: str = "attn"  # "attn" (segment-softmax pooling of query nodes) | "mean"
    id_table: int = 0  # > 0: opt-in learned per-entity table with this many rows
    time_init: float = 1.0  # scale of W_t's LeCun-normal init (0: time pathway starts silent)

    def __post_init__(self):
        for ok, msg in [(self.periodic in ("sin", "sincos"), f"periodic={self.periodic!r}"),
                        (self.edge_mode in ("hard", "soft"), f"edge_mode={self.edge_mode!r}"),
                        (self.readout in ("attn", "mean"), f"readout={self.readout!r}"),
                        (self.d_t >= 2, f"d_t={self.d_t} must be >= 2"),
                        (self.time_init >= 0, f"time_init={self.time_init} must be >= 0")]:
            if not ok:
                raise ConfigError(f"TemporalConfig: unsupported {msg}")
        object.__setattr__(self, "adapter_layers", tuple(self.adapter_layers or ()))

    def layer_slots(self, num_layers: int) -> np.ndarray:
        """[L] index of each layer's adapter in the [L_a, …] stack, −1 where unadapted."""
        chosen = self.adapter_layers or range(num_layers)
        slots = -np.ones(num_layers, np.int32)
        for k, layer in enumerate(sorted(set(chosen))):
            if not 0 <= layer < num_layers:
                raise ConfigError(f"adapter layer {layer} outside 0..{num_layers - 1}")
            slots[layer] = k
        return slots


def years_to_tau(t_years):
    """τ = (t_years − 2020)/10: the normalised time every interval endpoint uses."""
    return (t_years - 2020.0) / 10.0


# ----------------------------------------------------------------------------- Time2Vec


def omega_init(cfg: TemporalConfig):
    """ω₀ = 1; ω_k = 20π/period with periods log-spaced from period_max down to period_min."""
    def init(key, shape, dtype=jnp.float32):
        del key
        periods = np.geomspace(cfg.period_max, cfg.period_min, shape[0] - 1)
        return jnp.asarray(np.concatenate([[1.0], 20 * np.pi / periods]), dtype)
    return init


def phase_init(key, shape, dtype=jnp.float32):
    """ϕ₀ = 0, ϕ_k ~ U(0, 2π)."""
    u = jax.random.uniform(key, (shape[0] - 1,), dtype, 0.0, 2 * math.pi)
    return jnp.concatenate([jnp.zeros((1,), dtype), u])


class Time2Vec(nn.Module):
    """φ(τ)₀ = ω₀τ + ϕ₀, φ(τ)_k = sin(ω_k τ + ϕ_k) (or cos on the second half for 'sincos')."""

    cfg: TemporalConfig

    @nn.compact
    def __call__(self, tau_B: jax.Array) -> jax.Array:
        d = self.cfg.d_t
        omega = self.param("omega", param_init(("norm",), omega_init(self.cfg)), (d,))
        phase = self.param("phase", param_init(("norm",), phase_init), (d,))
        z_Bd = tau_B.astype(jnp.float32)[:, None] * omega[None, :] + phase[None, :]
        if self.cfg.periodic == "sin":
            per = jnp.sin(z_Bd[:, 1:])
        else:
            h = 1 + d // 2
            per = jnp.concatenate([jnp.sin(z_Bd[:, 1:h]), jnp.cos(z_Bd[:, h:])], axis=1)
        return jnp.concatenate([z_Bd[:, :1], per], axis=1)


# ----------------------------------------------------------------------------- graph


def edge_activation(edges: dict, tau_E: jax.Array, mode: str = "hard",
                    temp: float = 0.01) -> jax.Array:
    """a_e(τ) = w_e·1[from_e ≤ τ < to_e] (hard) or w_e·σ((τ−from)/T)·σ((to−τ)/T) (soft)."""
    w, lo, hi = edges["weight"], edges["from"], edges["to"]
    if mode == "hard":
        on = (lo <= tau_E) & (tau_E < hi)
        a = jnp.where(on, w, jnp.zeros_like(w))
    else:
        a = w * jax.nn.sigmoid((tau_E - lo) / temp) * jax.nn.sigmoid((hi - tau_E) / temp)
    return a * edges["mask"]


def graph_index(n_per_graph: jax.Array, total: int) -> jax.Array:
    """Graph id of every node (or edge) slot, from n_node (or n_edge); static total."""
    G = n_per_graph.shape[0]
    return jnp.repeat(jnp.arange(G), n_per_graph, total_repeat_length=total)


def segment_softmax_pool(score_N, h_Nd, valid_N, seg_N, G):
    """Σ softmax(score) h per segment over valid slots; an empty segment gives zeros."""
    s = jnp.where(valid_N, score_N, -jnp.inf)
    smax = jax.ops.segment_max(s, seg_N, G)
    smax = jnp.where(jnp.isfinite(smax), smax, 0.0)
    e = jnp.where(valid_N, jnp.exp(s - smax[seg_N]), 0.0)
    den = jax.ops.segment_sum(e, seg_N, G)
    num = jax.ops.segment_sum(e[:, None] * h_Nd, seg_N, G)
    return num / jnp.maximum(den, 1e-30)[:, None]


def masked_segment_mean(h_Nd, valid_N, seg_N, G):
    w = valid_N.astype(jnp.float32)
    num = jax.ops.segment_sum(h_Nd * w[:, None], seg_N, G)
    return num / jnp.maximum(jax.ops.segment_sum(w, seg_N, G), 1.0)[:, None]


class GraphEncoder(nn.Module):
    """f_g(G_τ): weighted relational bidirectional GCN with symmetric degree norm + readout.

    Padding-safe: padded edges have a_e = 0, padded nodes are re-masked after every layer.
    Uses only `jax.ops.segment_*` (never jraph's broken padding helpers).
    """

    cfg: TemporalConfig

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, embed_VD: jax.Array) -> jax.Array:
        """f_g [G, d_g]; edges are activated at the graph's query time `graph.globals['tau']`."""
        c = self.cfg
        graph = jax.tree.map(jnp.asarray, graph)  # host arrays may meet traced indices below
        tau_B = graph.globals["tau"]
        nodes, edges = graph.nodes, graph.edges
        Nn, E, G = nodes["mask"].shape[0], edges["mask"].shape[0], graph.n_node.shape[0]
        node_g, edge_g = graph_index(graph.n_node, Nn), graph_index(graph.n_edge, E)
        mask_N = nodes["mask"].astype(jnp.float32)
        a_E = edge_activation(edges, tau_B.astype(jnp.float32)[edge_g], c.edge_mode, c.soft_temp)

        # Node input: frozen LM embedding of the name tokens (unseen entities work).
        tok_m = nodes["tok_mask"].astype(jnp.float32)
        emb = jax.lax.stop_gradient(embed_VD).astype(jnp.float32)[nodes["tokens"]]
        name_ND = jnp.sum(emb * tok_m[..., None], 1) / jnp.maximum(tok_m.sum(1), 1.0)[:, None]
        h = nn.Dense(c.d_n, name="node_in", kernel_init=param_init(("embed", None)))(name_ND)
        h = h + nn.Embed(c.n_types, c.d_n, embedding_init=param_init((None, None)),
                         name="type_emb")(nodes["type"])
        h = h + nn.Embed(c.n_roles, c.d_n, embedding_init=param_init((None, None)),
                         name="role_emb")(nodes["query"])
        if c.id_table:
            h = h + nn.Embed(c.id_table, c.d_n, name="id_emb")(nodes["entity"] % c.id_table)
        h = nn.LayerNorm(name="node_ln")(h) * mask_N[:, None]

        snd, rcv, rel = graph.senders, graph.receivers, edges["rel"]
        deg_in = 1.0 + jax.ops.segment_sum(a_E, rcv, Nn)
        deg_out = 1.0 + jax.ops.segment_sum(a_E, snd, Nn)
        coef_E = a_E * jax.lax.rsqrt(deg_out[snd] * deg_in[rcv])
        self_N = jax.lax.rsqrt(deg_out * deg_in)
        init = param_init((None, None, None), nn.initializers.lecun_normal())
        for layer in range(c.gcn_layers):
            w_fwd = self.param(f"W_fwd_{layer}", init, (c.n_rel, c.d_n, c.d_n))
            w_bwd = self.param(f"W_bwd_{layer}", init, (c.n_rel, c.d_n, c.d_n))
            w_self = self.param(f"W_self_{layer}", param_init((None, None),
                                nn.initializers.lecun_normal()), (c.d_n, c.d_n))
            b = self.param(f"b_{layer}", param_init((None,), nn.initializers.zeros), (c.d_n,))
            hf_NRd = jnp.einsum("nd,rde->nre", h, w_fwd)
            hb_NRd = jnp.einsum("nd,rde->nre", h, w_bwd)
            m_fwd = coef_E[:, None] * hf_NRd[snd, rel]  # along each edge, aggregated at r_e
            m_bwd = coef_E[:, None] * hb_NRd[rcv, rel]  # against it, aggregated at s_e
            agg = jax.ops.segment_sum(m_fwd, rcv, Nn) + jax.ops.segment_sum(m_bwd, snd, Nn)
            pre = (h @ w_self) * self_N[:, None] + agg + b[None, :]
            upd = nn.LayerNorm(name=f"ln_{layer}")(jax.nn.gelu(pre, approximate=False))
            h = (h + upd) * mask_N[:, None]

        valid = nodes["mask"] > 0
        mean_Gd = masked_segment_mean(h, valid, node_g, G)
        query = valid & (nodes["query"] > 0)
        if c.readout == "attn":
            q_vec = self.param("pool_query", param_init((None,), nn.initializers.normal(0.02)),
                               (c.d_n,))
            pool_Gd = segment_softmax_pool(h @ q_vec, h, query, node_g, G)
        else:
            pool_Gd = masked_segment_mean(h, query, node_g, G)
        return nn.Dense(c.d_g, name="readout", kernel_init=param_init((None, None)))(
            jnp.concatenate([mean_Gd, pool_Gd], axis=1))


def dummy_graph(n_max: int = 2, e_max: int = 2, name_len: int = 2) -> jraph.GraphsTuple:
    """A one-example padded graph in the batch layout (used to create parameters)."""
    nodes = {"tokens": jnp.zeros((n_max, name_len), jnp.int32),
             "tok_mask": jnp.ones((n_max, name_len), jnp.float32),
             "type": jnp.zeros((n_max,), jnp.int32), "mask": jnp.ones((n_max,), jnp.float32),
             "query": jnp.ones((n_max,), jnp.int32), "entity": jnp.zeros((n_max,), jnp.int32)}
    edges = {"weight": jnp.ones((e_max,)), "from": jnp.zeros((e_max,)),
             "to": jnp.full((e_max,), OPEN_END), "rel": jnp.zeros((e_max,), jnp.int32),
             "mask": jnp.ones((e_max,))}
    idx = jnp.arange(e_max, dtype=jnp.int32) % n_max
    return jraph.GraphsTuple(nodes=nodes, edges=edges, senders=idx, receivers=idx[::-1],
                             n_node=jnp.array([n_max]), n_edge=jnp.array([e_max]),
                             globals={"tau": jnp.zeros((1,), jnp.float32)})
