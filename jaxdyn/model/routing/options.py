"""Routing options of the routed architectures (MoD, DTF): defaults and validation.

`ModelConfig.routing` stores only the options a user set; `routing_opts(cfg)` merges them over
the defaults below (docs/features/routing.md). Unknown keys and bad values raise `ConfigError`
naming the closest valid key. This module imports nothing from the model so `config.py` can
call it.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from jaxdyn.config.errors import ConfigError

# Options every routed architecture understands.
COMMON: dict[str, Any] = {
    "capacity": 0.5,  # γ: each row routes k = max(1, int(γ·T)) tokens (MoD preset 0.125)
    "capacity_multiple": 1,  # round k up to a multiple (8/128: MXU/tensor-core tiles), <= T
    "dispatch": "gather",  # "gather" (take_along_axis + scatter) | "onehot" ([B,k,T] einsums)
    "causal_loss_weight": 0.01,  # BCE of the causal router against the top-k mask
    "decision": "causal_router",  # causal-mode decision d_t = σ(c_t) >= 0.5
    "route_every": 2,  # one routed layer per scan unit of this many layers (MoD: any n >= 1) ...
    "route_offset": 1,  # ... at this position in the unit (0 <= offset < n; 1: layer 0 dense)
    "unpaired_last_layer": "error",  # odd num_layers is an error
    "attend_to": "selected",  # selected tokens attend to selected tokens only (MoD semantics)
    # Causal (generation) mode, docs/features/routing.md §7:
    "causal_compute": "selected",  # "selected": layer on a bucket of d = 1 tokens | "masked"
    "causal_buckets": 4,  # n: bucket capacities 0, T/2^(n-1), ..., T/2, T (rows when decoding)
    "cache_fraction": "auto",  # routed KV cache slots / cache length; "auto" = min(1, 2γ)
}
MOD: dict[str, Any] = {
    **COMMON,
    "gate": "sigmoid",  # "sigmoid" σ(r) | "raw" r (paper) | "ones" (ablation: unscaled)
    "router_bce_weight": 0.01,  # BCE-with-logits(r, top-k mask)
    "z_loss_weight": 1e-4,  # mean(r²)
}
DTF: dict[str, Any] = {
    **COMMON,
    "gate": "or",  # "or": G = S_CE + S_CU - S_CE·S_CU | "ce": G = S_CE
    "prior_width_factor": 0.0625,  # f: PriorFFN width d_i from ceil(D·f) (docs/features/routing.md)
    "prior_loss_weight": 0.05,
    "prior_loss_form": "residual",  # "residual": MSE(Δ̂, sg Δ) | "thesis": MSE(H + Δ̂, sg H_post)
    "prior_detach_input": False,  # feed sg(H) to the prior
    "ma_window": 100,  # W of the MA of sg(D_st); a run uses min(ma_window, train.seq_len)
    "ma_padding": "replicate",  # "replicate" the first value | "available" history only
    "causal_router_input": "post",  # "post": P(sg(H_post)) | "pair_input": P(sg(H))
    "beta_mode": "softplus",  # effective β = softplus(raw β), learnable
    "prior": "swiglu",  # PriorFFN predicting Δ
    # Raw inits of the four learnable gate scalars (thesis values; softplus(β) is effective).
    "beta_ce_init": -0.3,
    "beta_cu_init": -0.6,
    "o_ce_init": 1.025,  # > 0: CE adds log(o_ce)
    "m_cu_init": 1.1,
}
DTF_SCALARS = ("beta_ce", "beta_cu", "o_ce", "m_cu")  # DTF param names; option f"{name}_init"
DEFAULTS: dict[str, dict[str, Any]] = {"mod": MOD, "dtf": DTF}

CHOICES: dict[str, tuple] = {
    "dispatch": ("gather", "onehot"),
    "decision": ("causal_router",),
    "unpaired_last_layer": ("error",),
    "attend_to": ("selected",),
    "beta_mode": ("softplus",),
    "prior": ("swiglu",),
    "prior_loss_form": ("residual", "thesis"),
    "prior_detach_input": (False, True),
    "ma_padding": ("replicate", "available"),
    "causal_router_input": ("post", "pair_input"),
    "causal_compute": ("selected", "masked"),
}
GATES = {"mod": ("sigmoid", "raw", "ones"), "dtf": ("or", "ce")}
NONNEG = ("causal_loss_weight", "router_bce_weight", "z_loss_weight", "prior_loss_weight")
WHY_NOT = {  # values the design names (docs/features/routing.md) not implemented yet
    "decision": "'gate_threshold' (EMA quantile of G) is not implemented",
    "unpaired_last_layer": "'dense' needs a trailing dense layer in CausalLM (decoder.py)",
    "attend_to": "'all' (reference fused-kernel comparison) is not implemented",
    "beta_mode": "'scheduled' (later reference, β as model state) is not implemented",
    "prior": "'gaussian' (later reference) is not implemented",
}


def validate_routing(arch: str, routing: dict[str, Any], num_layers: int | None = None) -> None:
    """Raise ConfigError for unknown keys (naming the closest one) or unsupported values."""
    valid = DEFAULTS.get(arch, {**MOD, **DTF})
    for key in routing:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown routing option {key!r} for arch={arch!r}{hint} "
                         f"(valid: {sorted(valid)})")
    if arch not in DEFAULTS:
        return  # dense: routing keys are carried along (e.g. for transfer) but unused
    opts = {**valid, **routing}
    for key, allowed in {**CHOICES, "gate": GATES[arch]}.items():
        if key in opts and opts[key] not in allowed:
            why = f" ({WHY_NOT[key]})" if key in WHY_NOT else ""
            raise ConfigError(f"routing {key}={opts[key]!r} for arch={arch!r}; "
                         f"supported: {allowed}{why}")
    mult = opts["capacity_multiple"]
    if not (isinstance(mult, int) and mult >= 1):
        raise ConfigError(f"routing capacity_multiple={mult!r} must be an int >= 1")
    gamma = opts["capacity"]
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        raise ConfigError(f"routing capacity={gamma!r} must be a fraction in (0, 1]")
    n = opts["causal_buckets"]
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16):
        raise ConfigError(f"routing causal_buckets={n!r} must be an int in [1, 16] (capacities "
                          "T, T/2, ..., T/2^(n-1) and 0)")
    frac = opts["cache_fraction"]
    if not (frac == "auto" or (isinstance(frac, (int, float)) and not isinstance(frac, bool)
                               and 0.0 < frac <= 1.0)):
        raise ConfigError(f"routing cache_fraction={frac!r} must be 'auto' or a fraction in "
                          "(0, 1] (1: full-size routed caches)")
    for key in NONNEG:
        if key in opts and not (isinstance(opts[key], (int, float)) and opts[key] >= 0):
            raise ConfigError(f"routing {key}={opts[key]!r} must be a number >= 0")
    if arch == "dtf":
        if not (isinstance(opts["ma_window"], int) and opts["ma_window"] >= 1):
            raise ConfigError(f"routing ma_window={opts['ma_window']!r} must be an int >= 1")
        if not opts["prior_width_factor"] > 0:
            raise ConfigError(f"routing prior_width_factor={opts['prior_width_factor']!r} "
                              "must be > 0")
        for key in (f"{n}_init" for n in DTF_SCALARS):
            v = opts[key]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ConfigError(f"routing {key}={v!r} must be a finite number")
        if not opts["o_ce_init"] > 0:
            raise ConfigError(f"routing o_ce_init={opts['o_ce_init']!r} must be > 0 "
                              "(CE adds log o_ce)")
    every, offset = opts["route_every"], opts["route_offset"]
    if arch == "dtf" and (every, offset) != (2, 1):
        raise ConfigError(f"routing route_every={every!r}, route_offset={offset!r} for arch='dtf'; "
                     "a DTF unit is a (decision, dynamic) pair: only route_every=2, "
                     "route_offset=1 (docs/features/routing.md)")
    if not (isinstance(every, int) and every >= 1 and isinstance(offset, int)
            and 0 <= offset < every):
        raise ConfigError(f"routing route_every={every!r}, route_offset={offset!r}: need an int "
                     "route_every >= 1 and 0 <= route_offset < route_every")
    if num_layers is not None and num_layers % every:
        raise ConfigError(f"arch={arch!r} with route_every={every} needs num_layers divisible by "
                     f"{every}, got {num_layers}; unpaired_last_layer='dense' is not supported "
                     "yet")


def trained_window(arch: str, routing: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """`routing` with the DTF moving-average window fixed to W = min(ma_window, seq_len).

    The spec's W = min(100, T) with T the *training* sequence length: a model-config constant,
    so a KV-cached decode (chunks of any length) computes the same MA as the full forward. Only
    written when it differs from the merged value (runs with seq_len >= ma_window unchanged).
    """
    if arch != "dtf":
        return dict(routing)
    window = {**DTF, **routing}["ma_window"]
    if not isinstance(window, int) or seq_len >= window:
        return dict(routing)  # a bad ma_window is refused by validate_routing
    return {**routing, "ma_window": int(seq_len)}


def unit_slots(cfg) -> dict[str, int]:
    """Sub-layer name -> position inside one scan unit ({} for dense: the unit is the layer).

    MoD: `routed` at `route_offset`, the other positions `dense`, `dense_1`, `dense_2`, … in
    order (the default every-other-layer unit is `dense`, `routed`). DTF: `dec`, `dyn`. Dense
    layer l of a transfer/export is position l % n of unit l // n.
    """
    if cfg.arch == "dtf":
        return {"dec": 0, "dyn": 1}
    if cfg.arch != "mod":
        return {}
    opt = routing_opts(cfg)
    n, o = opt["route_every"], opt["route_offset"]
    dense = [p for p in range(n) if p != o]
    slots = {("dense" if i == 0 else f"dense_{i}"): p for i, p in enumerate(dense)}
    return {**slots, "routed": o}


def layers_per_unit(cfg) -> int:
    """Decoder layers in one scan unit: 1 (dense), route_every (MoD), 2 (DTF)."""
    return max(1, len(unit_slots(cfg)))


def routing_opts(cfg) -> dict[str, Any]:
    """The routing options of `cfg` merged over its architecture's defaults."""
    return {**DEFAULTS.get(cfg.arch, {}), **cfg.routing_options}


def capacity_k(gamma: float, T: int, multiple: int = 1) -> int:
    """k = max(1, int(γ·T)) rounded up to `multiple` and capped at T: a Python int fixed at
    trace time, the same for every row. A multiple of 8 or 128 keeps the gathered [B, k, D]
    blocks on whole tensor-core / MXU tiles (performance issue, item 3)."""
    k = max(1, int(gamma * T))
    return min(T, -(-k // multiple) * multiple)


def routed_k(opt: dict[str, Any], T: int) -> int:
    """The capacity k of a routed layer with merged options `opt` at sequence length T."""
    return capacity_k(opt["capacity"], T, opt["capacity_multiple"])


def prior_width(D: int, factor: float) -> int:
    """PriorFFN width d_i = max(2, c + (c mod 2)) with c = ceil(D·f) (docs/features/routing.md)."""
    c = math.ceil(D * factor)
    return max(2, c + (c % 2))
