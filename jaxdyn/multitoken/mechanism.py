"""The mechanism check of DynaMo's co-occurrence weighting on a known Markov chain (host side).

A corpus comes from a chain of order 1 or 2 (`objective.markov_corpus`, table
`trans[ctx..., next]`). Given the context ending at position t, the true joint of the next two
tokens is, for order 2 with context (x_{t-1}, x_t),

    P(x_{t+1}=a, x_{t+2}=b) = P(a | x_{t-1}, x_t) · P(b | x_t, a),

and for order 1 `P(a | x_t) · P(b | a)`. The estimates compared against it are built from a
model's heads 1 and 2 at position t (`f¹`, `f²`) and the pair co-occurrence ratio ρ(a, b) of the
same corpus, which ignores the context:

- `product`: `f¹(a) f²(b)`;
- `cooccur`: `f¹(a) f²(b) ρ(a, b)`, renormalised (an unseen pair gets 0);
- `cooccur+thresholds`: that grid restricted to the entries above ε_b (the static threshold at
  n = 2) and above Otsu's threshold of the blurred survivors, renormalised — the set DynaMo
  samples a pair from (`grid.select`). It truncates the support, so its KL to the true joint is
  large by construction (floored probabilities).

Generated text is scored against the chain: the match rate is the share of generated tokens
the chain could have produced after their preceding `order` tokens (ancestral sampling from the
chain scores 1 by construction), and the mean true log-probability of the matching tokens is
compared with that of ancestral samples from the same prompts.

Dimension legend: V chain vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdyn.multitoken.grid import blur, otsu_threshold

ESTIMATES = ("product", "cooccur", "cooccur+thresholds")


def order_of(trans: np.ndarray) -> int:
    """Chain order of a transition table `[V]*(order+1)`."""
    return trans.ndim - 1


def true_joint(trans: np.ndarray, context: Sequence[int]) -> np.ndarray:
    """`[V, V]` joint of (x_{t+1}, x_{t+2}) given a context whose last token is x_t."""
    order = order_of(trans)
    if len(context) < order:
        raise ValueError(f"an order-{order} chain needs {order} context tokens, got "
                         f"{len(context)}")
    ctx = tuple(int(c) for c in context[len(context) - order:])
    p_a = trans[ctx]  # [V]: P(a | context)
    # P(b | ..., a): order 1 -> trans[a, b]; order 2 -> trans[x_t, a, b]
    p_b_given_a = trans if order == 1 else trans[ctx[-1]]
    return p_a[:, None] * p_b_given_a


def joint_estimates(p1_V: np.ndarray, p2_V: np.ndarray, rho_VV: np.ndarray,
                    threshold: float = 0.5) -> dict[str, np.ndarray]:
    """The three `[V, V]` estimates of the module docstring from heads 1 and 2 and ρ."""
    prod = np.asarray(p1_V, np.float64)[:, None] * np.asarray(p2_V, np.float64)[None, :]
    co = prod * rho_VV
    co = co / co.sum() if co.sum() > 0 else prod
    keep = co > threshold
    if keep.any():
        sm = blur(co * keep)
        keep &= co > otsu_threshold(sm[sm > 0])
    thr = co * keep / (co * keep).sum() if keep.any() else co
    return {"product": prod, "cooccur": co, "cooccur+thresholds": thr}


def kl_divergence(true: np.ndarray, est: np.ndarray, floor: float = 1e-9) -> float:
    """KL(true ‖ est) over the support of `true`; `est` is floored at `floor` there."""
    t, e = np.asarray(true, np.float64).ravel(), np.asarray(est, np.float64).ravel()
    nz = t > 0
    return float(np.sum(t[nz] * np.log(t[nz] / np.maximum(e[nz], floor))))


def ancestral(trans: np.ndarray, prompt: Sequence[int], n: int,
              rng: np.random.Generator) -> list[int]:
    """`n` tokens sampled from the chain after `prompt` (ancestral sampling)."""
    order, seq = order_of(trans), [int(t) for t in prompt]
    for _ in range(n):
        seq.append(int(rng.choice(trans.shape[-1], p=trans[tuple(seq[-order:])])))
    return seq[len(prompt):]


def true_logprobs(trans: np.ndarray, prompt: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """log P_chain of each token of `new` after `prompt` + the earlier new tokens; -inf for a
    token the chain cannot produce there (ids outside the chain's V included)."""
    order, V = order_of(trans), trans.shape[-1]
    seq, out = [int(t) for t in prompt], []
    for t in new:
        ctx = seq[-order:]
        ok = 0 <= t < V and all(0 <= c < V for c in ctx)
        p = trans[tuple(ctx)][t] if ok else 0.0
        out.append(np.log(p) if p > 0 else -np.inf)
        seq.append(int(t))
    return np.asarray(out, np.float64)


def match_stats(trans: np.ndarray, prompts: Sequence[Sequence[int]],
                new: Sequence[Sequence[int]]) -> dict[str, float]:
    """Match rate (share of new tokens the chain allows) and the mean true log-probability of
    the allowed ones, over all rows."""
    lp = np.concatenate([true_logprobs(trans, p, t) for p, t in zip(prompts, new, strict=True)])
    ok = np.isfinite(lp)
    return {"match_rate": float(ok.mean()) if lp.size else float("nan"),
            "mean_true_logp": float(lp[ok].mean()) if ok.any() else float("nan"),
            "tokens": int(lp.size)}
