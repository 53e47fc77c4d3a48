"""The paper's figures, each a function of the results table (``results.results_table``) returning a plotly
Figure; ``export`` writes figures as PDF, SVG and PNG, ``export_all`` writes them all into ``figures/``.

Static export uses kaleido, which drives a system Chromium: on Debian/Ubuntu ``apt-get install chromium``
(``scripts/setup.sh`` does it when run as root); elsewhere any Chrome/Chromium on the PATH, or set
``BROWSER_PATH`` to one. Figures are never edited by hand: change the code, export again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core import methods, stats
from ..measurement.results import aggregate, setting
from ..modeling.runs import read_jsonl

FORMATS = ("pdf", "svg", "png")
_LAYOUT = dict(template="plotly_white", font=dict(size=13), width=720, height=440, legend=dict(orientation="v"))


def _err(agg: pd.DataFrame, m: str) -> dict:
    """Asymmetric error bars from ``<m>_lo``/``_hi``; none where the interval is missing (one seed)."""
    if f"{m}_lo" not in agg:
        return {}
    plus, minus = (agg[f"{m}_hi"] - agg[m]), (agg[m] - agg[f"{m}_lo"])
    return dict(type="data", symmetric=False, array=_or_none(plus), arrayminus=_or_none(minus))


def _or_none(x) -> list:
    """Half-widths with None where an interval is missing: plotly then draws no bar there (not a zero-width one)."""
    return [None if pd.isna(v) else float(v) for v in x]


def _seeds_note(agg: pd.DataFrame) -> str:
    seeds = sorted({s for x in agg.get("seeds", []) for s in str(x).split(",") if s})
    return (f"seeds {','.join(seeds)}; bars: 95% intervals, across seeds a two-level bootstrap over prompts and seeds<br>"
            "for gold, proxy, KL and length, a t-interval for the rest; one seed: a bootstrap over prompts"
            if seeds else "")  # two lines: one ran past a 720-pixel figure's edge


def _policies(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["method"].map(methods.role).isin(["reward-model"])] if len(table) else table


def _bon_rows(table: pd.DataFrame) -> list[tuple[pd.Series, pd.DataFrame]]:
    """(reward-model row, its best-of-n rows) for every reward model whose evaluation drew best-of-n against it."""
    out = []
    for _, r in table[table["method"].map(methods.role) == "reward-model"].iterrows() if len(table) else []:
        path = Path(r["path"]) / "eval" / table.attrs.get("eval_name", "default") / "best_of_n.jsonl"
        if path.exists():
            out.append((r, pd.DataFrame(read_jsonl(path))))
    return out


def _main_proxy(table: pd.DataFrame, bon: list) -> tuple | None:
    """The best-of-n of the proxy the RL arms optimised (the evaluation's proxy), else the first one."""
    if not bon:
        return None
    ev = Path(bon[0][0]["path"]) / "eval" / table.attrs.get("eval_name", "default") / "config.json"
    spec = json.loads(ev.read_text()).get("proxy_reward_model") if ev.exists() else None
    for r, rows in bon:
        if spec and Path(spec).exists() and Path(r["path"]).resolve() == Path(spec).resolve():
            return r, rows
    return bon[0]


def fig_frontier(table: pd.DataFrame) -> go.Figure:
    """Gold reward against KL(π‖π_ref) for every method, one point per evaluated adapter (each run's snapshots and its
    final adapter, from the SFT policy at KL 0), one curve per setting (method, name, β): the shape of Fig. 2 (left)
    of the DPO paper (arXiv:2305.18290). Best-of-n against the proxy at KL log n − (n−1)/n (an upper bound) from the
    same SFT samples' gold gains; the higher and further left, the better the trade-off. With several seeds: the
    mean per step with t-intervals, each seed's points faint.

    ``table``: the results table (its runs' snapshots are read from their folders), or a ``results.snapshot_table``
    already (it has a ``step`` column)."""
    from ..measurement.results import snapshot_table

    if "step" in table.columns or not len(table):
        snaps = table
    else:
        snaps = snapshot_table(list(table["path"]), table.attrs.get("eval_name", "default"))
    fig = go.Figure()
    if snaps is None or snaps.empty or "eval/gold" not in snaps:
        return fig.update_layout(title="Reward–KL frontier<br><sup>no evaluated policies</sup>", **_LAYOUT)
    sft = snaps[snaps["method"].map(methods.role) == "start"]
    sft_gold, sft_kl = (float(sft["eval/gold"].mean()), 0.0) if len(sft) else (None, None)
    arms = snaps[snaps["method"].map(methods.role) != "start"].copy()
    arms["setting"] = [setting(r) for _, r in arms.iterrows()]
    palette = ["#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
               "#BAB0AC"]
    for i, (name, g) in enumerate(arms.groupby("setting", sort=True)):
        colour = palette[i % len(palette)]
        per_step = g.groupby("step").agg(kl=("eval/kl", "mean"), gold=("eval/gold", "mean"), n=("seed", "nunique"))
        lo_hi = {s: (stats.t_interval(x["eval/gold"].tolist()), stats.t_interval(x["eval/kl"].tolist()))
                 for s, x in g.groupby("step")}
        xs = ([sft_kl] if sft_gold is not None else []) + per_step["kl"].tolist()
        ys = ([sft_gold] if sft_gold is not None else []) + per_step["gold"].tolist()
        if g["seed"].nunique() > 1:
            for seed, gs in g.groupby("seed"):
                fig.add_trace(go.Scatter(x=gs["eval/kl"], y=gs["eval/gold"], mode="markers", showlegend=False,
                                         marker=dict(color=colour, size=5, opacity=0.35), hoverinfo="skip"))
            ey = [None] * (len(xs) - len(per_step)) + _or_none([lo_hi[s][0][2] - m
                                                                for s, m in zip(per_step.index, per_step["gold"])])
            err = dict(type="data", array=ey, symmetric=True)
        else:  # one seed: the runs' own bootstrap intervals over prompts
            steps = g.sort_values("step")  # the SFT anchor (KL 0 by definition) gets no bar
            lo = [None] * (len(xs) - len(g)) + _or_none(steps["eval/gold"] - steps["eval/gold_lo"])
            hi = [None] * (len(xs) - len(g)) + _or_none(steps["eval/gold_hi"] - steps["eval/gold"])
            err = dict(type="data", array=hi, arrayminus=lo, symmetric=False)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line=dict(color=colour),
                                 error_y=err, text=["SFT"] * (len(xs) - len(per_step)) + [f"step {s}" for s in per_step.index],
                                 hovertemplate="%{text}: KL %{x:.2f}, gold %{y:.3f}<extra>" + name + "</extra>"))
    main = _main_proxy(table, _bon_rows(table))
    if main is not None and sft_gold is not None:
        r, rows = main
        fig.add_trace(go.Scatter(x=rows["kl_bound"], y=sft_gold + rows["gold_gain"], mode="lines+markers",
                                 name=f"best-of-n vs {r['name']} (KL bound)", line=dict(color="black", dash="dot"),
                                 text=[f"n={n}" for n in rows["n"]],
                                 error_y=dict(type="data", symmetric=False, array=(rows["gold_gain_hi"] - rows["gold_gain"]).tolist(),
                                              arrayminus=(rows["gold_gain"] - rows["gold_gain_lo"]).tolist())))
    seeds = ",".join(str(x) for x in sorted(snaps["seed"].dropna().unique()))
    note = (f"seeds {seeds}; one point per snapshot; bars: 95% intervals (bootstrap over prompts with one seed, t "
            "across seeds<br>with more); best-of-n: SFT's gold plus its gold gain on the dataset's held-out replies")
    fig.update_layout(title=f"Reward–KL frontier<br><sup>{note}</sup>",
                      xaxis_title="KL(π ‖ π_ref) at the sampling temperature, nats per response",
                      yaxis_title="gold reward (mean over samples)", **{**_LAYOUT, "width": 860, "height": 520})
    return fig


