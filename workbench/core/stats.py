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
    """The win rate with the length difference regressed out, after AlpacaEval's length-controlled win rate
    (Dubois et al. 2024, arXiv:2404.04475, §3; theirs is one joint fit over all models with an instruction term,
    this one a fit on one run's samples): fit logit P(win) = θ + φ·tanh(Δℓ / σ_Δℓ) and report σ(θ), the
    predicted win rate had both responses the same length. Δℓ = response length − baseline length (tokens, as the
    callers pass it);
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


# ----------------------------------------------------------------------------------------------------------
# The known-gold study: labels drawn from a gold reward, best-of-n, paired differences, signs of reward hacking


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) elementwise, without overflow for large |x| (±inf give 1 and 0)."""
    x = np.asarray(x, float)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1 + e)
    return out


def _first_non_finite(name: str, x: np.ndarray, what: str) -> None:
    """A ValueError naming the index of the first non-finite entry of ``x``, if any."""
    bad = np.flatnonzero(~np.isfinite(x))
    if len(bad):
        raise ValueError(f"{name}[{bad[0]}] is {x[bad[0]]}: {what} must be finite.")


def bradley_terry_labels(score_a, score_b, *, temperature: float = 0.0, flip_rate: float = 0.0,
                         tie_margin: float = 0.0, seed: int = 0) -> dict:
    """Labels of pairs (a, b) from a known gold score, Δ = score_a − score_b (1-D arrays of one length n).

    Returns arrays of length n: ``tie`` (|Δ| ≤ ``tie_margin``: no label; the caller drops and counts the pair),
    ``p_a`` = P(a ≻ b) = σ(Δ/T) under the Bradley–Terry model (Bradley & Terry 1952; the preference model of
    Christiano et al. 2017, arXiv:1706.03741), and at T = 0 its deterministic limit (1 if Δ > 0, 0 if Δ < 0, ½ if
    equal); ``a_wins_clean`` (u < p_a, u uniform: the label before noise; False on a tie, so at T = 0 it is exactly
    Δ > 0); ``flipped`` (u2 < ``flip_rate``, never on a tie: label noise as in Coste et al. 2023, arXiv:2310.02743);
    ``a_wins`` = a_wins_clean XOR flipped (False on a tie). ``u`` and ``u2`` are drawn for every pair, ties included,
    from one seeded generator, so pair i's label depends only on its scores, i and the seed."""
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    if not temperature >= 0 or not tie_margin >= 0:
        raise ValueError(f"temperature and tie_margin must be >= 0 (got {temperature}, {tie_margin}).")
    if not 0 <= flip_rate <= 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5] (got {flip_rate}); a rate above 0.5 inverts the labels.")
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score_a and score_b must be 1-D and of one length (got {a.shape}, {b.shape}).")
    _first_non_finite("score_a", a, "a gold score")
    _first_non_finite("score_b", b, "a gold score")
    rng = np.random.default_rng(seed)
    u, u2 = rng.random(len(a)), rng.random(len(a))
    with np.errstate(over="ignore"):  # Δ/T may overflow to ±inf, whose σ is exact
        delta = a - b
        tie = np.abs(delta) <= tie_margin
        if temperature == 0:
            p_a = np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5))
        else:
            p_a = _sigmoid(delta / temperature)  # P(a ≻ b) = σ(Δ/T) (Bradley & Terry 1952; Christiano et al. 2017)
    clean = (u < p_a) & ~tie
    flipped = (u2 < flip_rate) & ~tie
    return {"tie": tie, "p_a": p_a, "a_wins_clean": clean, "flipped": flipped, "a_wins": (clean ^ flipped) & ~tie}


