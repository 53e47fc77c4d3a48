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

from ..core import console, methods, stats
from ..modeling.runs import read_eval, read_jsonl, run_info, run_paths

log = console.logger(__name__)


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


_SAME_SAMPLING = ("prompt_ids", "n_samples", "temperature", "top_p", "max_new_tokens", "seed", "gold_reward_model")


def vs_sft(gens: list[dict], base_gens: list[dict], n_boot: int, seed: int) -> dict:
    """A policy's samples against its SFT policy's on the same (prompt, sample index), judged by the gold: the win
    rate (raw and length-controlled, ``win/sft*``) and the paired differences of gold and proxy reward,
    ``eval/gold_vs_sft`` and ``eval/proxy_vs_sft``, each a cluster bootstrap over prompts (``stats.paired_difference``)."""
    theirs = {(g["id"], g["sample"]): g for g in base_gens}
    pairs = [(g, theirs[(g["id"], g["sample"])]) for g in gens if (g["id"], g["sample"]) in theirs]
    if not pairs or pairs[0][0].get("gold_score") is None:
        return {}
    clusters = [a["id"] for a, _ in pairs]
    w = stats.wins([a["gold_score"] for a, _ in pairs], [b["gold_score"] for _, b in pairs])
    d = [a["response_tokens"] - b["response_tokens"] for a, b in pairs]  # tokens, as every length metric
    out = stats.win_rate_summary(w, d, clusters, "win/sft", n_boot, seed)
    for key, name in (("gold_score", "gold"), ("score", "proxy")):
        if pairs[0][0].get(key) is not None and pairs[0][1].get(key) is not None:
            est, lo, hi = stats.paired_difference([a[key] for a, _ in pairs], [b[key] for _, b in pairs], clusters,
                                                  n_boot, seed)
            out.update({f"eval/{name}_vs_sft": est, f"eval/{name}_vs_sft_lo": lo, f"eval/{name}_vs_sft_hi": hi})
    return out


def _win_vs(ev: dict, base: dict, n_boot: int, seed: int) -> dict:
    """``vs_sft`` of two evaluations, when they sampled the same prompts the same way."""
    if any(ev["config"].get(k) != base["config"].get(k) for k in _SAME_SAMPLING):
        return {}
    return vs_sft(ev["generations"], base["generations"], n_boot, seed)


def results_table(runs, eval_name: str = "default") -> pd.DataFrame:
    """One row per run folder in ``runs`` (a runs root, one run folder or a list: ``runs.run_paths``) that has the
    evaluation ``eval_name`` (others are listed and skipped)."""
    rows, evals, skipped = [], {}, []
    for p in run_paths(runs):
        if run_info(p)["is_dataset"]:  # a gold-labelled dataset: no model, no evaluation
            continue
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
                     "compute/pipeline_flops": _pipeline_flops(p), **budget(p, ev["config"].get("gold_reward_model"))})
    if skipped:
        log.info(f"[results] {len(skipped)} run(s) without evaluation '{eval_name}' left out: {', '.join(skipped)}")
    sft_rows = [r for r in rows if methods.role(r["method"]) == "start"]
    for r in rows:
        if methods.role(r["method"]) in ("start", "reward-model"):
            continue
        base = _baseline_sft(r, sft_rows)
        if base is not None:
            cfg = evals[r["path"]]["config"]
            r.update(_win_vs(evals[r["path"]], evals[base["path"]], cfg["n_bootstrap"], cfg["seed"]))
            r["baseline_run"] = base["run"]
    # one order whoever asks (a sweep passes its runs in job order, a runs root is read sorted by folder name), so the
    # tables, figures and draft of one set of runs come out the same from the main job and from ``workbench paper``
    rows.sort(key=lambda r: (setting(r), r["seed"] is None, r["seed"] or 0, r["run"]))
    table = pd.DataFrame(rows)
    table = table.drop(columns=["config"]) if len(table) else table
    table.attrs["eval_name"] = eval_name
    return table


def _gold_dataset(path) -> Path | None:
    source = (json.loads((Path(path) / "config.json").read_text()).get("data") or {}).get("source")
    return Path(source) if source and (Path(source) / "pairs.jsonl").is_file() and (Path(source) / "summary.json").is_file() \
        else None