def fig_overoptimization(table: pd.DataFrame) -> go.Figure:
    """Over-optimisation (Gao et al. 2022, arXiv:2210.10760, Fig. 1), proxy and gold on one scale: each reward's gain
    over the SFT policy in standard deviations of its scores of SFT's replies (``bon/<reward>_sd``), against √KL.
    Left, best-of-n against each proxy reward model (trained on different numbers of gold-labelled pairs, some with
    label noise), KL = log n − (n−1)/n: the gold gain (solid, 95% intervals over prompts), the proxy's own gain
    (dashed) and the fitted R(d) = d(α − βd) of Gao et al. (thin). Right, the PPO runs as the evaluation measured
    them (each snapshot and the final adapter, the gold and proxy differences to SFT paired by prompt)."""
    from ..measurement.results import snapshot_table

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("best-of-n against each proxy (SFT's held-out replies)",
                                        "PPO, evaluated snapshots"))
    palette = ["#4C78A8", "#E45756", "#54A24B", "#F58518", "#B279A2", "#72B7B2"]
    bon = _bon_rows(table)
    units = {}
    for i, (r, rows) in enumerate(bon):
        colour = palette[i % len(palette)]
        summary = json.loads((Path(r["path"]) / "eval" / table.attrs.get("eval_name", "default") / "summary.json").read_text())
        sd = {k: summary.get(f"bon/{k}_sd") or 1.0 for k in ("gold", "proxy")}
        units.setdefault("gold", sd["gold"])
        pairs = json.loads((Path(r["path"]) / "summary.json").read_text()).get("train/pairs")
        tag = f"{r['name']} ({pairs} pairs)"
        d = rows["kl_bound"] ** 0.5
        g = rows["gold_gain"] / sd["gold"]
        fig.add_trace(go.Scatter(x=d, y=g, mode="lines+markers", name=f"best-of-n vs {tag}",
                                 line=dict(color=colour), legendgroup=tag,
                                 error_y=dict(type="data", symmetric=False, array=((rows["gold_gain_hi"] - rows["gold_gain"]) / sd["gold"]).tolist(),
                                              arrayminus=((rows["gold_gain"] - rows["gold_gain_lo"]) / sd["gold"]).tolist())), row=1, col=1)
        fig.add_trace(go.Scatter(x=d, y=rows["proxy_gain"] / sd["proxy"], mode="lines", name=f"proxy, best-of-n vs {tag}",
                                 line=dict(color=colour, dash="dash"), legendgroup=tag, showlegend=False), row=1, col=1)
        if "bon/fit_gold_alpha" in summary:
            grid = [x / 50 * float(d.max()) for x in range(51)]
            a, b = summary["bon/fit_gold_alpha"], summary["bon/fit_gold_beta"]
            fig.add_trace(go.Scatter(x=grid, y=[x * (a - b * x) / sd["gold"] for x in grid], mode="lines", showlegend=False,
                                     line=dict(color=colour, width=1), legendgroup=tag, hoverinfo="skip"), row=1, col=1)
    has_ppo = len(table) and (table["method"] == "ppo").any()
    snaps = snapshot_table(list(table["path"]), table.attrs.get("eval_name", "default")) if has_ppo else table.iloc[:0]
    proxy_sd = next((json.loads((Path(r["path"]) / "eval" / table.attrs.get("eval_name", "default") / "summary.json")
                                .read_text()).get("bon/proxy_sd") for r, _ in bon if _is_main(table, r)), None)
    for i, (key, g) in enumerate(snaps[snaps["method"] == "ppo"].groupby(["name", "seed"]) if len(snaps) else []):
        g = g.sort_values("step")
        colour = ["#F58518", "#B279A2", "#72B7B2", "#9D755D", "#FF9DA6", "#EECA3B"][i % 6]  # none of the left's
        cfg = json.loads((Path(g["path"].iloc[0]) / "config.json").read_text())
        target = "the gold" if cfg.get("reward_model") == cfg.get("gold_reward_model") else "the proxy"
        marker = dict(symbol="diamond" if target == "the gold" else "circle", size=8)
        tag = f"PPO against {target}{'' if key[0] in ('default', 'gt') else f' ({key[0]})'}, seed {key[1]}"
        x = [0.0] + (g["eval/kl"].clip(lower=0) ** 0.5).tolist()
        if "eval/gold_vs_sft" in g:
            y = [0.0] + (g["eval/gold_vs_sft"] / units.get("gold", 1.0)).tolist()
            err = dict(type="data", symmetric=False,
                       array=[0.0] + ((g["eval/gold_vs_sft_hi"] - g["eval/gold_vs_sft"]) / units.get("gold", 1.0)).tolist(),
                       arrayminus=[0.0] + ((g["eval/gold_vs_sft"] - g["eval/gold_vs_sft_lo"]) / units.get("gold", 1.0)).tolist())
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=tag, line=dict(color=colour), marker=marker,
                                     legendgroup=tag, error_y=err, text=["SFT"] + [f"step {s}" for s in g["step"]]),
                          row=1, col=2)
        if "eval/proxy_vs_sft" in g and proxy_sd:
            fig.add_trace(go.Scatter(x=x, y=[0.0] + (g["eval/proxy_vs_sft"] / proxy_sd).tolist(), mode="lines",
                                     name=f"proxy, {tag}", line=dict(color=colour, dash="dash"), legendgroup=tag,
                                     showlegend=False), row=1, col=2)
    fig.add_hline(y=0, line_color="gray", line_width=1)
    fig.update_xaxes(title_text="√KL(π ‖ π_ref), √nats")
    fig.update_yaxes(title_text="gain over SFT, in SDs of SFT's scores", row=1, col=1)
    fig.update_layout(title="Over-optimisation<br><sup>solid: gold; dashed: the proxy, in the same colour; thin: Gao et al.'s "
                      "d(α − βd) fitted to the gold; 95% intervals over prompts</sup>",
                      **{**_LAYOUT, "width": 1100, "height": 520})
    return fig