def best_of_n_weights(N: int, n: int) -> np.ndarray:
    """(N,): for N samples sorted by the proxy ascending, the probability that the i-th (1-based) is the best of a
    uniformly drawn n-subset, C(i−1, n−1)/C(N, n) (0 for i < n; the weights sum to 1); in log space, so N = 10,000
    works. The unbiased best-of-n estimator of Nakano et al. 2021 (arXiv:2112.09332, App. I), as Gao et al. 2022
    (arXiv:2210.10760) use it."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N (got n={n}, N={N}).")
    lg = math.lgamma
    log_cnn = lg(N + 1) - lg(n + 1) - lg(N - n + 1)
    w = np.zeros(N)
    for i in range(n, N + 1):  # C(i−1, n−1)/C(N, n) (Nakano et al. 2021, App. I)
        w[i - 1] = math.exp(lg(i) - lg(n) - lg(i - n + 1) - log_cnn)
    return w


def best_of_n_expectation(proxy, values, ns) -> np.ndarray:
    """(len(ns),): for one prompt's N samples with ``proxy`` scores (N,) and any per-sample quantity ``values`` (N,),
    the unbiased estimate of E[``values`` of the sample with the highest proxy among n drawn without replacement from
    the N], for each n in ``ns`` (each n <= N; ``best_of_n_weights`` on the samples sorted by the proxy). Samples
    tied on the proxy have their values replaced by their group's mean first: that is exactly the expectation when
    ties are broken uniformly at random."""
    p, v = np.asarray(proxy, float), np.asarray(values, float)
    if p.shape != v.shape or p.ndim != 1:
        raise ValueError(f"proxy and values must be 1-D and of one length (got {p.shape}, {v.shape}).")
    order = np.argsort(p, kind="stable")
    p, v = p[order], v[order]
    _, inverse = np.unique(p, return_inverse=True)
    v = (np.bincount(inverse, weights=v) / np.bincount(inverse))[inverse]  # a random tie-break: the group's mean
    return np.array([float(best_of_n_weights(len(p), n) @ v) for n in ns])


def best_of_n_kl_bound(n):
    """log n − (n − 1)/n: KL(π_bon ‖ π) for a continuous reward without ties (Stiennon et al. 2020,
    arXiv:2009.01325; Gao et al. 2022); an upper bound in general (Beirami et al. 2024, arXiv:2401.01879, Theorem 1).
    An int gives a float; an array of ints, an array."""
    n_arr = np.asarray(n, float)
    if not (n_arr >= 1).all():
        raise ValueError(f"best-of-n needs n >= 1 (got {n}).")
    out = np.log(n_arr) - (n_arr - 1) / n_arr  # Beirami et al. 2024, Theorem 1
    return float(out) if out.ndim == 0 else out


def best_of_n_kl_exact(probs, rewards, n: int) -> float:
    """Exact KL(π_bon ‖ π) of best-of-n (n i.i.d. draws from π, one with the highest reward kept, ties broken at
    random) for a categorical π (``probs``, summing to 1 within 1e-6; renormalised) with a reward per outcome
    (``rewards``, same shape). Outcomes of equal reward form one group G: π_bon(G) = F(G)^n − F(G−)^n with F the
    CDF by reward, shared within G in proportion to π, so the KL is the group-level Σ_G π_bon(G) log(π_bon(G)/π(G)).
    Outcomes of probability 0 are ignored."""
    p, r = np.asarray(probs, float), np.asarray(rewards, float)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"probs and rewards must be 1-D and of one length (got {p.shape}, {r.shape}).")
    if not (p >= 0).all() or not abs(p.sum() - 1) <= 1e-6:
        raise ValueError(f"probs must be a distribution (non-negative, sum 1; got sum {p.sum()}).")
    if not (int(n) == n and n >= 1):
        raise ValueError(f"best-of-n needs an integer n >= 1 (got {n}).")
    bad = np.flatnonzero(~np.isfinite(r) & (p > 0))
    if len(bad):
        raise ValueError(f"rewards[{bad[0]}] is {r[bad[0]]}: a reward must be finite.")
    keep = p > 0
    p, r = p[keep] / p[keep].sum(), r[keep]
    levels, inverse = np.unique(r, return_inverse=True)
    mass = np.bincount(inverse, weights=p, minlength=len(levels))  # π(G)
    upper = np.minimum(np.cumsum(mass), 1.0)  # F(G)
    lower = upper - mass  # F(G−)
    bon = upper**n - np.maximum(lower, 0.0)**n  # π_bon(G) = F(G)^n − F(G−)^n
    ok = bon > 0
    kl = float(np.sum(bon[ok] * np.log(bon[ok] / mass[ok])))  # Σ_G π_bon(G) log(π_bon(G)/π(G))
    return max(kl, 0.0)  # a KL is >= 0; rounding leaves about −1e-13 at n = 1


def best_of_n_kl_plugin(proxy, n: int) -> float:
    """Plug-in KL of best-of-n for one prompt's N samples with ``proxy`` scores (N,): ``best_of_n_kl_exact`` on the
    empirical distribution (each sample 1/N, reward = proxy; repeated samples score the same, so they and ties on
    the proxy form one outcome). It is the KL of best-of-n applied to the empirical distribution of the N samples: a
    lower estimate (at most log N, and merging outcomes only lowers a KL), reported beside the upper bound
    log n − (n−1)/n; with many repeats or ties it lies far below the bound."""
    p = np.asarray(proxy, float)
    if p.ndim != 1 or not len(p):
        raise ValueError(f"proxy must be a non-empty 1-D array (got shape {p.shape}).")
    return best_of_n_kl_exact(np.full(len(p), 1 / len(p)), p, n)


def fit_gao_form(d, r) -> tuple[float, float, float]:
    """(α, β, R²) of R(d) = d(α − βd) fitted by least squares to arrays ``d`` and ``r`` (Gao et al. 2022,
    arXiv:2210.10760, Eq. 1 for best-of-n; d = √KL, R centred so that R(0) = 0): r regressed on [d, −d²] without
    intercept. R² = 1 − SS_res/SS_tot about the mean of r; nan if r is constant."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError(f"d and r must be 1-D and of one length (got {d.shape}, {r.shape}).")
    _first_non_finite("d", d, "d")
    _first_non_finite("r", r, "r")
    if len(np.unique(d[d > 0])) < 2:
        raise ValueError("fit_gao_form needs at least 2 points with distinct d > 0.")
    x = np.stack([d, -d**2], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(x, r, rcond=None)  # R(d) = d(α − βd) (Gao et al. 2022, Eq. 1)
    if np.ptp(r) == 0:
        return float(alpha), float(beta), math.nan
    ss_tot = float(((r - r.mean()) ** 2).sum())
    ss_res = float(((r - x @ np.array([alpha, beta])) ** 2).sum())
    return float(alpha), float(beta), 1 - ss_res / ss_tot


def two_level_bootstrap(per_seed: list[dict], n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) across seeds of runs scored on one set of prompts, with an interval that covers both which
    prompts were drawn and which seeds: ``per_seed[s]`` maps a prompt id to seed s's values there (its samples, or
    paired differences). Each of ``n_boot`` resamples draws the prompts with replacement once, shared by every seed
    (they were scored on the same prompts), then the seeds with replacement; the statistic is the mean over the drawn
    seeds of each seed's mean over the drawn prompts. With a handful of seeds the seed level is itself a small
    sample and the interval is narrower than its 95 % (tests/test_stats_gold.py measures the coverage)."""
    if not per_seed:
        raise ValueError("two_level_bootstrap: no seeds.")
    prompts = sorted(set.intersection(*(set(d) for d in per_seed)))
    if not prompts:
        raise ValueError("two_level_bootstrap: the seeds share no prompt; they must be scored on the same prompts.")
    m = np.array([[np.mean(d[p]) for p in prompts] for d in per_seed], float)  # (seeds, prompts)
    rng = np.random.default_rng(seed)
    S, P = m.shape
    draws = [m[rng.integers(0, S, S)][:, rng.integers(0, P, P)].mean() for _ in range(n_boot)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(m.mean()), float(lo), float(hi)


def paired_difference(a, b, clusters, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a − b, lo, hi) over paired units (unit i of ``a`` with unit i of ``b``: the same prompt and sample
    index, the same pair), with a 95% cluster-bootstrap interval over ``clusters`` (prompts; ``cluster_bootstrap``):
    the comparison is paired, so what the units share (a prompt's difficulty) cancels before the interval is drawn.
    NaN (or ±inf) in a or b is a ValueError naming its index."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(clusters) != len(a):
        raise ValueError(f"a, b and clusters must be 1-D and of one length (got {a.shape}, {b.shape}, "
                         f"{len(clusters)}).")
    for name, x in (("a", a), ("b", b)):
        bad = np.flatnonzero(~np.isfinite(x))
        if len(bad):
            raise ValueError(f"paired_difference: {name}[{bad[0]}] is {x[bad[0]]}.")
    d = a - b
    return cluster_bootstrap(clusters, lambda idx: d[idx].mean(), n_boot, seed)


def distinct_n(token_lists, n: int = 2) -> float:
    """Distinct-n (Li et al. 2016, arXiv:1510.03055): distinct n-grams over all n-grams of a set of replies (token
    ids); low values mean the replies repeat themselves or each other, a sign of reward hacking. NaN with no n-gram."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan
