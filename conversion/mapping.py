"""Per-family tensor tables, HF name ⇄ jaxdyn path, both directions (docs/conversion.md).

One table per family. A `Rule` maps one Hugging Face tensor to one or more jaxdyn parameters
(NeoX's fused `query_key_value` feeds q, k and v) with an import transform and its exact
inverse. Layer rules use `{i}` in the HF name and paths relative to `layers_{i}`.

A torch `Linear` stores `W [out, in]`; a jaxdyn kernel is `[*in_shape, *out_shape]`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from jaxdyn.model import ModelConfig

Arrays = tuple[np.ndarray, ...]
IGNORED = (re.compile(r".*\.attention\.(bias|masked_bias)$"),  # old NeoX causal-mask buffers
           re.compile(r".*rotary_emb\.inv_freq$"))


def is_ignored(name: str) -> bool:
    """Known non-parameter buffers: skipped on import, listed in the report."""
    return any(p.match(name) for p in IGNORED)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # accepted HF names; the first one is written on export
    jx: tuple[str, ...]  # jaxdyn paths, "/"-joined (relative to layers_{i} when `layer`)
    layer: bool
    hf_shape: tuple[int, ...]
    load: Callable[[np.ndarray], Arrays]
    save: Callable[[Arrays], np.ndarray]

    def name(self, i: int | None = None, alias: int = 0) -> str:
        return self.hf[alias].format(i=i)


def _same(hf: str, jx: str, shape: tuple[int, ...], layer: bool) -> Rule:
    return Rule((hf,), (jx,), layer, shape, lambda w: (w,), lambda a: a[0])


def _linear(hf: str, jx: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            layer: bool = True, aliases: tuple[str, ...] = ()) -> Rule:
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Rule((hf, *aliases), (jx,), layer, (n_out, n_in),
                lambda w: (w.T.reshape(in_shape + out_shape),),
                lambda a: a[0].reshape(n_in, n_out).T)


def _bias(hf: str, jx: str, out_shape: tuple[int, ...]) -> Rule:
    return Rule((hf,), (jx,), True, (math.prod(out_shape),), lambda b: (b.reshape(out_shape),),
                lambda a: a[0].reshape(-1))


def _norm(hf: str, jx: str, D: int, bias: bool, layer: bool = True) -> list[Rule]:
    rules = [_same(f"{hf}.weight", f"{jx}/scale", (D,), layer)]
    if bias:
        rules.append(_same(f"{hf}.bias", f"{jx}/bias", (D,), layer))
    return rules


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    """Qwen2 / Qwen2.5 and LLaMA (their tensor names are the same)."""
    D, N, K, Hd, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size)
    a, m = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    heads = {"q": N, "k": K, "v": K}
    rules = [_same("model.embed_tokens.weight", "embed/embedding", (V, D), False)]
    rules += _norm("model.layers.{i}.input_layernorm", "attn_norm", D, False)
    for p, n in heads.items():
        rules.append(_linear(f"{a}.{p}_proj.weight", f"attn/{p}/kernel", (D,), (n, Hd)))
        if cfg.qkv_bias:
            rules.append(_bias(f"{a}.{p}_proj.bias", f"attn/{p}/bias", (n, Hd)))
    rules.append(_linear(f"{a}.o_proj.weight", "attn/o/kernel", (N, Hd), (D,)))
    if cfg.o_bias:
        rules.append(_bias(f"{a}.o_proj.bias", "attn/o/bias", (D,)))
    rules += _norm("model.layers.{i}.post_attention_layernorm", "mlp_norm", D, False)
    for p, (fi, fo) in {"gate": (D, F), "up": (D, F), "down": (F, D)}.items():
        rules.append(_linear(f"{m}.{p}_proj.weight", f"mlp/{p}/kernel", (fi,), (fo,)))
        if cfg.mlp_bias:
            rules.append(_bias(f"{m}.{p}_proj.bias", f"mlp/{p}/bias", (fo,)))
    rules += _norm("model.norm", "final_norm", D, False, layer=False)
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", "unembed/kernel", (D,), (V,), layer=False))
    return rules


def _fused_qkv(hf: str, jx: str, N: int, Hd: int, D: int | None) -> Rule:
    """NeoX's fused projection, laid out per head as [N, 3, Hd(, D)] (not [3, N, Hd])."""
    paths = tuple(f"attn/{p}/{jx}" for p in "qkv")
    if D is None:  # bias [3·N·Hd] -> 3 x [N, Hd]
        return Rule((hf,), paths, True, (3 * N * Hd,),
                    lambda b: tuple(b.reshape(N, 3, Hd)[:, j] for j in range(3)),
                    lambda a: np.stack(a, axis=1).reshape(-1))
    return Rule((hf,), paths, True, (3 * N * Hd, D),  # W [3·N·Hd, D] -> 3 x [D, N, Hd]
                lambda w: tuple(w.reshape(N, 3, Hd, D)[:, j].transpose(2, 0, 1)
                                for j in range(3)),
                lambda a: np.stack([x.transpose(1, 2, 0) for x in a], axis=1)
                .reshape(3 * N * Hd, D))