def _is_main(table: pd.DataFrame, r: pd.Series) -> bool:
    main = _main_proxy(table, _bon_rows(table))
    return main is not None and main[0]["path"] == r["path"]


def fig_win_rates(table: pd.DataFrame) -> go.Figure:
    """Win rate against the dataset's chosen responses and against the SFT policy, judged by the gold reward,
    raw and length-controlled (``stats.length_controlled_win_rate``), per method."""
    pol = _policies(table)
    cols = [c for c in ("win/chosen", "win/chosen_lc", "win/sft", "win/sft_lc") if c in pol]
    agg = aggregate(pol, cols)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("vs chosen response", "vs SFT policy"), shared_yaxes=True)
    labels = [setting(r) for _, r in agg.iterrows()]
    for col, (raw, lc) in enumerate((("win/chosen", "win/chosen_lc"), ("win/sft", "win/sft_lc")), start=1):
        for m, name, color in ((raw, "raw", "#4C78A8"), (lc, "length-controlled", "#F58518")):
            if m in agg:
                fig.add_trace(go.Bar(x=labels, y=agg[m], name=name, marker_color=color, error_y=_err(agg, m),
                                     showlegend=col == 1), row=1, col=col)
        fig.add_hline(y=0.5, line_dash="dot", line_color="gray", row=1, col=col)
    fig.update_layout(title=f"Win rate (gold reward)<br><sup>{_seeds_note(agg)}</sup>", barmode="group",
                      yaxis_title="win rate", yaxis_range=[0, 1], margin=dict(t=130), **_LAYOUT)  # room for two lines
    return fig


