"""The results table: one row per evaluated run (method × β × seed), read from run folders only, and its
aggregates per method and β across seeds. The figures (``figures.py``) and the paper read this table.

Columns of ``results_table``: run, path, method, name, seed, beta, reference; every number of the run's
``eval/<name>/summary.json`` (``eval/gold``, ``eval/kl``, ``win/chosen``, ``pairs/accuracy``, ... with their
``_lo``/``_hi`` intervals), among them the length baseline: ``pairs/length_rule`` (the length-only rule fitted on
training pairs, in words ``pairs/length_rule_fit``) and ``pairs/longer_wins`` (the raw "longer response is chosen"
rate), lengths in tokens of the evaluation's one tokenizer; ``win/sft*``, the win rate against the SFT policy on the same prompts (raw and
length-controlled, judged by the gold reward); ``compute/*`` from the run's compute.json, and
``compute/pipeline_flops``, the run's FLOPs plus those of the runs it depends on (its SFT run and its reward model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .runs import read_eval, run_info, run_paths


def _compute(run_path: Path) -> dict:
    path = run_path / "compute.json"
    if not path.exists():
        return {}
    c = json.loads(path.read_text())
    return {"compute/flops": c["flops"]["total"], "compute/train_s": c.get("wall_time_s"),
            **{f"compute/tokens_{k}": v for k, v in c["tokens"].items()}}


def _pipeline_flops(run_path: Path) -> float | None:
    """FLOPs of the run and of the run folders it used: its SFT run and its reward model (when those are runs).
    Upstream runs finished before this one started, so the recursion ends."""
    own = _compute(run_path).get("compute/flops")
    if own is None:
        return None
    cfg = json.loads((run_path / "config.json").read_text())
    upstream = [Path(u) for u in (cfg.get("sft_run"), cfg.get("reward_model")) if u and (Path(u) / "compute.json").exists()]
    return own + sum(_pipeline_flops(u) for u in upstream)


def _baseline_sft(row: dict, sft_rows: list[dict]) -> dict | None:
    """The SFT run to compare a policy with: its own starting point, else the SFT run of the same seed, else any."""
    own = row["config"].get("sft_run")
    for pick in (lambda r: own and Path(r["path"]).resolve() == Path(own).resolve(),
                 lambda r: r["seed"] == row["seed"], lambda r: True):
        found = [r for r in sft_rows if pick(r)]
        if found:
            return found[0]
    return None


def _win_vs(ev: dict, base: dict, n_boot: int, seed: int) -> dict:
    """Win rate of one evaluation's samples against another's on the same (prompt, sample index), by gold reward."""
    same = ("prompt_ids", "n_samples", "temperature", "top_p", "max_new_tokens", "seed", "gold_reward_model")
    if any(ev["config"].get(k) != base["config"].get(k) for k in same):
        return {}
    theirs = {(g["id"], g["sample"]): g for g in base["generations"]}
    pairs = [(g, theirs[(g["id"], g["sample"])]) for g in ev["generations"] if (g["id"], g["sample"]) in theirs]
    if not pairs or pairs[0][0].get("gold_score") is None:
        return {}
    w = stats.wins([a["gold_score"] for a, _ in pairs], [b["gold_score"] for _, b in pairs])
    d = [a["response_tokens"] - b["response_tokens"] for a, b in pairs]  # tokens, as every length metric
    return stats.win_rate_summary(w, d, [a["id"] for a, _ in pairs], "win/sft", n_boot, seed)


def results_table(runs, eval_name: str = "default") -> pd.DataFrame:
    """One row per run folder in ``runs`` (a runs root, one run folder or a list: ``runs.run_paths``) that has the
    evaluation ``eval_name`` (others are listed and skipped)."""
    rows, evals, skipped = [], {}, []
    for p in run_paths(runs):
        try:
            ev = read_eval(p, eval_name)
        except FileNotFoundError:
            skipped.append(p.name)
            continue
        info = run_info(p)
        evals[str(p)] = ev
        rows.append({"run": p.name, "path": str(p), "method": info["method"], "name": p.name.split("__")[1],
                     "seed": info["seed"], "beta": info["beta"], "reference": info["reference"],
                     "config": info["config"], **ev["summary"], **_compute(p),
                     "compute/pipeline_flops": _pipeline_flops(p)})
    if skipped:
        print(f"[results] {len(skipped)} run(s) without evaluation '{eval_name}' left out: {', '.join(skipped)}")
    sft_rows = [r for r in rows if r["method"] == "sft"]
    for r in rows:
        if r["method"] in ("sft", "reward"):
            continue
        base = _baseline_sft(r, sft_rows)
        if base is not None:
            cfg = evals[r["path"]]["config"]
            r.update(_win_vs(evals[r["path"]], evals[base["path"]], cfg["n_bootstrap"], cfg["seed"]))
            r["baseline_run"] = base["run"]
    table = pd.DataFrame(rows)
    table = table.drop(columns=["config"]) if len(table) else table
    table.attrs["eval_name"] = eval_name
    return table


def aggregate(table: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Per method, run name and β (runs that differ only in their seed): the mean of each metric across seeds with
    a t-interval (``<metric>_lo``/``_hi``); with one seed, that run's own bootstrap interval over prompts where it
    has one (NaN otherwise). Also the number of seeds, which seeds, and which kind of interval (``interval``)."""
    if table.empty:
        return table
    metrics = metrics or [c for c in table.columns if c.split("/")[0] in ("eval", "win", "pairs", "compute")
                          and not c.endswith(("_lo", "_hi", "_n")) and pd.api.types.is_numeric_dtype(table[c])]
    out = []
    for (method, name, beta), g in table.groupby(["method", "name", table["beta"].fillna(-1)], sort=True):
        row = {"method": method, "name": name, "beta": None if beta == -1 else beta, "n_seeds": g["seed"].nunique(),
               "seeds": ",".join(str(s) for s in sorted(g["seed"].unique()))}
        row["interval"] = "t across seeds" if len(g) > 1 else "bootstrap over prompts"
        for m in metrics:
            mean, lo, hi = stats.t_interval(g[m].tolist())
            if len(g) == 1 and f"{m}_lo" in g:  # one run: its own cluster-bootstrap interval over prompts
                lo, hi = g[f"{m}_lo"].iloc[0], g[f"{m}_hi"].iloc[0]
            row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
        out.append(row)
    return pd.DataFrame(out)


def cost_to_reach(table: pd.DataFrame, level: float, metric: str = "eval/gold",
                  cost: str = "compute/pipeline_flops") -> pd.DataFrame:
    """Per method: the least ``cost`` among its runs whose ``metric`` reached ``level`` (NaN when none did), and
    how many runs reached it."""
    out = []
    for method, g in table[table["method"] != "reward"].groupby("method"):
        if metric not in g or cost not in g:
            continue
        ok = g[g[metric] >= level]
        out.append({"method": method, "level": level, "runs": len(g), "runs_reaching": len(ok),
                    cost: ok[cost].min() if len(ok) else np.nan})
    return pd.DataFrame(out)
