"""MFU denominators: the vendor peak table picks the right chip and dtype column, specific
device names before general ones, and has no figure where none is fair (CPU, fp32)."""

import jax.numpy as jnp
import pytest

from jaxdyn.train import flops


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989),
    ("NVIDIA H100 PCIe", "bfloat16", 756),  # not the SXM figure: the specific name wins
    ("NVIDIA H200", jnp.float16, 989),
    ("NVIDIA H200", "fp8", 1979),
    ("NVIDIA B200", jnp.float8_e4m3fn, 4500),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
    ("TPU v4", "bfloat16", 275),
    ("TPU v5 lite", "bfloat16", 197),  # v5e, not v5p
    ("TPU v5", "bfloat16", 459),
    ("TPU v5p", "fp8", 918),
    ("TPU v6 lite", "bfloat16", 918),
])
def test_vendor_peak_table(kind, dtype, tflops):
    assert flops.vendor_peak(dtype, kind) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("kind, dtype", [
    ("cpu", "bfloat16"),  # no vendor figure for CPUs
    ("NVIDIA H100 80GB HBM3", "float32"),  # fp32 precision is the backend's choice
    ("NVIDIA A100-SXM4-80GB", "fp8"),  # A100 has no fp8
    ("TPU v4", "fp8"),
])
def test_no_vendor_peak_where_none_is_fair(kind, dtype):
    assert flops.vendor_peak(dtype, kind) is None


def test_this_machine_has_no_vendor_peak_and_mfu_uses_the_given_peak():
    assert flops.vendor_peak("bfloat16") is None  # the suite runs on CPUs
    # 1e9 FLOPs per token at 100 tokens/s on 2 devices of 1e11 FLOP/s: 50 %.
    assert flops.mfu(1e9, 100.0, 1e11, 2) == pytest.approx(0.5)
