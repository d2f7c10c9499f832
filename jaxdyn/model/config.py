"""ModelConfig: the one description of a jaxdyn decoder (dense or routed).

The fields mirror the Hugging Face config facts that change the maths (see
docs/conversion.md); `family` picks the per-family defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from jaxdyn.config.errors import ConfigError
from jaxdyn.model.routing.options import validate_routing

FAMILIES = ("qwen2", "llama", "gpt_neox")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
REMAT_POLICIES = ("none", "full", "dots", "minimal", "offload")
ARCHS = ("dense", "mod", "dtf")
# auto picks per backend; xla is the dense-mask reference (docs/attention.md).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blockwise", "splash", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder. Frozen and hashable so it can be a static jit arg."""

    family: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64  # D
    num_layers: int = 2  # L
    num_heads: int = 4  # N
    num_kv_heads: int = 2  # K
    head_dim: int = 16  # Hd
    intermediate_size: int = 128  # F
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    activation: str = "silu"
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    parallel_residual: bool = False  # gpt_neox only
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rotary_pct: float = 1.0
    # Numerics and layout.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # see ATTENTION_IMPLS and docs/attention.md
    attention_block: int = 512  # block (tile) length of the blockwise and splash kernels
    # Conditional compute (see jaxdyn.model.routing.route); "dense" is the plain decoder.
    arch: str = "dense"
    routing: tuple[tuple[str, Any], ...] = ()  # routing options as sorted (key, value) pairs

    # ----- derived -----
    @property
    def norm_type(self) -> str:
        return "layer" if self.family == "gpt_neox" else "rms"

    @property
    def gated_mlp(self) -> bool:
        return self.family != "gpt_neox"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def routing_options(self) -> dict[str, Any]:
        return dict(self.routing)

    def __post_init__(self):
        checks = [
            (self.family in FAMILIES, f"family={self.family!r}; supported: {FAMILIES}"),
            (self.rope_type in ROPE_TYPES,
             f"rope_type={self.rope_type!r}; supported: {ROPE_TYPES}"),
            (self.activation in ACTIVATIONS,
             f"activation={self.activation!r}; supported: {ACTIVATIONS}"),
            (self.remat_policy in REMAT_POLICIES,
             f"remat_policy={self.remat_policy!r}; supported: {REMAT_POLICIES}"),
            (self.arch in ARCHS, f"arch={self.arch!r}; supported: {ARCHS}"),
            (self.num_heads % self.num_kv_heads == 0,
             f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"),
            (self.rotary_dim % 2 == 0,
             f"rotary dims head_dim*rotary_pct={self.rotary_dim} must be even"),
            (self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r}; supported: {ATTENTION_IMPLS}"),
            (self.attention_block >= 1, f"attention_block={self.attention_block} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if isinstance(self.routing, dict):  # accept a dict, store a hashable tuple
            object.__setattr__(self, "routing", tuple(sorted(self.routing.items())))
        validate_routing(self.arch, dict(self.routing),
                         self.num_layers if self.arch != "dense" else None)

    # ----- (de)serialisation -----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["routing"] = dict(self.routing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown ModelConfig field {k!r}{hint}")
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **kw})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def tiny(family: str = "qwen2", **kw) -> ModelConfig:
    """A few-KB model for tests and CPU smoke runs, with the family's defaults."""
    base = dict(family=family, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=128)
    if family == "llama":
        base.update(qkv_bias=False, norm_eps=1e-5)
    elif family == "gpt_neox":
        base.update(num_kv_heads=4, intermediate_size=256, activation="gelu", qkv_bias=True,
                    o_bias=True, mlp_bias=True, rotary_pct=0.25, parallel_residual=True,
                    norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)
