"""The known-gold study's numerical functions in workbench/core/stats.py: Bradley–Terry labels from a gold score,
best-of-n weights, expectations and KL, the fit of Gao et al.'s R(d) = d(α − βd), and paired differences. Each is
checked against a brute-force or closed-form computation."""

import itertools
import math
import warnings

import numpy as np
import pytest

from workbench.core import stats


def _sigma(x):
    return 1 / (1 + np.exp(-x))


# ----------------------------------------------------------------------------------------------------------
# Bradley–Terry labels


def test_bt_clean_labels_follow_the_bradley_terry_probability():
    rng = np.random.default_rng(1)
    delta = rng.uniform(-2, 2, 200_000)
    base = rng.normal(0, 1, len(delta))
    out = stats.bradley_terry_labels(base + delta, base, temperature=0.5, seed=7)
    d = (base + delta) - base  # the Δ the function sees
    np.testing.assert_allclose(out["p_a"], _sigma(d / 0.5), rtol=1e-12)
    assert not out["tie"].any() and not out["flipped"].any()
    np.testing.assert_array_equal(out["a_wins"], out["a_wins_clean"])
    edges = np.linspace(-2, 2, 11)  # 10 bins of about 20,000 pairs: the share's standard error is at most 0.0035
    which = np.digitize(d, edges[1:-1])
    for k in range(10):
        in_bin = which == k
        assert in_bin.sum() > 15_000
        share = out["a_wins_clean"][in_bin].mean()
        assert abs(share - out["p_a"][in_bin].mean()) < 0.01, (k, share, out["p_a"][in_bin].mean())
    # the labels follow Δ: the lowest bin mostly loses, the highest mostly wins
    assert out["a_wins_clean"][which == 0].mean() < 0.1 and out["a_wins_clean"][which == 9].mean() > 0.9


def test_bt_temperature_zero_is_deterministic():
    rng = np.random.default_rng(2)
    a = rng.integers(-3, 4, 5000).astype(float)  # many exact ties (Δ = 0)
    b = rng.integers(-3, 4, 5000).astype(float)
    delta = a - b
    assert (delta == 0).any() and (delta > 0).any() and (delta < 0).any()
    for seed in (0, 1, 2):
        out = stats.bradley_terry_labels(a, b, seed=seed)
        np.testing.assert_array_equal(out["a_wins_clean"], delta > 0)
        np.testing.assert_array_equal(out["a_wins"], delta > 0)
        assert set(np.unique(out["p_a"])) == {0.0, 0.5, 1.0}
        np.testing.assert_array_equal(out["p_a"], np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5)))
        np.testing.assert_array_equal(out["tie"], delta == 0)


def test_bt_flip_rate_flips_that_share_of_the_labelled_pairs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 200_000), rng.normal(0, 1, 200_000)
    out = stats.bradley_terry_labels(a, b, temperature=0.3, flip_rate=0.25, tie_margin=0.05, seed=11)
    labelled = ~out["tie"]
    assert out["tie"].sum() > 1000  # the margin makes some ties, which are not flipped
    assert abs(out["flipped"][labelled].mean() - 0.25) < 0.005
    np.testing.assert_array_equal(out["a_wins"], out["a_wins_clean"] ^ out["flipped"])
    np.testing.assert_array_equal(out["a_wins"][labelled], out["a_wins_clean"][labelled] != out["flipped"][labelled])
    assert (out["a_wins"] != out["a_wins_clean"]).sum() == out["flipped"].sum()


def test_bt_ties_are_exactly_the_pairs_within_the_margin():
    rng = np.random.default_rng(4)
    a = rng.integers(-8, 9, 20_000) * 0.25  # exact binary fractions: |Δ| = 0.25 lands on the margin exactly
    b = rng.integers(-8, 9, 20_000) * 0.25
    within = np.abs(a - b) <= 0.25
    assert (np.abs(a - b) == 0.25).any()
    out = stats.bradley_terry_labels(a, b, temperature=1.0, flip_rate=0.5, tie_margin=0.25, seed=5)
    np.testing.assert_array_equal(out["tie"], within)
    assert out["tie"].sum() == within.sum()
    assert not out["a_wins"][within].any()
    assert not out["flipped"][within].any()
    assert not out["a_wins_clean"][within].any()
    # outside the margin both outcomes and flips occur
    assert 0.3 < out["a_wins"][~within].mean() < 0.7 and 0.45 < out["flipped"][~within].mean() < 0.55