def fig_accuracy(table: pd.DataFrame) -> go.Figure:
    """Held-out preference accuracy of each arm's implicit reward and of the reward models, beside the length
    baseline on the same pairs: a length-only rule fitted on the training pairs (shaded: its interval), and the
    raw rate at which the longer response is the chosen one ("longer wins"); lengths in tokens of one tokenizer."""
    agg = aggregate(table, [c for c in ("pairs/accuracy", "pairs/length_rule", "pairs/longer_wins",
                                        "pairs/proxy_rm_accuracy", "pairs/gold_rm_accuracy") if c in table])
    fig = go.Figure(go.Bar(x=[setting(r) for _, r in agg.iterrows()], y=agg["pairs/accuracy"],
                           error_y=_err(agg, "pairs/accuracy"), name="implicit reward / RM", marker_color="#4C78A8"))
    cols = ["pairs/length_rule", "pairs/length_rule_lo", "pairs/length_rule_hi"]
    # the rule on the pairs the reward models ranked (every held-out pair), else on a policy's (EvalConfig.policy_pairs)
    ranked = table.sort_values("method", key=lambda m: m.map(methods.role) != "reward-model", kind="stable") if len(table) else table
    rule = ranked[cols].dropna() if set(cols) <= set(table) else table.iloc[:0]
    if len(rule):  # the same for every run of one evaluation: its value and its interval over pairs
        fig.add_hrect(y0=float(rule["pairs/length_rule_lo"].iloc[0]), y1=float(rule["pairs/length_rule_hi"].iloc[0]),
                      fillcolor="gray", opacity=0.12, line_width=0, layer="below")
    labels = [setting(r) for _, r in agg.iterrows()]
    for m, name, dash, colour in (("pairs/length_rule", "length-only rule (fitted on training pairs)", "dot", "black"),
                                  ("pairs/longer_wins", "longer wins", "longdashdot", "gray"),
                                  ("pairs/proxy_rm_accuracy", "proxy RM", "dash", "#E45756"),
                                  ("pairs/gold_rm_accuracy", "gold RM", "dashdot", "#54A24B")):
        if m in agg and agg[m].notna().any():  # reference lines in the legend: they lie too close to label in place
            rms = agg[agg["method"].map(methods.role) == "reward-model"][m].dropna()  # on every held-out pair, where reward models were ranked
            y = float(rms.iloc[0] if len(rms) else agg[m].dropna().iloc[0])
            fig.add_trace(go.Scatter(x=[labels[0], labels[-1]], y=[y, y], mode="lines", name=f"{name}: {y:.3f}",
                                     line=dict(dash=dash, color=colour, width=2)))
    fig.update_layout(title=f"Held-out preference accuracy<br><sup>{_seeds_note(agg)}</sup>",
                      yaxis_title="accuracy", yaxis_range=[0, 1], margin=dict(t=130), **_LAYOUT)
    return fig


