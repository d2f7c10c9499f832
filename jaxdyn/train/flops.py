"""Model FLOPs and MFU (docs/training.md).

Training counts 3× the forward pass (remat recompute excluded). Routed layers count at their
capacity k (see `jaxdyn.model.routing.flops`); the dense-equivalent figure counts every layer
dense so throughput comparisons stay fair.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxdyn.model import ModelConfig
from jaxdyn.model.routing.flops import routed_flops_per_token

# Vendor peak matmul FLOP/s per chip, dense (no structured sparsity), from the vendors' data
# sheets: (substring of jax's device_kind, {compute dtype: FLOP/s}). The first match wins, so
# specific names come before general ones. bf16 also stands for fp16; "fp8" is the 8-bit
# floating point figure (GPUs) and, on TPUs without fp8, the int8 one. fp32 has no entry: its
# matmuls run at a precision (TF32, bf16 passes) each backend chooses, so only the measured
# peak is a fair denominator there. docs/training.md#mfu has the table.
VENDOR_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "fp8": 1513e12}),
    ("H100", {"bfloat16": 989e12, "fp8": 1979e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "fp8": 1979e12}),  # SXM
    ("B200", {"bfloat16": 2250e12, "fp8": 4500e12}),
    ("A100", {"bfloat16": 312e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "fp8": 1836e12}),  # v6e (Trillium); int8
    ("TPU v6e", {"bfloat16": 918e12, "fp8": 1836e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "fp8": 394e12}),  # v5e; int8
    ("TPU v5e", {"bfloat16": 197e12, "fp8": 394e12}),
    ("TPU v5p", {"bfloat16": 459e12, "fp8": 918e12}),  # int8
    ("TPU v5", {"bfloat16": 459e12, "fp8": 918e12}),  # v5p reports "TPU v5"
    ("TPU v4", {"bfloat16": 275e12}),
)
_DTYPE_COLUMN = {"bfloat16": "bfloat16", "float16": "bfloat16", "float8_e4m3fn": "fp8",
                 "float8_e5m2": "fp8", "fp8": "fp8"}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """{"model", "dense_equivalent"}: 3× the forward FLOPs per token. Routed layers count at
    capacity k (the hook is `jaxdyn.model.routing.flops`, which knows every arch)."""
    fwd = routed_flops_per_token(cfg, seq_len)
    return {k: 3.0 * v for k, v in fwd.items()}


@functools.lru_cache(maxsize=8)
def measure_peak_flops(dtype=jnp.float32, n: int = 0, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s of one device in `dtype` (the MFU denominator); measured once
    per process and dtype. n = 0 picks 1024 on CPU and 8192 on accelerators."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def vendor_peak(dtype: str | jnp.dtype = "bfloat16", kind: str | None = None) -> float | None:
    """The vendor's dense peak FLOP/s of this device (or `kind`) in `dtype`; None for a device
    or dtype the table does not cover (every CPU, fp32)."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    name = dtype if isinstance(dtype, str) and dtype == "fp8" else jnp.dtype(dtype).name
    column = _DTYPE_COLUMN.get(name)
    peaks = next((p for k, p in VENDOR_PEAKS if k in kind), None)
    return None if peaks is None or column is None else peaks.get(column)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over n_devices · peak."""
    return flops_per_token * tokens_per_sec / (peak * n_devices)
