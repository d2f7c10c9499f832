"""Suite `kernels`: attention kernel parity on the device at hand (launch/accelerator_check.sh).

Every attention implementation this backend has (blockwise everywhere; splash on TPU, the Pallas
GPU kernel and cuDNN on GPU; off their hardware the Pallas kernels run in interpret mode) is
compared with the dense-mask XLA reference on packed rows (several documents, trailing padding,
GQA at the preset's head shape), forward output and q/k/v gradients, in fp32 and bf16, plus the
leakage check: changing the keys and values of document 1 must leave every later document's
output bit-identical. The CPU tests (tests/model/test_attention_kernels.py) check the same in
interpret mode; this suite is what runs the compiled kernels where they exist.

Rows: `max_abs_out`, `max_abs_grad` (largest absolute difference against xla, relative to the
reference's largest magnitude) and `leak` (largest change outside document 1); `meets_target`
when both errors are within the dtype's tolerance and nothing leaked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.bench import common
from jaxdyn.model import ModelConfig
from jaxdyn.model.attention import attend, self_spec

TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}  # relative to the reference's largest value


def implementations() -> list[str]:
    """The kernels worth checking on this backend (cuDNN only has the mask-free path)."""
    backend = jax.default_backend()
    impls = ["blockwise"]
    if backend == "tpu":
        impls.append("splash")
    elif backend == "gpu":
        impls += ["pallas_gpu", "cudnn"]
    else:  # interpret mode: correct, slow; the CPU dry run of the accelerator check
        impls += ["splash", "pallas_gpu"]
    return impls


def packed_segments(B: int, T: int, seed: int = 0) -> np.ndarray:
    """[B, T] segment ids: documents of T/8..T/2 tokens, the last 5 % of each row padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc, end = 0, 1, int(T * 0.95)
        while t < end:
            n = min(int(rng.integers(T // 8, T // 2 + 1)), end - t)
            seg[b, t:t + n] = doc
            t, doc = t + n, doc + 1
    return seg


def compare(impl: str, dtype: str, B: int, T: int, N: int, K: int, H: int,
            block: int) -> dict:
    """One implementation against xla: output and gradient errors, and the leakage check."""
    def cfg_of(name):
        return dataclasses.replace(ModelConfig(), num_heads=N, num_kv_heads=K, head_dim=H,
                                   hidden_size=N * H, attention_impl=name,
                                   attention_block=block)

    dt = jnp.dtype(dtype)
    seg_np = np.ones((B, T), np.int32) if impl == "cudnn" else packed_segments(B, T)
    seg = jnp.asarray(seg_np)
    segments = impl != "cudnn"
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dt)
    k = jax.random.normal(ks[1], (B, T, K, H), dt)
    v = jax.random.normal(ks[2], (B, T, K, H), dt)
    dout = jax.random.normal(ks[3], (B, T, N, H), dt)
    spec = self_spec(seg, B, T)

    def run(name, q, k, v):
        f = lambda q, k, v: attend(q, k, v, spec, cfg_of(name), segments=segments,
                                   self_attention=True)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(dout)

    run_impl, run_ref = jax.jit(lambda *a: run(impl, *a)), jax.jit(lambda *a: run("xla", *a))
    out, grads = run_impl(q, k, v)
    ref_out, ref_grads = run_ref(q, k, v)
    f32 = lambda x: np.asarray(x, np.float32)
    rel = lambda a, b: float(np.max(np.abs(f32(a) - f32(b))) / max(np.max(np.abs(f32(b))), 1e-30))
    err_out = rel(out, ref_out)
    err_grad = max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True))
    leak = None
    if segments:  # perturb document 1's keys and values: nothing outside it may move
        doc1 = jnp.asarray(seg_np == 1)[:, :, None, None]
        k2 = jnp.where(doc1, k + 1.0, k)
        v2 = jnp.where(doc1, v - 1.0, v)
        out2, _ = run_impl(q, k2, v2)
        outside = np.asarray(~doc1[..., 0, 0])
        leak = float(np.max(np.abs(f32(out2) - f32(out))[outside]))
    tol = TOLERANCE[dt.name]
    ok = err_out <= tol and err_grad <= tol and (leak is None or leak == 0.0)
    return {"max_abs_out": err_out, "max_abs_grad": err_grad, "leak": leak,
            "meets_target": bool(ok)}


def run(preset_name: str, ctx: dict) -> list[dict]:
    p = common.get_preset(preset_name)
    N, K = p.model.get("num_heads", 4), p.model.get("num_kv_heads", 2)
    H = p.model.get("head_dim") or p.model.get("hidden_size", 64 * N) // N
    on_device = jax.default_backend() in ("gpu", "tpu")
    B, T = (2, 2048) if on_device else (1, 256)  # interpret mode is slow: small on CPU
    T = int(ctx.get("kernels_seq_len", T))
    block = min(512 if on_device else 64, T // 2)
    rows = []
    for impl in implementations():
        for dtype in ("float32", "bfloat16"):
            if impl == "cudnn" and dtype == "float32":
                continue  # cuDNN attention is half precision only
            try:
                m = compare(impl, dtype, B, T, N, K, H, block)
                leak = "n/a (no segments)" if m["leak"] is None else m["leak"]
                notes = (f"out {m['max_abs_out']:.2e}, grad {m['max_abs_grad']:.2e} (rel. to "
                         f"xla); leak {leak}")
            except Exception as e:  # a kernel this backend cannot compile: report, go on
                m, notes = {"meets_target": False}, f"failed: {type(e).__name__}: {e}"[:300]
            rows.append({"suite": "kernels", "name": f"{dtype} B{B} T{T} N{N}/K{K} H{H}",
                         "impl": impl, "ref": "xla", **m,
                         "target": f"rel. error <= {TOLERANCE[dtype]:g}, no leak",
                         "notes": notes})
    return rows
