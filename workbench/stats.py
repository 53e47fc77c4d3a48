"""Statistics of a comparison: win rates, a length-controlled win rate, bootstrap intervals over prompts, and
intervals across seeds. Pure functions of numbers; every interval is 95%.

Samples of one prompt are not independent (same prompt, same chosen response), so every bootstrap resamples
prompts and keeps all samples of a drawn prompt (a cluster bootstrap; Efron & Tibshirani 1993, §8.4).
"""

from __future__ import annotations

import math

import numpy as np

# two-sided 95% quantiles of Student's t, df = 1..30 (standard tables); beyond 30 the normal's 1.96 is within 2%
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wins(scores, baseline_scores) -> np.ndarray:
    """Per sample: 1 where the score beats the baseline's, 0.5 on a tie, 0 where it loses."""
    a, b = np.asarray(scores, float), np.asarray(baseline_scores, float)
    return (a > b) + 0.5 * (a == b)


def cluster_bootstrap(clusters, statistic, n_boot: int = 1000, seed: int = 0):
    """(estimate, lo, hi): ``statistic(indices)`` on all samples, and the 2.5/97.5 percentiles of it over
    ``n_boot`` resamples of the clusters (prompts) with replacement, each drawn cluster bringing all its samples."""
    clusters = np.asarray(clusters)
    keys, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(keys))]
    estimate = statistic(np.arange(len(clusters)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(keys), len(keys))
        draws.append(statistic(np.concatenate([members[k] for k in pick])))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(estimate), float(lo), float(hi)


def bootstrap_mean(values, clusters, n_boot: int = 1000, seed: int = 0):
    """(mean, lo, hi) of ``values`` with a cluster-bootstrap interval."""
    v = np.asarray(values, float)
    return cluster_bootstrap(clusters, lambda idx: v[idx].mean(), n_boot, seed)


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-4, iters: int = 50) -> np.ndarray:
    """θ of logit P(y = 1) = θ·x by Newton's method; y may be fractional (a tie counts half). The tiny ridge keeps
    θ finite when the data separate perfectly."""
    theta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ theta))
        grad = x.T @ (y - p) - ridge * theta
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def length_controlled_win_rate(win, length_diff, scale: float | None = None) -> float:
    """The win rate with the length difference regressed out, as AlpacaEval's length-controlled win rate
    (Dubois et al. 2024, arXiv:2404.04475, §3): fit logit P(win) = θ + φ·tanh(Δℓ / σ_Δℓ) and report σ(θ), the
    predicted win rate had both responses the same length. Δℓ = response length − baseline length (characters);
    σ_Δℓ their standard deviation (``scale``, fixed across bootstrap resamples)."""
    win, d = np.asarray(win, float), np.asarray(length_diff, float)
    scale = scale if scale is not None else d.std()
    if not scale > 0:  # no length differences: nothing to control for
        return float(win.mean())
    x = np.stack([np.ones_like(d), np.tanh(d / scale)], axis=1)
    theta = _fit_logistic(x, win)
    return float(1 / (1 + math.exp(-theta[0])))


def win_rate_summary(win, length_diff, clusters, prefix: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Raw and length-controlled win rate, each with a cluster-bootstrap interval, as ``<prefix>``,
    ``<prefix>_lo``, ``<prefix>_hi``, ``<prefix>_lc``, ``<prefix>_lc_lo``, ``<prefix>_lc_hi``."""
    w, d = np.asarray(win, float), np.asarray(length_diff, float)
    scale = d.std()
    raw = cluster_bootstrap(clusters, lambda idx: w[idx].mean(), n_boot, seed)
    lc = cluster_bootstrap(clusters, lambda idx: length_controlled_win_rate(w[idx], d[idx], scale), n_boot, seed)
    return {prefix: raw[0], f"{prefix}_lo": raw[1], f"{prefix}_hi": raw[2],
            f"{prefix}_lc": lc[0], f"{prefix}_lc_lo": lc[1], f"{prefix}_lc_hi": lc[2], f"{prefix}_n": len(w)}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, lo, hi) across seeds: mean ± t_{0.975, n−1}·s/√n. One value: (v, nan, nan): one seed has no
    spread to show."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan, math.nan
    t = _T95[len(v) - 2] if len(v) - 1 <= len(_T95) else 1.96
    half = t * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)
