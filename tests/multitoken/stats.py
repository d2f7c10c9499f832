"""Statistics shared by the multi-token tests."""

import numpy as np


def chi2_ok(counts: np.ndarray, probs: np.ndarray, alpha_z: float = 3.09):
    """Chi-square goodness of fit of `counts` to `probs` (cells with expected < 5 pooled),
    critical value by Wilson-Hilferty at 1e-3: (passes, statistic, critical value)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_c = np.r_[counts[big], counts[~big].sum()]
    exp_c = np.r_[exp[big], exp[~big].sum()]
    keep = exp_c > 0
    stat = np.sum((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep])
    df = keep.sum() - 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * np.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat, crit
