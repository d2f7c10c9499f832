"""Suite `conversion`: peak host memory of `conversion.from_hf` on a ≥ 300 MB checkpoint.

A random Qwen2-shaped fp32 checkpoint (`config.json` + `model.safetensors`, HF tensor names)
is written to a temporary folder; a fresh subprocess imports jax and `conversion`, records its
resident set size (the baseline), calls `conversion.from_hf(path)` and reports its peak RSS.
Target: peak RSS of the import (peak − baseline) ≤ 1.5 × checkpoint bytes; the raw peak is
reported beside it. The subprocess is the bench CLI's hidden worker mode
(jaxdyn/cli/bench.py), which calls `child`:

    python -m jaxdyn.bench --worker conversion --child DIR   # one import, JSON line on stdout
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import psutil
from safetensors.numpy import save_file

import conversion
from jaxdyn.bench import common
from jaxdyn.model import ModelConfig

CONVERSION_TARGET = 1.5
MARK = "CONVERSION_RESULT "
# ≈ 100M parameters = 400 MB in fp32 (untied head, 8 layers): over the 300 MB the issue asks.
SHAPES = dict(family="qwen2", vocab_size=32000, hidden_size=768, num_layers=8, num_heads=12,
              num_kv_heads=4, head_dim=64, intermediate_size=2048, tie_embeddings=False,
              max_position_embeddings=2048)
TINY_SHAPES = dict(SHAPES, vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, intermediate_size=128)


def hf_tensor_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """HF names and [out, in] shapes of a Qwen2 checkpoint (docs/conversion.md)."""
    D, N, K, Hd, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size)
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * Hd, D), p + "self_attn.q_proj.bias": (N * Hd,),
            p + "self_attn.k_proj.weight": (K * Hd, D), p + "self_attn.k_proj.bias": (K * Hd,),
            p + "self_attn.v_proj.weight": (K * Hd, D), p + "self_attn.v_proj.bias": (K * Hd,),
            p + "self_attn.o_proj.weight": (D, N * Hd),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F)})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def write_checkpoint(folder: str, shapes: dict) -> int:
    """Write config.json + model.safetensors (fp32 random); returns the tensor bytes."""
    cfg = ModelConfig(**shapes)
    hf = common.hf_config(cfg)
    hf.dtype = "float32"
    hf.save_pretrained(folder)
    rng = np.random.default_rng(0)
    tensors = {k: (0.02 * rng.standard_normal(s, dtype=np.float32))
               for k, s in hf_tensor_shapes(cfg).items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


def child(folder: str) -> dict:
    """Import `folder` in this (fresh) process and report RSS figures."""
    base = psutil.Process().memory_info().rss
    cfg, params = conversion.from_hf(folder)
    jax.block_until_ready(params)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"baseline_rss": base, "peak_rss": common.rss_peak_bytes(),
            "param_bytes": param_bytes, "layers": cfg.num_layers}


def worker_command(folder: str) -> list[str]:
    """The command line of one import of `folder` (`child` in a fresh process)."""
    return [sys.executable, "-m", "jaxdyn.bench", "--worker", "conversion", "--child", folder]


def run(preset_name: str, ctx: dict) -> list[dict]:
    row = {"suite": "conversion", "name": "from_hf peak RSS", "impl": "jaxdyn",
           "target": f"(peak - baseline) RSS <= {CONVERSION_TARGET}x checkpoint bytes"}
    shapes = TINY_SHAPES if preset_name == "tiny" else SHAPES
    with tempfile.TemporaryDirectory(prefix="jaxdyn_bench_ckpt_") as d:
        ckpt = write_checkpoint(d, shapes)
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        proc = subprocess.run(worker_command(d), env=env, capture_output=True, text=True,
                              timeout=ctx.get("timeout", 1800))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        row["notes"] = f"failed (rc {proc.returncode}): {proc.stderr[-400:]}"
        row["meets_target"] = False
        return [row]
    r = json.loads(lines[-1][len(MARK):])
    inc = (r["peak_rss"] - r["baseline_rss"]) / ckpt
    row.update(checkpoint_bytes=ckpt, peak_mem_bytes=r["peak_rss"], **r,
               rss_over_checkpoint=r["peak_rss"] / ckpt, import_rss_over_checkpoint=inc,
               ratio=inc, ref="checkpoint bytes", meets_target=inc <= CONVERSION_TARGET,
               notes=f"checkpoint {ckpt / 2**20:.0f} MiB fp32; raw peak/ckpt "
                     f"{r['peak_rss'] / ckpt:.2f} (baseline {r['baseline_rss'] / 2**20:.0f} "
                     "MiB: python + jax)")
    if preset_name == "tiny":
        row["notes"] += "; tiny checkpoint (CI), the >= 300 MB one runs at other presets"
    return [row]