def budget(run_path, gold_spec: str | None = None) -> dict:
    """What a run consumed of the known-gold study's budget, so that arms can be compared at equal budgets:

    ``budget/gold_pairs``: gold-labelled pairs it learnt from, directly (an arm trained on a gold-labelled dataset's
    pairs) or through its reward model (the pairs that reward model was trained on); ``budget/gold_queries``: gold
    scores it asked for while training (an RL arm or online DPO whose reward is the gold itself: one per sample);
    ``budget/tokens_generated``: tokens it sampled itself plus those sampled to build the dataset part its pairs or
    its reward model's pairs came from."""
    run_path = Path(run_path)
    cfg = json.loads((run_path / "config.json").read_text())
    summary = json.loads((run_path / "summary.json").read_text()) if (run_path / "summary.json").exists() else {}
    out = {"budget/gold_pairs": 0, "budget/gold_queries": 0,
           "budget/tokens_generated": _compute(run_path).get("compute/tokens_generated", 0) or 0}

    def dataset_part(run, half):  # (pairs used, tokens generated for that part) of a run trained on a gold dataset
        source = _gold_dataset(run)
        if source is None:
            return 0, 0
        part = {"a": "proxy", "b": "policy"}.get(half)
        counts = json.loads((source / "summary.json").read_text())["counts"]
        tokens = counts[part]["tokens_generated"] if part else sum(c["tokens_generated"] for c in counts.values())
        used = json.loads((run / "summary.json").read_text()).get("train/pairs", 0) if (run / "summary.json").exists() else 0
        return used, tokens

    half = (cfg.get("data") or {}).get("half")
    reward = cfg.get("reward_model")
    if reward and (Path(reward) / "config.json").exists():  # learnt through a reward model trained on gold pairs
        rm_half = (json.loads((Path(reward) / "config.json").read_text()).get("data") or {}).get("half")
        used, tokens = dataset_part(Path(reward), rm_half)
        out["budget/gold_pairs"] += used
        out["budget/tokens_generated"] += tokens
    elif reward and gold_spec and reward == gold_spec:  # the gold itself is the reward: one query per sample scored
        out["budget/gold_queries"] += summary.get("train/reward_queries", 0)
    if not methods.of(run_info(run_path)["method"]).rl:  # an arm that samples its own replies reads no dataset pairs
        used, tokens = dataset_part(run_path, half)  # the pairs themselves
        out["budget/gold_pairs"] += used
        out["budget/tokens_generated"] += tokens
    return out


def snapshot_table(runs, eval_name: str = "default") -> pd.DataFrame:
    """One row per evaluated policy adapter: every snapshot a run saved part-way (``checkpoints/step-<n>``, evaluated
    into ``eval/<name>/steps/``) and its final adapter (``final`` True), with the step, the gold and proxy reward and
    the KL with their intervals, the signs of hacking, and the paired gold difference to the run's SFT policy
    (``eval/gold_vs_sft``). The SFT runs that are other runs' references appear once, at step 0 with KL 0: the
    frontier's start. What the reward–KL frontier plots."""
    table = results_table(runs, eval_name)
    if table.empty:
        return table
    keep = [c for c in table.columns if c.split("/")[0] == "eval" or c in ("run", "path", "method", "name", "seed",
                                                                          "beta", "reference", "baseline_run")]
    sft_evals = {r["run"]: read_eval(r["path"], eval_name) for _, r in table[table["method"].map(methods.role) == "start"].iterrows()}
    rows = []
    for _, r in table[~table["method"].map(methods.role).isin(["reward-model"])].iterrows():
        final = {k: r[k] for k in keep if k in r}
        done = json.loads((Path(r["path"]) / "summary.json").read_text())  # in the unit its snapshots count: PPO's
        steps = done.get("train/iterations") or done.get("train/rounds") or done.get("train/steps")  # iterations, ...
        rows.append({**final, "step": 0 if methods.role(r["method"]) == "start" else steps, "final": True})
        if methods.role(r["method"]) == "start":
            rows[-1]["eval/kl"] = 0.0  # the frontier's start: KL to itself
        base = sft_evals.get(r.get("baseline_run"))
        folder = Path(r["path"]) / "eval" / eval_name / "steps"
        for sub in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []:
            snap = json.loads((sub / "summary.json").read_text())
            row = {**{k: final[k] for k in ("run", "path", "method", "name", "seed", "beta", "reference", "baseline_run")
                      if k in final}, **{k: v for k, v in snap.items() if k != "step"}, "step": snap["step"], "final": False}
            if base is not None:
                cfg = base["config"]
                row.update(vs_sft(read_jsonl(sub / "generations.jsonl"), base["generations"], cfg["n_bootstrap"], cfg["seed"]))
            rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["method", "name", "seed", "step"], kind="stable").reset_index(drop=True)