def test_bt_labels_depend_only_on_the_pair_its_index_and_the_seed():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 1000), rng.normal(0, 1, 1000)
    kw = dict(temperature=0.7, flip_rate=0.2, tie_margin=0.01)
    first = stats.bradley_terry_labels(a, b, seed=3, **kw)
    again = stats.bradley_terry_labels(a, b, seed=3, **kw)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = stats.bradley_terry_labels(a, b, seed=4, **kw)
    assert (other_seed["a_wins"] != first["a_wins"]).sum() > 100
    # change every other pair's scores (some into ties, some far apart): the untouched pairs keep their labels
    a2, b2 = a.copy(), b.copy()
    a2[1::2] = rng.normal(0, 10, 500)
    b2[1::2] = np.where(rng.random(500) < 0.3, a2[1::2], rng.normal(0, 10, 500))
    changed = stats.bradley_terry_labels(a2, b2, seed=3, **kw)
    assert changed["tie"][1::2].sum() > 100
    for key in first:
        np.testing.assert_array_equal(changed[key][0::2], first[key][0::2])


def test_bt_rejects_bad_arguments_and_is_stable_for_huge_differences():
    a, b = np.zeros(5), np.ones(5)
    with pytest.raises(ValueError, match="inverts"):
        stats.bradley_terry_labels(a, b, flip_rate=0.6)
    with pytest.raises(ValueError, match="temperature"):
        stats.bradley_terry_labels(a, b, temperature=-0.1)
    with pytest.raises(ValueError, match="tie_margin"):
        stats.bradley_terry_labels(a, b, tie_margin=-1)
    with pytest.raises(ValueError, match="one length"):
        stats.bradley_terry_labels(a, b[:4])
    bad = b.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"score_b\[3\]"):
        stats.bradley_terry_labels(a, bad)
    bad_a = a.copy()
    bad_a[2] = np.inf
    with pytest.raises(ValueError, match=r"score_a\[2\]"):
        stats.bradley_terry_labels(bad_a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in σ or in Δ/T would raise here
        out = stats.bradley_terry_labels([1e300, -1e300, 1e-300], [0.0, 0.0, 0.0], temperature=1e-10)
    np.testing.assert_array_equal(out["p_a"], [1.0, 0.0, 0.5])  # Δ/T = ±inf and 1e-290
    np.testing.assert_array_equal(out["a_wins"][:2], [True, False])


# ----------------------------------------------------------------------------------------------------------
# best-of-n weights and expectations


def test_best_of_n_weights_match_the_binomial_formula():
    for N in range(1, 13):
        for n in range(1, N + 1):
            w = stats.best_of_n_weights(N, n)
            exact = np.array([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)])
            np.testing.assert_allclose(w, exact, rtol=1e-12, atol=1e-15)
            assert abs(w.sum() - 1) < 1e-12
            assert (w[: n - 1] == 0).all()


def test_best_of_n_weights_for_large_N_and_bad_n():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = stats.best_of_n_weights(10_000, 100)
    assert w.shape == (10_000,) and np.isfinite(w).all() and (w >= 0).all()
    assert abs(w.sum() - 1) < 1e-9
    assert (w[:99] == 0).all() and w[99] > 0
    assert w[-1] == pytest.approx(100 / 10_000, rel=1e-9)  # the top sample: C(N−1, n−1)/C(N, n) = n/N
    with pytest.raises(ValueError):
        stats.best_of_n_weights(5, 6)
    with pytest.raises(ValueError):
        stats.best_of_n_weights(5, 0)


