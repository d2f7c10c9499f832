"""Conversion peak-memory check: a random Qwen2-shaped HF folder and a measured import.

`write_random_checkpoint` writes `config.json` + `model.safetensors` with numpy only (no
torch); `measure_import` runs `from_hf` in a fresh interpreter and
reports its peak RSS against the checkpoint size (absolute, and above the interpreter's
baseline after importing JAX). Used by the forward benchmark (`jaxdyn.bench`):

    python -m conversion.memcheck DIR [--unrolled]      # prints one JSON object
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def write_random_checkpoint(path: str, *, hidden: int = 1024, layers: int = 4,
                            heads: int = 16, kv_heads: int = 4, ffn: int = 2816,
                            vocab: int = 32000, dtype: str = "float32", seed: int = 0) -> int:
    """A random untied Qwen2 checkpoint (defaults: 443 MB in fp32); returns its tensor bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    hd = hidden // heads
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd),
                       p + "mlp.gate_proj.weight": (ffn, hidden),
                       p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
        for n, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            shapes[p + f"self_attn.{n}_proj.weight"] = (h * hd, hidden)
            shapes[p + f"self_attn.{n}_proj.bias"] = (h * hd,)
    tensors = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if name.endswith("norm.weight"):
            x += 1.0
        tensors[name] = x.astype(dt)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.nbytes for t in tensors.values())
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab,
               hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=ffn, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096,
               dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return total


def _measure_here(path: str, scan_layers: bool) -> dict:
    import resource

    import jax
    import psutil

    from conversion import from_hf

    jax.block_until_ready(jax.device_put(np.zeros(4)))
    base = psutil.Process().memory_info().rss
    files = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
    ckpt = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    _, params = from_hf(path, scan_layers=scan_layers)
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"checkpoint_bytes": ckpt, "baseline_rss": base, "peak_rss": peak,
            "peak_over_checkpoint": peak / ckpt,
            "peak_above_baseline_over_checkpoint": (peak - base) / ckpt,
            "scan_layers": scan_layers, "backend": jax.default_backend()}


def measure_import(path: str, scan_layers: bool = True) -> dict:
    """Peak RSS of `from_hf(path)` measured in a fresh interpreter."""
    cmd = [sys.executable, "-m", "conversion.memcheck", path]
    if not scan_layers:
        cmd.append("--unrolled")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        raise SystemExit("usage: python -m conversion.memcheck HF_DIR [--unrolled]")
    print(json.dumps(_measure_here(args[0], "--unrolled" not in args)))
