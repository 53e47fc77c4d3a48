"""Best-of-n against a proxy reward, measured by the gold: the over-optimisation curve of Gao et al. 2022
(arXiv:2210.10760, §3.1 and Fig. 1), computed from one set of N samples per prompt without sampling again.

For each held-out prompt of a gold-labelled dataset (``gold_pairs``: N replies of the SFT policy, each with its gold
score) the proxy reward model scores the N replies; then for n = 1, 2, 4, ..., N:

  * E[proxy] and E[gold] of the reply best-of-n would pick, by the unbiased estimator of Nakano et al. 2021
    (arXiv:2112.09332, App. I) that Gao et al. use: sort the prompt's N replies by proxy ascending, weight the i-th by
    C(i−1, n−1)/C(N, n) (``stats.best_of_n_expectation``; ties in the proxy broken at random in expectation);
  * KL(π_bon ‖ π): the usual log n − (n−1)/n, an upper bound that is exact only for a continuous reward without ties
    (Beirami et al. 2024, arXiv:2401.01879), and beside it the plug-in value on the N replies
    (``stats.best_of_n_kl_plugin``), a lower estimate that shows how much repeated replies and proxy ties (a 135M
    model repeats itself) take off the bound;
  * the gains over n = 1 (the SFT policy's own mean: scores centred on the initial policy, as in Gao et al.),
    per prompt and then averaged, with 95% intervals from a bootstrap over prompts; and the fitted functional form
    R(d) = d(α − βd) with d = √KL (``stats.fit_gao_form``, Gao et al. Eq. 1) for proxy and gold.

``evaluate(rm_run, dataset, ...)`` returns the rows (one per n) and summary metrics (``bon/...``); the evaluation
writes them into the reward model's ``eval/<name>/best_of_n.jsonl`` and summary.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core import stats
from . import gold_pairs


def ns_up_to(N: int) -> list[int]:
    """1, 2, 4, ..., and N itself."""
    return sorted({2**i for i in range(int(math.log2(N)) + 1)} | {N})


def curves(groups: list[tuple[np.ndarray, np.ndarray]], ns: list[int]) -> dict[str, np.ndarray]:
    """Per prompt (rows) and n (columns): E[proxy] and E[gold] of best-of-n against the proxy and the plug-in KL.
    ``groups``: one (proxy scores, gold scores) pair of arrays per prompt, each of N samples."""
    proxy = np.array([stats.best_of_n_expectation(p, p, ns) for p, _ in groups])
    gold = np.array([stats.best_of_n_expectation(p, g, ns) for p, g in groups])
    kl = np.array([[stats.best_of_n_kl_plugin(p, n) for n in ns] for p, _ in groups])
    return {"proxy": proxy, "gold": gold, "kl_plugin": kl}


def summarize(per_prompt: dict[str, np.ndarray], ns: list[int], prompt_ids: list[str], n_boot: int = 1000,
              seed: int = 0) -> tuple[list[dict], dict]:
    """(rows, summary) from ``curves``' per-prompt arrays: for each n the means with bootstrap intervals over prompts,
    the gains over n = 1 (paired per prompt), the KL bound and plug-in estimate; the fitted R(d) = d(α − βd)."""
    rows = []
    bound = stats.best_of_n_kl_bound(np.array(ns))
    for j, n in enumerate(ns):
        row = {"n": n, "kl_bound": float(bound[j]), "kl_plugin": float(per_prompt["kl_plugin"][:, j].mean())}
        for key in ("proxy", "gold"):
            v = per_prompt[key]
            est, lo, hi = stats.bootstrap_mean(v[:, j], prompt_ids, n_boot, seed)
            gain, glo, ghi = stats.bootstrap_mean(v[:, j] - v[:, 0], prompt_ids, n_boot, seed)
            row.update({key: est, f"{key}_lo": lo, f"{key}_hi": hi,
                        f"{key}_gain": gain, f"{key}_gain_lo": glo, f"{key}_gain_hi": ghi})
        rows.append(row)
    summary = {"bon/N": ns[-1], "bon/prompts": len(prompt_ids)}
    d = np.sqrt(bound)
    for key in ("proxy", "gold"):
        gains = np.array([r[f"{key}_gain"] for r in rows])
        if len(ns) >= 3:
            alpha, beta, r2 = stats.fit_gao_form(d[1:], gains[1:])
            summary.update({f"bon/fit_{key}_alpha": alpha, f"bon/fit_{key}_beta": beta, f"bon/fit_{key}_r2": r2})
        last = rows[-1]
        summary.update({f"bon/{key}_gain_at_N": last[f"{key}_gain"], f"bon/{key}_gain_at_N_lo": last[f"{key}_gain_lo"],
                        f"bon/{key}_gain_at_N_hi": last[f"{key}_gain_hi"]})
    best = max(rows, key=lambda r: r["gold"])
    summary.update({"bon/gold_peak_n": best["n"], "bon/kl_bound_at_N": rows[-1]["kl_bound"],
                    "bon/kl_plugin_at_N": rows[-1]["kl_plugin"]})
    # the gold's fall from its peak to n = N, paired per prompt: over-optimisation only where its interval is above 0
    j = ns.index(best["n"])
    drop = stats.bootstrap_mean(per_prompt["gold"][:, j] - per_prompt["gold"][:, -1], prompt_ids, n_boot, seed)
    summary.update({"bon/gold_drop": drop[0], "bon/gold_drop_lo": drop[1], "bon/gold_drop_hi": drop[2]})
    return rows, summary


def evaluate(rm_run, dataset, gold_spec: str | None = None, n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], dict]:
    """Best-of-n against the reward model of ``rm_run`` over the held-out ("eval") samples of the gold-labelled
    ``dataset``, measured by the gold scores the dataset recorded (its recipe's gold must be ``gold_spec`` when one is
    given). Returns (rows, summary); the summary also says how often a prompt's replies repeat or tie on the proxy."""
    from ..modeling.rewards import load_reward

    gold_pairs.check_recipe(dataset, gold=gold_spec, check_policy=False, who="this evaluation")
    samples = gold_pairs.parts_of(dataset)["eval"]
    if not samples:
        raise ValueError(f"{Path(dataset).name} has no held-out (eval) samples to draw best-of-n from.")
    proxy = load_reward(str(rm_run), name="proxy")
    scores = proxy.score([s["prompt"] for s in samples], [s["completion"] for s in samples]).numpy()
    by_prompt: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s["id"], []).append(i)
    N = min(len(v) for v in by_prompt.values())
    ids = sorted(by_prompt)
    groups = [(scores[by_prompt[k][:N]], np.array([samples[i]["gold"] for i in by_prompt[k][:N]])) for k in ids]
    ns = ns_up_to(N)
    rows, summary = summarize(curves(groups, ns), ns, ids, n_boot, seed)
    texts = [[samples[i]["completion"] for i in by_prompt[k][:N]] for k in ids]
    summary["bon/prompts_with_repeats"] = float(np.mean([len(set(t)) < N for t in texts]))
    summary["bon/prompts_with_proxy_ties"] = float(np.mean([len(np.unique(p)) < N for p, _ in groups]))
    # the spread of SFT's replies under each reward: the unit in which proxy and gold gains are compared (figures)
    summary["bon/proxy_sd"] = float(np.concatenate([p for p, _ in groups]).std(ddof=1))
    summary["bon/gold_sd"] = float(np.concatenate([g for _, g in groups]).std(ddof=1))
    return rows, summary
