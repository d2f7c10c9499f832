"""Shared bench machinery: presets (read from configs/bench.py), timing, peaks, memory, configs
and the JSON/Markdown writer.

Every suite returns a list of *rows* (flat dicts). The fields every row may carry:
`suite`, `name`, `impl` (jaxdyn | torch | ...), `tokens_per_s`, `step_ms`, `mfu`,
`peak_mem_bytes`, `ratio` (this row ÷ the reference row of the same run), `ref` (which row),
`flop_ratio`, `target` (text), `meets_target` (bool or None), `notes`; timed comparisons
add `spread` and `rounds`; the profile suite's per-op rows add `op`, `pass`, `jaxdyn_ms`,
`torch_ms`, `per_step`, `share` and `torch_share` (jaxdyn/bench/profile.py); and
`jaxdyn.bench.protocol` adds `load_before`, `load_after`, `foreign_cpu`, `noisy` and `noise`
to every row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc

from jaxdyn.config import loader as configlib
from jaxdyn.model import ModelConfig
from jaxdyn.train import flops, schema


@dataclasses.dataclass(frozen=True)
class Preset:
    """One bench preset in memory: model shape (ModelConfig fields) and workload sizes."""

    model: dict[str, Any]
    batch: int  # training / forward rows
    seq_len: int  # T
    prompt_len: int  # decode prompt tokens (batch 1)
    new_tokens: int  # decode tokens generated
    repeats: int  # timed calls after the warm-up
    torch: bool = True  # run the transformers PyTorch reference


CONFIG_FILE = "configs/bench.py"  # the presets (configs/presets.py entries with a bench block)
# Model fields an experiment config (configs/mod.py, dtf.py) sets itself; every other model
# field of a preset replaces the experiment's.
EXPERIMENT_FIELDS = ("arch", "routing")
# Presets read so far, by name. `override` replaces an entry (`--repeats`); tests may put a
# synthetic preset here.
LOADED: dict[str, Preset] = {}


def load_preset(name: str) -> Preset:
    """`configs/bench.py:<name>` as a Preset (its `model` block and its `bench` block)."""
    cfg = configlib.load_config(f"{CONFIG_FILE}:{name}")
    return Preset(model=cfg.model.to_dict(), **cfg.bench.to_dict())


def get_preset(name: str) -> Preset:
    """The preset `name` (read from configs/bench.py once per process); an unknown name raises
    ValueError listing the known ones."""
    if name not in LOADED:
        if not name:
            raise ValueError("unknown preset ''; name one of configs/bench.py")
        LOADED[name] = load_preset(name)
    return LOADED[name]


def override(name: str, **fields: Any) -> Preset:
    """Replace workload fields of preset `name` for the rest of this process (e.g. repeats)."""
    LOADED[name] = dataclasses.replace(get_preset(name), **fields)
    return LOADED[name]


def model_config(preset: Preset, **overrides) -> ModelConfig:
    return ModelConfig.from_dict({**preset.model, **overrides})


def train_config(preset: Preset, exp: str = "standard", capacity: float | None = None,
                 mesh: tuple[int, int, int] = (1, 1, 1), batch: int | None = None,
                 **model_overrides) -> mlc.ConfigDict:
    """A finalized trainer config (configs/<exp>.py:small, which picks `arch` and `routing`)
    with the preset's other model fields and its workload sizes; byte tokenizer, no data."""
    base = schema.load(f"configs/{exp}.py:small")
    c = mlc.ConfigDict(base.to_dict())
    shape = {k: v for k, v in preset.model.items() if k not in EXPERIMENT_FIELDS}
    c.model.update({**shape, **model_overrides})
    if capacity is not None:
        c.model.routing.capacity = capacity
    c.train.batch_size = batch or preset.batch
    c.train.seq_len = preset.seq_len
    c.train.grad_accum = 1
    c.train.steps = 1000
    c.train.warmup_steps = 10
    c.tokenizer.kind = "byte"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return schema.finalize(c)


def random_batch(cfg, rng_seed: int = 0) -> dict[str, jax.Array]:
    """A [1, B, T] training batch of random tokens; unpacked rows (plain causal attention,
    like the PyTorch reference), so `segment_ids` is None."""
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = jax.random.randint(jax.random.key(rng_seed), (1, B, T), 0, cfg.model.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, B, T))
    return {"tokens": tokens.astype(jnp.int32), "positions": pos, "segment_ids": None}


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
    """Wait for every array in `x` (jax or torch)."""
    leaves = jax.tree.leaves(x)
    for leaf in leaves:
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return x


def time_fn(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of `fn` (results blocked on) after `warmup` untimed calls (compile).
    Returns best, median and the compile/warm-up seconds."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        block(fn())
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times), "warmup_s": warm}


# ----------------------------------------------------------------------------- peaks, memory


def compute_dtype(preset: Preset):
    return jnp.dtype(preset.model.get("dtype", "float32"))