def fig_cost(table: pd.DataFrame, level: float | None = None) -> go.Figure:
    """Gold reward against the training compute of the whole pipeline behind each run (its FLOPs plus its SFT
    run's and its reward model's; ``compute.py``), one point per run with its 95% interval over prompts: how much
    compute buys how much reward."""
    pol = _policies(table).dropna(subset=["compute/pipeline_flops", "eval/gold"]) if "eval/gold" in table else table.iloc[:0]
    fig = go.Figure()
    pol = pol.assign(setting=[setting(r) for _, r in pol.iterrows()])
    for name, g in pol.groupby("setting"):  # one colour per setting, as in the tables: PPO and PPO-GT apart
        fig.add_trace(go.Scatter(x=g["compute/pipeline_flops"], y=g["eval/gold"], mode="markers", name=name,
                                 error_y=_err(g, "eval/gold"),
                                 text=[f"{setting(r)} s{r['seed']}" for _, r in g.iterrows()], marker=dict(size=10)))
    if level is not None:
        fig.add_hline(y=level, line_dash="dot", annotation_text=f"level {level:g}")
    fig.update_layout(title="Gold reward against training compute<br><sup>pipeline FLOPs: the run, its SFT run and "
                      "its reward model (Kaplan et al. 2020 counting)<br>bars: each run's 95% interval over "
                      "prompts</sup>",
                      xaxis_type="log",
                      xaxis_title="training FLOPs (log)", yaxis_title="gold reward", **_LAYOUT)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figures of one run or of the data (the notebooks show them; not part of the paper set)

TRAINING_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "objective/scores", "objective/gold_scores",
                    "objective/kl", "rewards/proxy/mean", "kl", "accuracy")