def _brute_best_of_n(proxy, values, n):
    """Mean over all n-subsets of the value of the subset's best sample; ties on the proxy broken at random (the
    tied maxima averaged)."""
    outcomes = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        outcomes.append(np.mean([values[i] for i in subset if proxy[i] == top]))
    return float(np.mean(outcomes))


def test_best_of_n_expectation_equals_the_mean_over_all_subsets():
    rng = np.random.default_rng(6)
    proxy, values = rng.normal(0, 1, 7), rng.normal(0, 1, 7)
    assert len(np.unique(proxy)) == 7
    ns = list(range(1, 8))
    got = stats.best_of_n_expectation(proxy, values, ns)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, [_brute_best_of_n(proxy, values, n) for n in ns], rtol=1e-12, atol=1e-12)
    assert got[0] == pytest.approx(values.mean(), abs=1e-12)
    assert got[-1] == pytest.approx(values[np.argmax(proxy)], abs=1e-12)
    # best-of-n against the proxy itself rises with n
    assert (np.diff(stats.best_of_n_expectation(proxy, proxy, ns)) > 0).all()
    with pytest.raises(ValueError):
        stats.best_of_n_expectation(proxy, values, [8])


def test_best_of_n_expectation_breaks_ties_at_random():
    proxy = np.array([0.9, 0.1, 0.5, 0.9, 0.5, 0.3, 0.9, 0.5])  # the top score shared by three samples
    values = np.array([1.0, -2.0, 3.0, 5.0, -1.0, 0.5, -4.0, 2.0])
    ns = list(range(1, 9))
    got = stats.best_of_n_expectation(proxy, values, ns)
    np.testing.assert_allclose(got, [_brute_best_of_n(proxy, values, n) for n in ns], rtol=1e-12, atol=1e-12)
    assert got[-1] == pytest.approx(np.mean([1.0, 5.0, -4.0]))
    # without the group means, the answer would depend on the order of the tied samples
    perm = np.random.default_rng(7).permutation(8)
    np.testing.assert_allclose(stats.best_of_n_expectation(proxy[perm], values[perm], ns), got, rtol=1e-12,
                               atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# KL of best-of-n


def test_kl_bound_values():
    assert stats.best_of_n_kl_bound(1) == 0.0
    assert stats.best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    arr = stats.best_of_n_kl_bound(np.array([1, 2, 8]))
    assert isinstance(arr, np.ndarray)
    np.testing.assert_allclose(arr, [0.0, math.log(2) - 0.5, math.log(8) - 7 / 8])
    with pytest.raises(ValueError):
        stats.best_of_n_kl_bound(0)


def test_kl_exact_matches_the_formula_for_a_near_continuous_reward():
    M = 20_000
    probs = np.full(M, 1 / M)
    rewards = np.random.default_rng(8).permutation(M).astype(float)
    assert stats.best_of_n_kl_exact(probs, rewards, 1) == 0.0
    for n in (1, 2, 4, 8, 16):
        assert stats.best_of_n_kl_exact(probs, rewards, n) == pytest.approx(stats.best_of_n_kl_bound(n), abs=1e-3)


def test_kl_exact_is_below_the_formula_with_atoms_or_ties():
    for n in (2, 3, 4, 8, 16):
        bound = stats.best_of_n_kl_bound(n)
        atoms = stats.best_of_n_kl_exact([0.5, 0.3, 0.2], [0.0, 1.0, 2.0], n)
        assert 0 < atoms < bound - 0.01, (n, atoms, bound)
        uniform, distinct = np.full(1000, 1e-3), np.arange(1, 501, dtype=float)
        top_tied = stats.best_of_n_kl_exact(uniform, np.concatenate([np.full(500, 1e3), distinct]), n)
        assert 0 < top_tied < bound - 0.01, (n, top_tied, bound)  # half share the highest reward
        bottom_tied = stats.best_of_n_kl_exact(uniform, np.concatenate([np.zeros(500), distinct]), n)
        assert 0 < bottom_tied < bound - 1e-6, (n, bottom_tied, bound)  # half share the lowest: below, barely
    # at most log(1/min π): with three outcomes the KL levels off while the formula grows without bound
    assert stats.best_of_n_kl_exact([0.5, 0.3, 0.2], [0.0, 1.0, 2.0], 1000) <= math.log(1 / 0.2) + 1e-12
    with pytest.raises(ValueError):
        stats.best_of_n_kl_exact([0.5, 0.3], [0.0, 1.0], 2)


def _brute_kl(probs, rewards, n):
    """KL(π_bon ‖ π) at the outcome level, π_bon by enumerating every n-tuple of draws; ties among the drawn
    maxima broken uniformly over the tied draws."""
    bon = np.zeros(len(probs))
    for draw in itertools.product(range(len(probs)), repeat=n):
        weight = math.prod(probs[i] for i in draw)
        top = max(rewards[i] for i in draw)
        winners = [i for i in draw if rewards[i] == top]
        for i in winners:
            bon[i] += weight / len(winners)
    ok = bon > 0
    return float(np.sum(bon[ok] * np.log(bon[ok] / np.asarray(probs)[ok])))


def test_kl_exact_equals_enumeration_of_all_draws():
    probs, rewards = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 2.0, 0.5]  # outcomes 1 and 2 tied at the top
    exact = stats.best_of_n_kl_exact(probs, rewards, 3)
    assert exact == pytest.approx(_brute_kl(probs, rewards, 3), rel=1e-12)
    assert exact < stats.best_of_n_kl_bound(3)
    # an outcome of probability 0 is ignored, even with the highest reward
    assert stats.best_of_n_kl_exact(probs + [0.0], rewards + [9.0], 3) == pytest.approx(exact, rel=1e-14)
    # without the tie the enumeration still agrees
    assert stats.best_of_n_kl_exact(probs, [1.0, 2.0, 3.0, 0.5], 3) == pytest.approx(
        _brute_kl(probs, [1.0, 2.0, 3.0, 0.5], 3), rel=1e-12)


