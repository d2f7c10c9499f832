"""The decoder: one trunk (`CausalLM`) for every family, dense or routed (MoD, DTF), with
extension points for extra heads and adapter units."""

from jaxdyn.config.errors import ConfigError
from jaxdyn.model.config import ModelConfig, tiny
from jaxdyn.model.decoder import (
    CausalLM,
    ModelOutput,
    abstract_params,
    build,
    init_cache,
    init_params,
    param_count,
    param_shardings,
)
from jaxdyn.model.routing import dtf, mod  # noqa: F401  (register the "mod" and "dtf" units)
from jaxdyn.model.routing.flops import routed_flops_per_token
from jaxdyn.model.routing.options import routing_opts
from jaxdyn.model.routing.route import moving_average, route
from jaxdyn.model.routing.transfer import (
    TransferError,
    TransferReport,
    dense_to_routed,
    stack_layers,
    unstack_layers,
)
from jaxdyn.model.units import UNITS, UnitSpec, register_unit

__all__ = [
    "UNITS", "CausalLM", "ConfigError", "ModelConfig", "ModelOutput", "TransferError",
    "TransferReport", "UnitSpec", "abstract_params", "build", "dense_to_routed", "init_cache",
    "init_params", "moving_average", "param_count", "param_shardings", "register_unit", "route",
    "routed_flops_per_token", "routing_opts", "stack_layers", "tiny", "unstack_layers",
]