# per-sample quantities whose interval across seeds is a two-level bootstrap (prompts, then seeds): metric -> the
# generations' key, and whether it is the paired difference to the SFT policy's sample on the same prompt and index
TWO_LEVEL = {"eval/gold": ("gold_score", False), "eval/proxy": ("score", False), "eval/kl": ("kl", False),
             "eval/kl_t1": ("kl_t1", False),
             "eval/response_tokens": ("response_tokens", False), "eval/gold_vs_sft": ("gold_score", True),
             "eval/proxy_vs_sft": ("score", True)}


def aggregate(table: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Per method, run name and β (runs that differ only in their seed): the mean of each metric across seeds with
    an interval (``<metric>_lo``/``_hi``), the number of seeds, which seeds, and which kind of interval
    (``interval``). Every seed is scored on the same prompts, so for the per-sample quantities (``TWO_LEVEL``: gold,
    proxy, KL, length, and the paired differences to SFT) the interval is a two-level bootstrap over prompts and
    seeds (``stats.two_level_bootstrap``); for the rest (accuracies, win rates, compute) a t-interval across seeds,
    which covers training noise on this one prompt set only. With one seed, that run's own cluster-bootstrap
    interval over prompts where it has one (NaN otherwise)."""
    if table.empty:
        return table
    metrics = metrics or [c for c in table.columns if c.split("/")[0] in ("eval", "win", "pairs", "compute", "budget", "bon")
                          and not c.endswith(("_lo", "_hi", "_n")) and pd.api.types.is_numeric_dtype(table[c])]
    generations = _generations_reader(table)
    out = []
    for (method, name, beta), g in table.groupby(["method", "name", table["beta"].fillna(-1)], sort=True):
        row = {"method": method, "name": name, "beta": None if beta == -1 else beta, "n_seeds": g["seed"].nunique(),
               "seeds": ",".join(str(s) for s in sorted(g["seed"].unique()))}
        two_level = []
        for m in metrics:
            mean, lo, hi = stats.t_interval(g[m].tolist())
            if len(g) == 1 and f"{m}_lo" in g:  # one run: its own cluster-bootstrap interval over prompts
                lo, hi = g[f"{m}_lo"].iloc[0], g[f"{m}_hi"].iloc[0]
            elif len(g) > 1 and m in TWO_LEVEL:
                per_seed = [_per_prompt(generations, r, *TWO_LEVEL[m]) for _, r in g.iterrows()]
                if all(per_seed):
                    mean, lo, hi = stats.two_level_bootstrap(per_seed)
                    two_level.append(m)
            row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
        row["interval"] = ("bootstrap over prompts" if len(g) == 1 else
                           "t across seeds" + (f"; {', '.join(two_level)}: two-level bootstrap over prompts and seeds"
                                               if two_level else ""))
        out.append(row)
    return pd.DataFrame(out)


def _generations_reader(table: pd.DataFrame):
    """run name -> its evaluation's generations (read once, on first use)."""
    paths = dict(zip(table["run"], table["path"])) if {"run", "path"} <= set(table.columns) else {}
    cache: dict = {}

    def read(run: str, beside: str | None = None) -> list[dict] | None:
        if run not in cache:  # a run not in the table (its SFT run, filtered out) is looked for beside the row's
            path = paths.get(run) or (str(Path(beside).parent / run) if beside else None)
            try:
                cache[run] = read_eval(path, table.attrs.get("eval_name", "default"))["generations"]
            except (TypeError, FileNotFoundError):
                cache[run] = None
        return cache[run]

    return read


def _per_prompt(generations, row, key: str, vs_sft: bool) -> dict:
    """prompt id -> one run's values of ``key`` there (or, ``vs_sft``, its paired differences to its SFT run's sample
    of the same prompt and index); {} when they cannot be read."""
    gens = generations(row["run"])
    if not gens or gens[0].get(key) is None:
        return {}
    base = {}
    if vs_sft:
        base_run = row.get("baseline_run")
        base_gens = generations(base_run, row["path"]) if isinstance(base_run, str) else None
        if not base_gens:
            return {}
        base = {(b["id"], b["sample"]): b[key] for b in base_gens}
    out: dict = {}
    for g in gens:
        if vs_sft and (g["id"], g["sample"]) not in base:
            continue
        out.setdefault(g["id"], []).append(float(g[key]) - (base[(g["id"], g["sample"])] if vs_sft else 0.0))
    return out


def setting(row) -> str:
    """"dpo β=0.1", "ppo (gt) β=0.05", "reward (proxy)": a run's setting (method, run name, β), seeds apart."""
    beta = row.get("beta")
    no_beta = beta is None or (isinstance(beta, float) and np.isnan(beta))
    name = row.get("name", "default")
    shown = name not in ("default", None) and (no_beta or name != f"beta{beta:g}")  # a sweep's "beta0.05" says β again
    label = row["method"] + (f" ({name})" if shown else "")
    return label if no_beta else f"{label} β={beta:g}"


def paired_arms(table: pd.DataFrame, key: str = "gold_score", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every two policy settings A and B (SFT excluded: each arm's difference to it is ``eval/gold_vs_sft``),
    compared paired: on each seed both ran, A's sample minus B's on the same evaluation prompt and sample index (the
    evaluation draws them with the same seeds), averaged per prompt; then ``stats.two_level_bootstrap`` over prompts
    (drawn once, shared by the seeds) and seeds, which with one seed is the cluster bootstrap over prompts. What the
    two arms share on a prompt cancels before the interval is drawn, so the interval is that of the difference, not
    two overlapping intervals. Columns: a, b, seeds (the seeds both ran), estimate, lo, hi, n_prompts; ``key`` is the
    generations' value compared ("gold_score", "score" for the proxy, "kl", ...)."""
    cols = ["a", "b", "seeds", "estimate", "lo", "hi", "n_prompts"]
    pol = table[~table["method"].map(methods.role).isin(["start", "reward-model"])] if len(table) else table
    if pol.empty:
        return pd.DataFrame(columns=cols)
    generations = _generations_reader(table)
    by_setting: dict = {}
    for _, r in pol.iterrows():
        gens = generations(r["run"])
        if gens and gens[0].get(key) is not None:
            by_setting.setdefault(setting(r), {})[int(r["seed"])] = {(g["id"], g["sample"]): float(g[key]) for g in gens}
    names = sorted(by_setting)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(by_setting[a]) & set(by_setting[b]))
            per_seed = []
            for s in seeds:
                x, y = by_setting[a][s], by_setting[b][s]
                d: dict = {}
                for unit in sorted(set(x) & set(y)):
                    d.setdefault(unit[0], []).append(x[unit] - y[unit])
                if d:
                    per_seed.append(d)
            if not per_seed:
                continue
            est, lo, hi = stats.two_level_bootstrap(per_seed, n_boot, seed)
            out.append({"a": a, "b": b, "seeds": ",".join(map(str, seeds)), "estimate": est, "lo": lo, "hi": hi,
                        "n_prompts": len(set.intersection(*(set(d) for d in per_seed)))})
    return pd.DataFrame(out, columns=cols)


def cost_to_reach(table: pd.DataFrame, level: float, metric: str = "eval/gold",
                  cost: str = "compute/pipeline_flops", strict: bool = False) -> pd.DataFrame:
    """Per setting (``setting``: as the tables name them, so PPO against the gold apart from PPO against the proxy):
    the least ``cost`` among its runs whose ``metric`` reached ``level`` (above it, with ``strict``; NaN when none
    did), and how many runs reached it. With ``metric="eval/gold_vs_sft_lo"``, level 0 and ``strict``, a run counts
    when it beats its SFT policy with a paired interval above 0."""
    out = []
    runs = table[table["method"].map(methods.role) != "reward-model"]
    if not len(runs) or metric not in runs or cost not in runs:
        return pd.DataFrame(out)
    for name, g in runs.assign(setting=[setting(r) for _, r in runs.iterrows()]).groupby("setting"):
        ok = g[g[metric] > level] if strict else g[g[metric] >= level]
        out.append({"setting": name, "method": g["method"].iloc[0], "level": level, "runs": len(g),
                    "runs_reaching": len(ok), cost: ok[cost].min() if len(ok) else np.nan})
    return pd.DataFrame(out)
