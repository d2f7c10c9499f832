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

VENDOR_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


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


def vendor_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in VENDOR_PEAKS.items() if k in kind), None)


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over n_devices · peak."""
    return flops_per_token * tokens_per_sec / (peak * n_devices)