def test_kl_plugin_bounds_ties_and_closed_form():
    rng = np.random.default_rng(9)
    N = 32
    proxy = np.round(rng.normal(0, 1, N), 1)  # some ties
    for n in (1, 2, 4, 8, 16, 32):
        kl = stats.best_of_n_kl_plugin(proxy, n)
        assert 0 <= kl <= stats.best_of_n_kl_bound(n) + 1e-12
        assert kl <= math.log(N) + 1e-12
    assert stats.best_of_n_kl_plugin(np.full(N, 0.3), 8) == 0.0
    # N distinct scores, n = N: Σ_i P_i log(N P_i) with P_i = (i/N)^N − ((i−1)/N)^N
    for N in (2, 5, 16):
        distinct = rng.permutation(N) * 0.1
        i = np.arange(1, N + 1)
        P = (i / N) ** N - ((i - 1) / N) ** N
        assert stats.best_of_n_kl_plugin(distinct, N) == pytest.approx(float(np.sum(P * np.log(N * P))), rel=1e-12)
    # many repeats of the best sample: far below the bound (log(1/0.75) against 1.84)
    repeats = np.array([5.0] * 12 + [1.0, 2.0, 3.0, 4.0])
    assert stats.best_of_n_kl_plugin(repeats, 16) < 0.5 * stats.best_of_n_kl_bound(16)


# ----------------------------------------------------------------------------------------------------------
# Gao et al.'s functional form


