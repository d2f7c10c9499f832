"""DynaMo's joint selection over the heads' top-k (Tuli et al., NAACL 2024, §3.3), host side.

One step for a row: build `J_raw[i_1..i_n] = Π_h f^h[i_h] · ρ(tuple)^α_c` over the top-k of heads
1..n, divide tuples that repeat a recent or in-tuple token by θ, renormalise (ours), keep
`J > ε_b^(n-1)` (static threshold, ours: one threshold for both uses), then Otsu's threshold
on the blurred survivors (adaptive threshold), and sample one tuple from the survivors. An empty
grid or an empty survivor set backs off to n-1 heads; at n = 1 head 1's plain sample is used.
`mode="paper"` keeps the paper's literal rules (no renormalisation, zero entries below ε_b).

Dimension legend: n heads in the grid, k top-k per head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdyn.multitoken.cooccur import CooccurTables


@dataclasses.dataclass(frozen=True)
class DynamoOptions:
    n_max: int = 3  # largest tuple emitted per forward (<= model heads)
    top_k: int = 50  # per head
    temperature: float = 0.7  # 0: greedy (grid from T=1 probabilities, arg-max tuple)
    repetition_penalty: float = 1.1  # θ
    alpha_c: float = 1.0  # co-occurrence exponent
    threshold: float = 0.5  # ε_b in [0, 1]: 1 -> always 1 token, 0 -> n tokens when seen
    adaptive: bool = True  # Otsu threshold on the (blurred) grid
    blur: bool = True  # separable [1,2,1]/4 kernel before Otsu
    penalty_window: int = 64  # recent context tokens the penalty looks at (ours)
    smoothing: float = 0.0  # additive smoothing of the tables (off: unseen -> masked)
    mode: str = "ours"  # "ours" | "paper"

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold ε_b={self.threshold} must lie in [0, 1]")
        if self.mode not in ("ours", "paper") or self.n_max < 1 or self.top_k < 1:
            raise ValueError(f"invalid DynamoOptions {self}")


def blur(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1]/4 smoothing on every axis with edge-replicate padding."""
    y = np.asarray(x, np.float64)
    for ax in range(y.ndim):
        p = np.pad(y, [(1, 1) if a == ax else (0, 0) for a in range(y.ndim)], mode="edge")
        sl = lambda lo, hi, ax=ax, p=p: p[tuple(slice(lo, hi) if a == ax else slice(None)
                                                for a in range(p.ndim))]
        n = y.shape[ax]
        y = 0.25 * sl(0, n) + 0.5 * sl(1, n + 1) + 0.25 * sl(2, n + 2)
    return y


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: centre of the bin maximising w0·w1·(μ0 − μ1)² over 256 equal bins on
    [min, max] (class 0 = bins <= t); 0 when all values are equal. Ties (a run of empty bins
    between the classes gives one plateau) resolve to the lowest bin, up to 1e-9 relative."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return 0.0
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)[:-1].astype(np.float64)  # t = 0 .. bins-2 (class 1 never empty)
    m0 = np.cumsum(hist * centres)[:-1]
    total, mtot = float(hist.sum()), float((hist * centres).sum())
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (mtot - m0) / w1) ** 2
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))[0]
    return float(centres[int(best)])


def joint_grid(ids_nk: np.ndarray, f_nk: np.ndarray, tables: CooccurTables,
               opts: DynamoOptions, recent: np.ndarray) -> np.ndarray:
    """Penalised `J_raw` [k]*n (unnormalised)."""
    n, k = ids_nk.shape
    g = np.ones((k,) * n)
    for h in range(n):
        shape = [1] * n
        shape[h] = k
        g = g * f_nk[h].astype(np.float64).reshape(shape)
    g = g * tables.grid_ratio(ids_nk, opts.smoothing) ** opts.alpha_c
    if opts.repetition_penalty != 1.0:
        bad = np.zeros(g.shape, bool)
        for a in range(n):
            shape = [1] * n
            shape[a] = k
            bad = bad | np.isin(ids_nk[a], recent).reshape(shape)
            for b in range(a + 1, n):
                shape_ab = [1] * n
                shape_ab[a], shape_ab[b] = k, k
                bad = bad | (ids_nk[a][:, None] == ids_nk[b][None, :]).reshape(shape_ab)
        g = np.where(bad, g / opts.repetition_penalty, g)
    return g


def select(ids_nk: np.ndarray, f_nk: np.ndarray, fallback: int, tables: CooccurTables,
           recent: np.ndarray, opts: DynamoOptions, rng: np.random.Generator
           ) -> tuple[list[int], dict]:
    """Tokens to emit for one row and what happened (`n`, `backoffs`)."""
    backoffs = 0
    n_top = min(opts.n_max, ids_nk.shape[0])
    if opts.mode == "ours" and opts.threshold >= 1.0:  # renormalised J <= 1: nothing survives
        return [int(fallback)], {"n": 1, "backoffs": max(n_top - 1, 0)}
    for n in range(n_top, 1, -1):
        J = joint_grid(ids_nk[:n], f_nk[:n], tables, opts, recent)
        tau = opts.threshold ** (n - 1)
        if opts.mode == "paper":
            if not np.any(J >= tau):
                backoffs += 1
                continue
            keep = J >= opts.threshold
        else:
            total = J.sum()
            if total <= 0:
                backoffs += 1
                continue
            J = J / total
            keep = J > tau
        if not keep.any():
            backoffs += 1
            continue
        if opts.adaptive:
            masked = J * keep
            sm = blur(masked) if opts.blur else masked
            eps_at = otsu_threshold(sm[sm > 0])
            keep &= J > eps_at
        w = (J * keep).ravel()
        flat = int(np.argmax(w)) if opts.temperature == 0 else int(rng.choice(w.size,
                                                                              p=w / w.sum()))
        idx = np.unravel_index(flat, J.shape)
        return [int(ids_nk[h, i]) for h, i in enumerate(idx)], {"n": n, "backoffs": backoffs}
    return [int(fallback)], {"n": 1, "backoffs": backoffs}
