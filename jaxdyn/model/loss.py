"""Vocabulary-chunked cross-entropy (docs/training.md).

Logits are never materialised as [B, T, V]: rows of hidden states are projected chunk by chunk
inside `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of storing
them. Labels are shifted exactly once, here: the target of position t is token t+n of the same
document (n = 1 for next-token prediction, n > 1 for multi-token heads).

Dimension legend: B batch, T length, D width, V vocabulary, N = B*T rows, C chunk rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_targets(tokens_BT: jax.Array, segment_ids_BT: jax.Array | None,
                    shift: int = 1) -> tuple[jax.Array, jax.Array]:
    """(targets_BT, mask_BT): token t+shift when it is in the same (non-padding) document."""
    B, T = tokens_BT.shape
    pad = jnp.zeros((B, shift), tokens_BT.dtype)
    targets_BT = jnp.concatenate([tokens_BT[:, shift:], pad], axis=1)
    in_range_BT = jnp.broadcast_to(jnp.arange(T) < T - shift, (B, T))
    if segment_ids_BT is None:
        return targets_BT, in_range_BT
    seg_next = jnp.concatenate([segment_ids_BT[:, shift:], jnp.zeros((B, shift),
                                                                     segment_ids_BT.dtype)], 1)
    same_doc_BT = (seg_next == segment_ids_BT) & (segment_ids_BT != 0)
    return targets_BT, in_range_BT & same_doc_BT


def chunked_cross_entropy(hidden_BTD: jax.Array, unembed_DV: jax.Array, targets_BT: jax.Array,
                          mask_BT: jax.Array, chunk: int = 1024,
                          z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean masked NLL (+ z_loss·mean lse²) without building [B, T, V] logits.

    Returns (loss, stats) with stats `nll`, `lse_sq` (mean logsumexp²), `accuracy` (argmax
    hits) and `tokens` (number of unmasked targets), all fp32 scalars."""
    B, T, D = hidden_BTD.shape
    N = B * T
    C = min(chunk, N)
    n_chunks = -(-N // C)
    pad = n_chunks * C - N
    h_ND = jnp.pad(hidden_BTD.reshape(N, D), ((0, pad), (0, 0)))
    y_N = jnp.pad(targets_BT.reshape(N), (0, pad))
    m_N = jnp.pad(mask_BT.reshape(N).astype(jnp.float32), (0, pad))

    @jax.checkpoint
    def chunk_stats(h_CD, y_C, m_C):
        logits_CV = jnp.einsum("cd,dv->cv", h_CD, unembed_DV.astype(h_CD.dtype),
                               preferred_element_type=jnp.float32)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        label_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        correct_C = (jnp.argmax(logits_CV, axis=-1) == y_C).astype(jnp.float32)
        return jnp.stack([jnp.sum((lse_C - label_C) * m_C), jnp.sum(lse_C ** 2 * m_C),
                          jnp.sum(correct_C * m_C)])

    def body(carry, xs):
        return carry + chunk_stats(*xs), None

    sums, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32),
                           (h_ND.reshape(n_chunks, C, D), y_N.reshape(n_chunks, C),
                            m_N.reshape(n_chunks, C)))
    count = jnp.maximum(jnp.sum(m_N), 1.0)
    nll = sums[0] / count
    lse_sq = sums[1] / count
    loss = nll + z_loss * lse_sq if z_loss else nll
    return loss, {"nll": nll, "lse_sq": lse_sq, "accuracy": sums[2] / count,
                  "tokens": jnp.sum(m_N)}


def lm_loss(hidden_BTD, unembed_DV, tokens_BT, segment_ids_BT=None, shift: int = 1,
            chunk: int = 1024, z_loss: float = 0.0, extra_mask_BT=None):
    """Next-token (or shift-n) loss for one head; `extra_mask_BT` restricts the targets
    (e.g. answer tokens only). The mask applies to the target positions t+shift."""
    targets_BT, mask_BT = shifted_targets(tokens_BT, segment_ids_BT, shift)
    if extra_mask_BT is not None:
        B = tokens_BT.shape[0]
        target_mask = jnp.concatenate(
            [extra_mask_BT[:, shift:], jnp.zeros((B, shift), extra_mask_BT.dtype)], 1)
        mask_BT = mask_BT & target_mask.astype(bool)
    return chunked_cross_entropy(hidden_BTD, unembed_DV, targets_BT, mask_BT, chunk, z_loss)


def unit_losses(aux: dict) -> jax.Array:
    """Σ over the units' weighted auxiliary losses (router BCE, prior, …) of their mean over
    the scan units; 0 for dense models."""
    return sum((jnp.mean(v) for v in aux["losses"].values()), jnp.zeros((), jnp.float32))
