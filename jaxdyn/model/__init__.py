"""Decoder models: dense families plus routed (MoD, DTF) scan units."""

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

__all__ = [
    "UNITS", "CausalLM", "ConfigError", "ModelConfig", "ModelOutput", "UnitSpec",
    "abstract_params", "build", "init_cache", "init_params", "param_count", "register_unit",
    "tiny",
]
