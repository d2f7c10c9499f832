"""Fused segment-aware self-attention kernels from JAX's Pallas library (docs/attention.md).

Dimension legend: B batch, T length (queries = keys), N query heads, K kv heads, H head dim,
b kernel block, Tp = T padded to a multiple of b.

Both kernels implement the self-attention case of the one mask rule (jaxdyn.model.flash): keys
in token order up to the query (causal by index) and of the query's segment. Packed positions
increase inside a document and routed blocks gather tokens in sorted order, so index order is
position order. Rows are padded to the kernel block with segment id 0; query rows of segment 0
(padding) are zeroed by the caller. Off their hardware the kernels run in Pallas interpret mode
(correct, slow: for CPU tests only).

- `splash`: the TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
  with a static `CausalMask` and dynamic `SegmentIds`; GQA natively (query head n reads kv head
  n // (N/K)); the softmax scale is folded into q.
- `pallas_gpu`: the Pallas (Triton) GPU flash-attention kernel
  (`jax.experimental.pallas.ops.gpu.attention.mha`) with `causal=True` and `segment_ids`; it
  has no GQA, so kv heads are repeated to N heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows(x: jax.Array, Tp: int) -> jax.Array:
    extra = Tp - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     seg_BT: jax.Array, scale: float, block: int = 512) -> jax.Array:
    """Causal, segment-masked GQA attention through the TPU splash kernel ([B, T, N, H] out)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    B, T, N, H = q_BTNH.shape
    b = _round_up(min(block, T), 128)  # TPU tiles: multiples of 128 rows
    Tp = _round_up(T, b)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((Tp, Tp)) for _ in range(N)])
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=jax.default_backend() != "tpu")
    heads_first = lambda x_BTXH: jnp.transpose(_pad_rows(x_BTXH, Tp), (0, 2, 1, 3))
    seg_BTp = _pad_rows(seg_BT.astype(jnp.int32), Tp)

    def row(q_NTH, k_KTH, v_KTH, seg_T):
        return kernel(q_NTH, k_KTH, v_KTH, segment_ids=sk.SegmentIds(q=seg_T, kv=seg_T))

    out_BNTH = jax.vmap(row)(heads_first(q_BTNH * jnp.asarray(scale, q_BTNH.dtype)),
                             heads_first(k_BTKH), heads_first(v_BTKH), seg_BTp)
    return jnp.transpose(out_BNTH, (0, 2, 1, 3))[:, :T].astype(q_BTNH.dtype)


def pallas_gpu_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                         seg_BT: jax.Array, scale: float, block: int = 128) -> jax.Array:
    """Causal, segment-masked attention through the Pallas GPU flash kernel ([B, T, N, H])."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, T, N, H = q_BTNH.shape
    G = N // k_BTKH.shape[2]
    b = max(16, min(128, block, 1 << (max(T, 1) - 1).bit_length()))  # Triton: powers of 2
    Tp = _round_up(T, b)
    bw = min(b, 32)  # the kernel's default backward tiles
    sizes = gpu_attention.BlockSizes(block_q=b, block_k=b, block_q_dkv=bw, block_kv_dkv=bw,
                                     block_q_dq=bw, block_kv_dq=bw)
    out_BTNH = gpu_attention.mha(
        _pad_rows(q_BTNH, Tp), _pad_rows(jnp.repeat(k_BTKH, G, axis=2), Tp),
        _pad_rows(jnp.repeat(v_BTKH, G, axis=2), Tp), _pad_rows(seg_BT.astype(jnp.int32), Tp),
        sm_scale=float(scale), causal=True, block_sizes=sizes,
        interpret=jax.default_backend() != "gpu")
    return out_BTNH[:, :T]
