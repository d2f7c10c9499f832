"""Forward FLOPs per token of dense, MoD and DTF models (docs/training.md,
docs/features/routing.md).

Dimension legend: T sequence length, k capacity, D width, N heads, K kv heads, Hd head dim,
F MLP width, V vocab, L layers, d_i PriorFFN width.

Training model FLOPs are 3× these forward numbers (remat recompute excluded); the trainer owns
that factor and the MFU formula.
"""

from __future__ import annotations

from jaxdyn.model.config import ModelConfig
from jaxdyn.model.routing.options import layers_per_unit, prior_width, routed_k, routing_opts


def layer_matmul_params(cfg: ModelConfig) -> int:
    """P_layer: weights of one decoder layer's matmuls (q, k, v, o and the MLP)."""
    D, N, K, Hd, F = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size)
    attn = D * N * Hd + 2 * D * K * Hd + N * Hd * D
    mlp = (3 if cfg.gated_mlp else 2) * D * F
    return attn + mlp


def dense_layer_flops(cfg: ModelConfig, T: int) -> float:
    """2·P_layer + 2·N·Hd·T (causal attention counts half of QKᵀ and AV)."""
    return 2.0 * layer_matmul_params(cfg) + 2.0 * cfg.num_heads * cfg.head_dim * T


def routed_layer_flops(cfg: ModelConfig, T: int, k: int) -> float:
    """Per sequence token: (k/T)·2·P_layer + 2·N·Hd·k²/T (matmuls ∝ k/T, attention ∝ (k/T)²)."""
    return (k / T) * 2.0 * layer_matmul_params(cfg) + 2.0 * cfg.num_heads * cfg.head_dim * k * k / T


def routed_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token: `model` (what the architecture computes, routers, causal
    predictors and PriorFFN included) and `dense_equivalent` (every layer dense, no routers)."""
    T, D = seq_len, cfg.hidden_size
    head = 2.0 * D * cfg.vocab_size
    dense_eq = cfg.num_layers * dense_layer_flops(cfg, T) + head
    if cfg.arch == "dense":
        return {"model": dense_eq, "dense_equivalent": dense_eq}
    opt = routing_opts(cfg)
    k = routed_k(opt, T)
    predictor = float(D * D + D)  # Linear(D→D/2) + Linear(D/2→1)
    n = layers_per_unit(cfg)  # one routed layer per unit, n - 1 dense ones
    unit = (n - 1) * dense_layer_flops(cfg, T) + routed_layer_flops(cfg, T, k) + predictor
    if cfg.arch == "mod":
        unit += 2.0 * D  # router r = x·w
    else:  # dtf: PriorFFN (3 matmuls of D×d_i)
        unit += 6.0 * D * prior_width(D, opt["prior_width_factor"])
    return {"model": (cfg.num_layers // n) * unit + head, "dense_equivalent": dense_eq}