def peaks(dtype) -> dict[str, Any]:
    """Matmul FLOP/s measured on this device in `dtype` and the vendor figure (or None)."""
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "dtype": jnp.dtype(dtype).name,
            # best of 10 square matmuls: robust to other jobs sharing the machine
            "peak_flops_measured": flops.measure_peak_flops(jnp.dtype(dtype), repeats=10),
            "peak_flops_vendor": flops.vendor_peak(dtype)}


def rss_peak_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def peak_memory_bytes() -> tuple[int, str]:
    """(bytes, source): the device allocator's peak where it reports one, else process RSS."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without allocator stats
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return rss_peak_bytes(), "rss"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None,
        n_devices: int = 1) -> float | None:
    if not peak:
        return None
    return flops.mfu(flops_per_token, tokens_per_s, peak, n_devices)


def timed_row(suite: str, name: str, impl: str, t: dict, tokens: float, flops_per_token: float,
              peaks: dict, **extra) -> dict:
    """A row from a `protocol.interleave` result: tokens/s and step time from the median
    round, its spread and rounds, MFU against the measured and the vendor peak."""
    tps = tokens / t["median_s"]
    return {"suite": suite, "name": name, "impl": impl, "tokens_per_s": tps,
            "step_ms": 1e3 * t["median_s"], "best_ms": 1e3 * t["best_s"],
            "spread": t["spread"], "range": t["range"], "rounds": t["rounds"],
            "round_ms": [round(1e3 * x, 3) for x in t["times"]],
            "mfu": mfu(flops_per_token, tps, peaks.get("peak_flops_measured")),
            "mfu_vendor": mfu(flops_per_token, tps, peaks.get("peak_flops_vendor")),
            "flops_per_token": flops_per_token, "compile_s": t["warmup_s"], **extra}


def ratio_row(row: dict, ref: dict, ref_name: str, key: str = "tokens_per_s") -> dict:
    """Set `ratio` = row[key] / ref[key] (throughput ratio) and `ref`."""
    a, b = row.get(key), ref.get(key)
    row["ratio"] = a / b if a and b else None
    row["ref"] = ref_name
    return row


def torch_ratio_target(row: dict, ref: dict, target: float) -> dict:
    """`ratio_row` against the PyTorch reference, plus a `>= target x` CPU throughput target
    (the CPU targets of the issues; other backends report the ratio without a verdict)."""
    ratio_row(row, ref, "torch")
    row["target"] = f">= {target}x torch (CPU)"
    if jax.default_backend() == "cpu" and row["ratio"] is not None:
        row["meets_target"] = row["ratio"] >= target
    return row


def torch_threads() -> int:
    """Use every core for the PyTorch reference (as jaxdyn's XLA CPU backend does)."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def hf_config(cfg):
    """A transformers config with the same maths as a jaxdyn ModelConfig (qwen2 / llama)."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", attn_implementation="sdpa")
    if cfg.family == "qwen2":
        return transformers.Qwen2Config(**common)
    if cfg.family == "llama":
        return transformers.LlamaConfig(**common, attention_bias=False)
    raise ValueError(f"the PyTorch reference covers qwen2 and llama, not {cfg.family!r}")


def hf_model(cfg, dtype: str | None = None):
    """A random-weight transformers causal LM matching `cfg`, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    dt = dtype or cfg.dtype
    return model.to(getattr(torch, "bfloat16" if dt == "bfloat16" else "float32")).eval()


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- output

COLUMNS = (("suite", "suite"), ("name", "name"), ("impl", "impl"), ("op", "op"),
           ("pass", "pass"), ("tokens_per_s", "tokens/s"), ("step_ms", "step ms"),
           ("jaxdyn_ms", "jaxdyn ms"), ("torch_ms", "torch ms"), ("mfu", "MFU"),
           ("mfu_vendor", "MFU (vendor peak)"),
           ("peak_mem_bytes", "peak mem"), ("ratio", "ratio"), ("ref", "vs"),
           ("per_step", "per step"), ("share", "share of step"),
           ("torch_share", "torch share"), ("flop_ratio", "FLOP ratio"), ("spread", "spread"),
           ("load_before", "load"),
           ("target", "target"), ("meets_target", "ok"), ("noise", "noisy because"),
           ("notes", "notes"))


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if key == "peak_mem_bytes":
        return f"{v / 2**20:,.0f} MiB"
    if key in ("mfu", "mfu_vendor", "spread", "share", "torch_share"):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if key in ("ratio", "flop_ratio"):
            return f"{v:.2f}"
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v).replace("|", "/")


def markdown_table(rows: list[dict]) -> str:
    """One GitHub Markdown table of every row (the COLUMNS that any row fills)."""
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "jax": jax.__version__,
           "flax": flax.__version__, "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _clean(v.item())
    return v


def write_results(path: str, rows: list[dict], meta: dict[str, Any]) -> str:
    """Write `path` (JSON: meta + rows) and `path` with .md (the Markdown table); atomic."""
    doc = {"meta": _clean(meta), "rows": _clean(rows)}
    md = markdown_table(rows)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    md_path = os.path.splitext(path)[0] + ".md"
    for p, text in ((path, json.dumps(doc, indent=2, allow_nan=False)), (md_path, md + "\n")):
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    return md