def test_fit_gao_form_recovers_the_coefficients():
    d = np.linspace(0.1, 2, 20)
    alpha, beta, r2 = stats.fit_gao_form(d, d * (1.3 - 0.4 * d))
    assert alpha == pytest.approx(1.3, abs=1e-8) and beta == pytest.approx(0.4, abs=1e-8)
    assert r2 == pytest.approx(1.0, abs=1e-10)
    noisy = d * (1.3 - 0.4 * d) + np.random.default_rng(10).normal(0, 0.01, len(d))
    alpha, beta, r2 = stats.fit_gao_form(d, noisy)
    assert alpha == pytest.approx(1.3, abs=0.05) and beta == pytest.approx(0.4, abs=0.05)
    assert 0.99 < r2 < 1
    assert math.isnan(stats.fit_gao_form(d, np.zeros_like(d))[2])
    with pytest.raises(ValueError):
        stats.fit_gao_form([0.0, 0.5, 0.5], [0.0, 1.0, 1.0])  # one distinct d > 0


# ----------------------------------------------------------------------------------------------------------
# paired differences


def test_paired_difference_estimate_and_constant_shift():
    rng = np.random.default_rng(11)
    clusters = np.repeat(np.arange(30), 3)
    a, b = rng.normal(0, 1, 90), rng.normal(0, 1, 90)
    est, lo, hi = stats.paired_difference(a, b, clusters)
    assert est == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert lo < est < hi
    est, lo, hi = stats.paired_difference(b + 0.5, b, clusters)
    assert (est, lo, hi) == pytest.approx((0.5, 0.5, 0.5), abs=1e-12)
    bad = a.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match=r"a\[7\]"):
        stats.paired_difference(bad, b, clusters)
    with pytest.raises(ValueError, match=r"b\[7\]"):
        stats.paired_difference(a, bad, clusters)


def test_paired_difference_detects_a_clear_shift():
    rng = np.random.default_rng(12)
    clusters = np.repeat(np.arange(50), 2)
    b = rng.normal(0, 1, 100)
    a = b + 0.5 + rng.normal(0, 0.05, 100)
    est, lo, hi = stats.paired_difference(a, b, clusters)
    assert 0 < lo < est < hi and lo == pytest.approx(0.5, abs=0.05)


def test_pairing_cancels_what_the_units_share():
    rng = np.random.default_rng(13)
    clusters = np.repeat(np.arange(40), 4)
    effect = np.repeat(rng.normal(0, 3, 40), 4)  # a large per-prompt effect shared by a and b
    a = effect + 0.3 + rng.normal(0, 0.2, 160)
    b = effect + rng.normal(0, 0.2, 160)
    _, a_lo, a_hi = stats.bootstrap_mean(a, clusters)
    _, b_lo, b_hi = stats.bootstrap_mean(b, clusters)
    assert a_lo < b_hi and b_lo < a_hi  # unpaired, the two intervals overlap
    est, lo, hi = stats.paired_difference(a, b, clusters)
    assert lo > 0 and est == pytest.approx(0.3, abs=0.1)  # paired, the difference is clear


def test_a_paired_interval_is_narrower_on_correlated_data_and_the_unpaired_width_on_independent_data():
    """The paired difference's interval against the unpaired one (a and b resampled over prompts independently):
    on units that share a prompt effect, pairing removes it and the interval shrinks; on independent units there is
    nothing to remove and the two widths agree."""
    rng = np.random.default_rng(21)
    clusters = np.repeat(np.arange(60), 2)

    def unpaired_width(a, b, n_boot=2000):
        ids = np.unique(clusters)
        by = {c: np.flatnonzero(clusters == c) for c in ids}
        draws = []
        for _ in range(n_boot):
            ia = np.concatenate([by[c] for c in rng.choice(ids, len(ids))])
            ib = np.concatenate([by[c] for c in rng.choice(ids, len(ids))])
            draws.append(a[ia].mean() - b[ib].mean())
        lo, hi = np.percentile(draws, [2.5, 97.5])
        return hi - lo

    shared = np.repeat(rng.normal(0, 2, 60), 2)
    a, b = shared + 0.2 + rng.normal(0, 0.5, 120), shared + rng.normal(0, 0.5, 120)
    _, lo, hi = stats.paired_difference(a, b, clusters, 2000)
    assert hi - lo < 0.5 * unpaired_width(a, b)
    a, b = rng.normal(0.2, 1, 120), rng.normal(0, 1, 120)
    _, lo, hi = stats.paired_difference(a, b, clusters, 2000)
    assert 0.75 < (hi - lo) / unpaired_width(a, b) < 1.25