def neox_rules(cfg: ModelConfig) -> list[Rule]:
    """GPT-NeoX / Pythia."""
    D, N, Hd, F, V = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                      cfg.vocab_size)
    a, m = "gpt_neox.layers.{i}.attention", "gpt_neox.layers.{i}.mlp"
    rules = [_same("gpt_neox.embed_in.weight", "embed/embedding", (V, D), False)]
    rules += _norm("gpt_neox.layers.{i}.input_layernorm", "attn_norm", D, True)
    rules.append(_fused_qkv(f"{a}.query_key_value.weight", "kernel", N, Hd, D))
    if cfg.qkv_bias:
        rules.append(_fused_qkv(f"{a}.query_key_value.bias", "bias", N, Hd, None))
    rules.append(_linear(f"{a}.dense.weight", "attn/o/kernel", (N, Hd), (D,)))
    if cfg.o_bias:
        rules.append(_bias(f"{a}.dense.bias", "attn/o/bias", (D,)))
    rules += _norm("gpt_neox.layers.{i}.post_attention_layernorm", "mlp_norm", D, True)
    for hf, jx, fi, fo in (("dense_h_to_4h", "up", D, F), ("dense_4h_to_h", "down", F, D)):
        rules.append(_linear(f"{m}.{hf}.weight", f"mlp/{jx}/kernel", (fi,), (fo,)))
        rules.append(_bias(f"{m}.{hf}.bias", f"mlp/{jx}/bias", (fo,)))
    rules += _norm("gpt_neox.final_layer_norm", "final_norm", D, True, layer=False)
    if not cfg.tie_embeddings:
        # v4 and Hub files say embed_out; a model built from a config and saved by v5, lm_head.
        rules.append(_linear("embed_out.weight", "unembed/kernel", (D,), (V,), layer=False,
                             aliases=("lm_head.weight",)))
    return rules


TABLES: dict[str, Callable[[ModelConfig], list[Rule]]] = {
    "qwen2": llama_rules, "llama": llama_rules, "gpt_neox": neox_rules}
# HF names of the output projection that a tied checkpoint may still carry (must equal the
# embedding).
TIED_HEAD = {"qwen2": ("lm_head.weight",), "llama": ("lm_head.weight",),
             "gpt_neox": ("embed_out.weight", "lm_head.weight")}


def rules_for(cfg: ModelConfig) -> list[Rule]:
    return TABLES[cfg.family](cfg)


def expand(cfg: ModelConfig, rules: list[Rule], present: set[str] | None = None
           ) -> dict[str, tuple[Rule, int | None]]:
    """HF name -> (rule, layer index or None) for every tensor the config needs.

    With `present`, an aliased rule takes the first alias found in the checkpoint.
    """
    out = {}
    for r in rules:
        for i in range(cfg.num_layers) if r.layer else [None]:
            names = [r.name(i, k) for k in range(len(r.hf))]
            hit = next((n for n in names if present and n in present), names[0])
            out[hit] = (r, i)
    return out
