"""Decoder models: dense families plus routed (MoD, DTF) scan units."""

from jaxdyn.model import dtf, mod  # noqa: F401  (register the "mod" and "dtf" scan units)
from jaxdyn.model.config import ConfigError, ModelConfig, tiny
from jaxdyn.model.lm import (
    UNITS,
    CausalLM,
    ModelOutput,
    UnitSpec,
    abstract_params,
    build,
    init_cache,
    init_params,
    param_count,
    register_unit,
)
from jaxdyn.model.routing import moving_average, route
from jaxdyn.model.routing_flops import routed_flops_per_token
from jaxdyn.model.routing_options import routing_opts
from jaxdyn.model.transfer import (
    TransferError,
    TransferReport,
    dense_to_routed,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "UNITS", "CausalLM", "ConfigError", "ModelConfig", "ModelOutput", "TransferError",
    "TransferReport", "UnitSpec", "abstract_params", "build", "dense_to_routed", "init_cache",
    "init_params", "moving_average", "param_count", "register_unit", "route",
    "routed_flops_per_token", "routing_opts", "stack_layers", "tiny", "unstack_layers",
]
