"""Token sampling from next-token logits: greedy, temperature, top-k, top-p, repetition penalty.

Dimension legend: B batch, V vocabulary. All shapes are static; `top_k` is a Python int.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Hashable so it can be a static argument of the jitted decode step."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already seen (CTRL style)

    def __post_init__(self):
        bad = sampling_errors(self.temperature, self.top_k, self.top_p,
                              self.repetition_penalty)
        if bad:
            raise ValueError(f"invalid sampling setting {bad[0]}={getattr(self, bad[0])!r}: "
                             f"{LIMITS[bad[0]]}")


LIMITS = {"temperature": "must be a finite number >= 0 (0 = greedy)",
          "top_k": "must be an integer >= 0 (0 = off)",
          "top_p": "must be a number in (0, 1] (1 = off)",
          "repetition_penalty": "must be a finite number > 0 (1 = off)"}


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except TypeError:
        return False


def sampling_errors(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> list[str]:
    """Names of the settings outside their range (`LIMITS`); NaN and inf are always out."""
    bad = []
    if not (_finite(temperature) and temperature >= 0):
        bad.append("temperature")
    try:
        if operator.index(top_k) < 0:
            bad.append("top_k")
    except TypeError:
        bad.append("top_k")
    if not (_finite(top_p) and 0 < top_p <= 1):
        bad.append("top_p")
    if not (_finite(repetition_penalty) and repetition_penalty > 0):
        bad.append("repetition_penalty")
    return bad


def apply_repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array,
                             penalty: float) -> jax.Array:
    """Divide positive / multiply negative logits of seen tokens (Keskar et al., 2019)."""
    if penalty == 1.0:
        return logits_BV
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def filter_logits(logits_BV: jax.Array, s: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) masking with -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if s.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
    if s.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # strictly before it is < top_p (the top token always stays).
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf)
        cutoff_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
    return logits_BV


def sample(logits_BV: jax.Array, rng: jax.Array, s: SamplingConfig,
           seen_BV: jax.Array | None = None) -> jax.Array:
    """Next tokens [B] (int32)."""
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, s.repetition_penalty)
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_BV, s), axis=-1).astype(jnp.int32)