def test_best_of_n_calls_a_fall_after_the_peak_over_optimisation_only_when_its_paired_interval_is_above_zero():
    """Gao et al.'s over-optimisation is a fall of the gold after its peak; a dip within noise is not one. The
    summary's ``bon/gold_drop`` is the fall from the peak to n = N paired by prompt, and the draft's wording follows
    its interval."""
    import pandas as pd

    from workbench.training import best_of_n
    from workbench.measurement import findings

    rng = np.random.default_rng(0)
    ns, ids = [1, 2, 4, 8], [f"p{i}" for i in range(60)]
    proxy = np.tile(np.array([0.0, 1.0, 2.0, 3.0]), (60, 1))
    real = np.array([0.0, 0.3, 0.5, 0.1]) + rng.normal(0, 0.05, (60, 4))  # peaks at 4, falls by 0.4
    noisy = np.array([0.0, 0.3, 0.4, 0.3]) + rng.normal(0, 0.3, (60, 4))  # its sample peaks at 4, a dip in noise
    verdicts = []
    for gold in (real, noisy):
        per = {"proxy": proxy, "gold": gold, "kl_plugin": np.zeros((60, 4))}
        rows, summary = best_of_n.summarize(per, ns, ids, n_boot=400, seed=0)
        peak = ns.index(summary["bon/gold_peak_n"])
        assert summary["bon/gold_drop"] == pytest.approx((gold[:, peak] - gold[:, -1]).mean())
        assert summary["bon/gold_drop_lo"] <= summary["bon/gold_drop"] <= summary["bon/gold_drop_hi"]
        assert summary["bon/gold_peak_n"] == 4
        verdicts.append(findings._overoptimised(pd.Series(summary)))
    assert verdicts == [True, False]


def test_the_two_level_bootstrap_covers_the_mean_over_prompts_and_seeds():
    """Seeds x prompts, as the main job scores every seed on one prompt set: y = μ + prompt effect + seed effect +
    noise. Across seeds, a t-interval sees the seed effects only and misses the prompts that happened to be drawn;
    the two-level bootstrap resamples both and covers μ at about its 95 %."""
    rng = np.random.default_rng(1)
    hits = {"two-level": 0, "t across seeds": 0}
    n, S, P = 200, 10, 40
    for r in range(n):
        a, b = rng.normal(0, 2, P), rng.normal(0, 0.2, S)
        per_seed = [{p: list(1.0 + a[p] + b[s] + rng.normal(0, 1, 2)) for p in range(P)} for s in range(S)]
        _, lo, hi = stats.two_level_bootstrap(per_seed, 400, r)
        hits["two-level"] += lo <= 1.0 <= hi
        _, lo, hi = stats.t_interval([np.mean([np.mean(v) for v in d.values()]) for d in per_seed])
        hits["t across seeds"] += lo <= 1.0 <= hi
    assert 0.90 <= hits["two-level"] / n <= 0.99, hits
    assert hits["t across seeds"] / n < 0.6, hits


def test_the_two_level_bootstrap_needs_shared_prompts():
    assert stats.two_level_bootstrap([{"a": [1.0, 3.0]}, {"a": [2.0], "b": [9.0]}], 50)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="share no prompt"):
        stats.two_level_bootstrap([{"a": [1.0]}, {"b": [2.0]}], 50)


def test_ties_count_half_in_every_accuracy():
    from workbench.modeling import scoring

    assert [scoring.ranked(1.0, 0.0), scoring.ranked(0.0, 1.0), scoring.ranked(0.25, 0.25)] == [1.0, 0.0, 0.5]
    assert list(stats.wins([1.0, 0.0, 0.25], [0.0, 1.0, 0.25])) == [1.0, 0.0, 0.5]  # as the win rates count them
