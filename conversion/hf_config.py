"""`config.json` ⇄ `jaxdyn.model.ModelConfig` (docs/conversion.md).

Both transformers spellings are read: v5 keeps RoPE settings in `rope_parameters`, v4 in
`rope_theta` / `rope_scaling` / `rotary_pct` / `rotary_emb_base`. Export writes both, with equal
values, so either version loads the folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

from conversion.errors import UnreadableFileError, UnsupportedConfigError, WrongFamilyError
from jaxdyn.model import ModelConfig

SUPPORTED = ("qwen2", "llama", "gpt_neox")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM"}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}
ACT_EXPORT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ROPE_TYPES = ("default", "linear", "llama3")
# Token ids and generation switches that export carries over from the imported config.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


def read_config(path: str) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face folder (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path!r}; give a Hugging Face model folder")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableFileError(f"cannot read {file}: {e}") from e


def _first(*values, default=None):
    return next((v for v in values if v is not None), default)


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    if isinstance(rp, dict) and "full_attention" in rp:  # per-layer-type form of v5
        rp = rp["full_attention"]
    scaling = {**rs, **rp}  # v5 values win
    kind = _first(rp.get("rope_type"), rs.get("rope_type"), rs.get("type"), default="default")
    if kind not in ROPE_TYPES:
        raise UnsupportedConfigError(f"rope type {kind!r} is not supported; supported: "
                                     f"{ROPE_TYPES}")
    out = {"rope_type": kind,
           "rope_theta": float(_first(rp.get("rope_theta"), hf.get("rope_theta"),
                                      hf.get("rotary_emb_base"), default=10000.0))}
    if kind in ("linear", "llama3"):
        out["rope_factor"] = float(scaling["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_position=int(scaling["original_max_position_embeddings"]))
    return out


def to_model_config(hf: dict[str, Any], *, param_dtype: str = "float32",
                    scan_layers: bool | None = None) -> ModelConfig:
    """ModelConfig for a Hugging Face config dict; unsupported settings raise, naming them."""
    family = hf.get("model_type")
    if family not in SUPPORTED:
        raise WrongFamilyError(f"model_type {family!r} is not supported; supported model types: "
                               f"{', '.join(SUPPORTED)}")
    D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    act = hf.get("hidden_act", "gelu" if family == "gpt_neox" else "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(f"hidden_act {act!r} is not supported; supported: "
                                     f"{sorted(ACTIVATIONS)}")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedConfigError("use_sliding_window=true is not supported (Qwen2.5 ships "
                                     "false); set it to false only if the model never used it")
    rp = hf.get("rope_parameters") or {}
    rotary = _first(rp.get("partial_rotary_factor"), hf.get("partial_rotary_factor"),
                    hf.get("rotary_pct"), default=0.25 if family == "gpt_neox" else 1.0)
    if family != "gpt_neox" and float(rotary) != 1.0:
        raise UnsupportedConfigError(f"partial rotary ({rotary}) is only supported for gpt_neox")
    kw: dict[str, Any] = dict(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=D,
        num_layers=int(hf["num_hidden_layers"]), num_heads=N,
        num_kv_heads=int(hf.get("num_key_value_heads") or N),
        head_dim=int(hf.get("head_dim") or D // N),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        activation=ACTIVATIONS[act], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_pct=float(rotary), param_dtype=param_dtype, **_rope(hf))
    if family == "gpt_neox":
        bias = bool(hf.get("attention_bias", True))
        kw.update(num_kv_heads=N, norm_eps=float(hf.get("layer_norm_eps", 1e-5)), qkv_bias=bias,
                  o_bias=bias, mlp_bias=True,
                  parallel_residual=bool(hf.get("use_parallel_residual", True)))
    else:
        eps = float(hf.get("rms_norm_eps", 1e-6))
        if family == "qwen2":
            kw.update(norm_eps=eps, qkv_bias=True, o_bias=False, mlp_bias=False)
        else:
            bias = bool(hf.get("attention_bias", False))
            kw.update(norm_eps=eps, qkv_bias=bias, o_bias=bias,
                      mlp_bias=bool(hf.get("mlp_bias", False)))
    if scan_layers is not None:
        kw["scan_layers"] = scan_layers
    return ModelConfig(**kw)


def hf_dtype(hf: dict[str, Any]) -> str | None:
    """The checkpoint dtype a config declares (`dtype` in v5, `torch_dtype` in v4)."""
    return _first(hf.get("dtype"), hf.get("torch_dtype"))


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse configs the Hugging Face class of the family cannot express."""
    fam = cfg.family
    bad = []
    if fam == "qwen2" and not (cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias):
        bad.append("Qwen2 has q/k/v biases only (qkv_bias=True, o_bias=mlp_bias=False)")
    if fam == "llama" and cfg.qkv_bias != cfg.o_bias:
        bad.append("LLaMA's attention_bias sets q/k/v and o biases together")
    if fam == "gpt_neox":
        if cfg.qkv_bias != cfg.o_bias or not cfg.mlp_bias:
            bad.append("GPT-NeoX has MLP biases and one attention_bias for qkv and dense")
        if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            bad.append("GPT-NeoX needs num_kv_heads == num_heads and head_dim == D / N")
    else:
        if cfg.parallel_residual:
            bad.append(f"{fam} has no parallel residual")
        if cfg.rotary_pct != 1.0:
            bad.append(f"{fam} has no partial rotary (rotary_pct={cfg.rotary_pct})")
    if cfg.activation not in ACT_EXPORT:
        bad.append(f"activation {cfg.activation!r}")
    if bad:
        raise UnsupportedConfigError(f"cannot export this {fam} config to Hugging Face: "
                                     + "; ".join(bad))


def from_model_config(cfg: ModelConfig, dtype: str,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `cfg`, with both the v4 and the v5 RoPE spellings (equal values)."""
    check_exportable(cfg)
    fam = cfg.family
    scaling = None
    if cfg.rope_type != "default":
        scaling = {"rope_type": cfg.rope_type, "type": cfg.rope_type, "factor": cfg.rope_factor}
        if cfg.rope_type == "llama3":
            scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                           high_freq_factor=cfg.rope_high_freq_factor,
                           original_max_position_embeddings=cfg.rope_original_max_position)
    params = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
    if cfg.rotary_pct != 1.0 or fam == "gpt_neox":
        params["partial_rotary_factor"] = cfg.rotary_pct
    out: dict[str, Any] = {
        "model_type": fam, "architectures": [ARCHITECTURES[fam]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": ACT_EXPORT[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if fam == "gpt_neox":
        out.update(layer_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias,
                   use_parallel_residual=cfg.parallel_residual, rotary_pct=cfg.rotary_pct,
                   rotary_emb_base=cfg.rope_theta)
    else:
        out.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   rms_norm_eps=cfg.norm_eps)
        if fam == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        else:
            out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    for k in PASSTHROUGH:
        if extra and extra.get(k) is not None:
            out[k] = extra[k]
    return out
