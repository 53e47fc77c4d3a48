"""Statistics of a comparison: win rates, a length-controlled win rate, a length-only preference rule fitted on
training pairs (the fair length baseline), bootstrap intervals over prompts, and intervals across seeds. Pure
functions of numbers; every interval is 95%.

Samples of one prompt are not independent (same prompt, same chosen response), so every bootstrap resamples
prompts and keeps all samples of a drawn prompt (a cluster bootstrap; Efron & Tibshirani 1993, §8.4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


# ----------------------------------------------------------------------------------------------------------
# The length-only baseline: a rule that sees nothing but the two responses' lengths, fitted on training pairs

_DIRECTIONS = ("longer", "shorter")
LENGTH_RULE_QUANTILES = tuple(q / 20 for q in range(1, 20))  # thresholds tried: 5%, 10%, ..., 95% of |Δ| in training


def _length_credit(len_a, len_b, small: str, large: str, threshold: float) -> np.ndarray:
    """Per pair, the credit of a length rule for response a: 1 when it prefers a, 0 when it prefers b, 0.5 when
    the lengths are equal (a length-only rule cannot choose; a tie counts half, as in ``wins``)."""
    d = np.asarray(len_a, float) - np.asarray(len_b, float)
    if d.ndim != 1:
        raise ValueError(f"lengths must be 1-D sequences (got shape {d.shape}).")
    sign = np.where(np.abs(d) <= threshold, 1.0 if small == "longer" else -1.0, 1.0 if large == "longer" else -1.0)
    return (1 + sign * np.sign(d)) / 2


@dataclass(frozen=True)
class LengthRule:
    """A length-only preference rule: "prefer the ``small`` response when |Δ| ≤ ``threshold``, else the ``large``
    one", with Δ the difference of the two responses' lengths and each direction "longer" or "shorter";
    ``threshold`` = inf (and ``small`` = ``large``) is a pure direction. It is symmetric in the pair (swapping the
    responses swaps its choice) and cannot choose between equal lengths. ``train_accuracy`` and ``n_train``
    record the fit (``fit_length_rule``); ``unit`` names what the lengths count."""

    small: str
    large: str
    threshold: float = math.inf
    train_accuracy: float = math.nan
    n_train: int = 0
    unit: str = "tokens"

    def __post_init__(self):
        if self.small not in _DIRECTIONS or self.large not in _DIRECTIONS:
            raise ValueError(f"directions must be in {_DIRECTIONS} (got {self.small!r}, {self.large!r}).")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (got {self.threshold}).")

    @property
    def pure(self) -> bool:
        """Whether the rule prefers one direction whatever the difference."""
        return self.small == self.large or math.isinf(self.threshold)

    def predict(self, len_a, len_b) -> np.ndarray:
        """Per pair: +1 where the rule prefers response a, −1 where it prefers b, 0 where the lengths are equal."""
        return 2 * _length_credit(len_a, len_b, self.small, self.large, self.threshold) - 1

    def credit(self, len_chosen, len_rejected) -> np.ndarray:
        """Per pair: 1 where the rule prefers the chosen response, 0 where the rejected one, 0.5 on equal lengths."""
        return _length_credit(len_chosen, len_rejected, self.small, self.large, self.threshold)

    def accuracy(self, len_chosen, len_rejected) -> float:
        """Preference accuracy on pairs of (chosen, rejected) lengths; equal lengths count half."""
        c = self.credit(len_chosen, len_rejected)
        if not len(c):
            raise ValueError("accuracy of a length rule needs at least one pair.")
        return float(c.mean())

    def describe(self) -> str:
        """The rule in words, e.g. "prefer the shorter response" or "prefer the longer response when |Δ| ≤ 12
        tokens, else the shorter"."""
        if self.pure:
            return f"prefer the {self.small} response"
        return f"prefer the {self.small} response when |Δ| ≤ {self.threshold:g} {self.unit}, else the {self.large}"

    def to_dict(self) -> dict:
        """A JSON-safe record of the rule (an infinite threshold becomes None) with its description."""
        out = asdict(self)
        out["threshold"] = None if math.isinf(self.threshold) else float(self.threshold)
        return {**out, "rule": self.describe()}


def fit_length_rule(len_chosen, len_rejected, quantiles=LENGTH_RULE_QUANTILES, unit: str = "tokens") -> LengthRule:
    """The length-only rule with the best accuracy on training pairs of (chosen, rejected) lengths.

    Candidates: the two pure directions (prefer the longer, prefer the shorter response) and, for each threshold t
    at the ``quantiles`` of |Δ| over the training pairs, the two rules that switch direction at t ("prefer the
    longer when |Δ| ≤ t, else the shorter" and the reverse). Equal lengths count half. The candidate with the best
    training accuracy wins; ties go to the simpler rule (a pure direction before a threshold, then the smaller t,
    then "longer" before "shorter"). Apply it to held-out pairs with ``LengthRule.accuracy``."""
    c, r = np.asarray(len_chosen, float), np.asarray(len_rejected, float)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"len_chosen and len_rejected must be 1-D and of one length (got {c.shape}, {r.shape}).")
    if not len(c):
        raise ValueError("fit_length_rule needs at least one training pair.")
    absd = np.abs(c - r)
    candidates = [(d, d, math.inf) for d in _DIRECTIONS]
    for t in sorted({float(x) for x in np.quantile(absd, quantiles)}):
        candidates += [("longer", "shorter", t), ("shorter", "longer", t)]
    best, best_acc = None, -1.0
    for small, large, t in candidates:  # in order of simplicity: a strictly better one replaces the best so far
        acc = float(_length_credit(c, r, small, large, t).mean())
        if acc > best_acc + 1e-12:
            best, best_acc = (small, large, t), acc
    return LengthRule(*best, train_accuracy=best_acc, n_train=len(c), unit=unit)


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