def fig_training(run_path) -> go.Figure:
    """The run's logged curves over steps, those of ``TRAINING_METRICS`` it has, one panel each."""
    m = pd.DataFrame(read_jsonl(Path(run_path) / "metrics.jsonl"))
    have = [k for k in TRAINING_METRICS if k in m and m[k].notna().sum() > 0]
    fig = make_subplots(rows=1, cols=max(len(have), 1), subplot_titles=have or ["no metrics logged"])
    for i, k in enumerate(have, start=1):
        g = m[["step", k]].dropna()
        fig.add_trace(go.Scatter(x=g["step"], y=g[k], mode="lines+markers", name=k, showlegend=False), row=1, col=i)
    fig.update_layout(title=Path(run_path).name, template="plotly_white", height=320, width=max(360 * len(have), 480))
    return fig


def fig_data(examples: list[dict]) -> go.Figure:
    """HH-RLHF at a glance: turns per prompt, and response lengths of chosen and rejected (characters)."""
    turns = [len(ex["prompt"]) for ex in examples]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("messages in the prompt", "response length (characters)"))
    fig.add_trace(go.Histogram(x=turns, name="prompt messages", showlegend=False), row=1, col=1)
    for side in ("chosen", "rejected"):
        fig.add_trace(go.Histogram(x=[len(ex[side][0]["content"]) for ex in examples], name=side, opacity=0.6,
                                   nbinsx=60), row=1, col=2)
    fig.update_layout(barmode="overlay", title=f"{len(examples)} pairs", **_LAYOUT)
    return fig


def fig_gold_pairs(run_path) -> go.Figure:
    """A gold-labelled dataset at a glance: the gold score of every sample per part (left), and each pair's gold gap,
    chosen − rejected (right; below 0: a label the Bradley–Terry draw or the noise flipped)."""
    from ..training.gold_pairs import parts_of

    fig = make_subplots(rows=1, cols=2, subplot_titles=("gold score of each sample", "gold gap of each pair"))
    for part, samples in parts_of(run_path).items():
        if samples:
            fig.add_trace(go.Histogram(x=[s["gold"] for s in samples], name=part, opacity=0.6, nbinsx=40), row=1, col=1)
    pairs = read_jsonl(Path(run_path) / "pairs.jsonl")
    fig.add_trace(go.Histogram(x=[p["chosen_gold"] - p["rejected_gold"] for p in pairs], name="chosen − rejected",
                               nbinsx=40, marker_color="gray"), row=1, col=2)
    fig.update_layout(barmode="overlay", title=f"{Path(run_path).name}: {len(pairs)} pairs", **_LAYOUT)
    return fig


FIGURES = {"frontier": fig_frontier, "overoptimization": fig_overoptimization, "win_rates": fig_win_rates,
           "accuracy": fig_accuracy, "cost": fig_cost}


def export(figs: dict[str, go.Figure], out_dir: str | Path = "figures", formats=FORMATS) -> list[Path]:
    """Write each figure as ``<out_dir>/<name>.<format>`` for each format, through one browser session; a missing
    browser gets an error that says what to do."""
    import plotly.io as pio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(fig, out_dir / f"{name}.{fmt}") for name, fig in figs.items() for fmt in formats]
    try:
        # each at its layout's size (kaleido otherwise draws every figure at 700 x 500 and squeezes the wide ones)
        pio.write_images([f for f, _ in jobs], [p for _, p in jobs], width=[f.layout.width for f, _ in jobs],
                         height=[f.layout.height for f, _ in jobs])
    except Exception as e:  # kaleido's own message does not say how to get a browser without the internet
        if "chrome" in str(e).lower() or "browser" in str(e).lower():
            raise RuntimeError(f"Exporting figures to {out_dir} needs Chrome/Chromium for kaleido: `apt-get install "
                               "chromium` (Debian/Ubuntu), or set BROWSER_PATH to a Chrome binary.") from e
        raise
    return [p for _, p in jobs]


def export_all(table: pd.DataFrame, out_dir: str | Path = "figures", formats=FORMATS) -> list[Path]:
    """Every figure of ``FIGURES`` from one results table, into ``out_dir`` as ``<name>.<format>``."""
    return export({name: fn(table) for name, fn in FIGURES.items()}, out_dir, formats)
