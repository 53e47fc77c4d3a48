"""The paper's figures, each a function of the results table (``results.results_table``) returning a plotly
Figure; ``export`` writes figures as PDF, SVG and PNG, ``export_all`` writes them all into ``figures/``.

Static export uses kaleido, which drives a system Chromium: on Debian/Ubuntu ``apt-get install chromium``
(``scripts/setup.sh`` does it when run as root); elsewhere any Chrome/Chromium on the PATH, or set
``BROWSER_PATH`` to one. Figures are never edited by hand: change the code, export again.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .results import aggregate
from .runs import parse_run_name, read_jsonl

FORMATS = ("pdf", "svg", "png")
_LAYOUT = dict(template="plotly_white", font=dict(size=13), width=720, height=440, legend=dict(orientation="v"))


def _label(row) -> str:
    """"dpo β=0.1", with the run name when it is not "default" ("reward proxy")."""
    label = row["method"] if row.get("name", "default") == "default" else f"{row['method']} {row['name']}"
    beta = row.get("beta")
    return label if beta is None or (isinstance(beta, float) and math.isnan(beta)) else f"{label} β={beta:g}"


def _err(agg: pd.DataFrame, m: str) -> dict:
    """Asymmetric error bars from ``<m>_lo``/``_hi``; none where the interval is missing (one seed)."""
    if f"{m}_lo" not in agg:
        return {}
    plus, minus = (agg[f"{m}_hi"] - agg[m]), (agg[m] - agg[f"{m}_lo"])
    return dict(type="data", symmetric=False, array=plus.fillna(0).tolist(), arrayminus=minus.fillna(0).tolist())


def _seeds_note(agg: pd.DataFrame) -> str:
    seeds = sorted({s for x in agg.get("seeds", []) for s in str(x).split(",") if s})
    return (f"seeds {','.join(seeds)}; bars: 95% intervals, t across seeds, or with one seed the run's bootstrap "
            "over prompts" if seeds else "")


def _policies(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["method"].isin(["reward"])] if len(table) else table


def _recipe(reference) -> str | None:
    """A reference by its recipe: a run folder's method and name (``runs.parse_run_name``), the seed left out; any
    other reference (a model name) as it is."""
    if not isinstance(reference, str):
        return None
    try:
        parsed = parse_run_name(Path(reference).name)
    except ValueError:
        return reference
    return f"{parsed['method']}__{parsed['name']}"


def fig_frontier(table: pd.DataFrame) -> go.Figure:
    """Gold reward against KL(π‖π_ref), one curve per method over its β (the shape of Fig. 2 of the DPO paper,
    arXiv:2305.18290): the higher and further left, the better the trade-off."""
    pol = _policies(table)
    # KL is to each run's own reference. The references are told apart by their recipe (an SFT run's method and
    # name, whatever its seed: each seed's arms start from that seed's SFT run); runs with another recipe than the
    # most common one are left out (noted in the subtitle), and the SFT runs that are the kept runs' references sit
    # at KL 0 (the frontier's start)
    recipes = pol["reference"].map(_recipe)
    arms = pol["method"] != "sft"
    recipe = recipes[arms].mode().iloc[0] if recipes[arms].notna().any() else None
    kept = pol[arms & (recipes == recipe)] if recipe is not None else pol
    refs = {Path(r).resolve() for r in kept["reference"].dropna()} if recipe is not None else set()
    anchor = pol[pol["path"].map(lambda p: Path(p).resolve() in refs)].assign(**{"eval/kl": 0.0})
    dropped = len(pol) - len(kept) - len(anchor)
    agg = aggregate(pd.concat([anchor, kept]), ["eval/gold", "eval/kl"])
    note = _seeds_note(agg) + (f"; {dropped} run(s) with another reference left out" if dropped else "")
    fig = go.Figure()
    for method, g in agg.groupby("method"):
        g = g.sort_values("beta", na_position="first")
        fig.add_trace(go.Scatter(x=g["eval/kl"], y=g["eval/gold"], mode="lines+markers+text", name=method,
                                 text=[f"β={b:g}" if b is not None and not math.isnan(b) else "" for b in g["beta"]],
                                 textposition="top center", error_x=_err(g, "eval/kl"), error_y=_err(g, "eval/gold")))
    fig.update_layout(title=f"Reward–KL frontier<br><sup>{note}</sup>", xaxis_title="KL(π ‖ π_ref), nats per response",
                      yaxis_title="gold reward (mean over samples)", **_LAYOUT)
    return fig


def fig_overoptimization(table: pd.DataFrame) -> go.Figure:
    """Proxy and gold reward against √KL during PPO training (Gao et al. 2022, arXiv:2210.10760, Fig. 1): the proxy
    keeps rising while the gold reward peaks and falls, once the policy exploits the proxy."""
    fig = go.Figure()
    for _, row in table[table["method"] == "ppo"].iterrows():
        m = pd.DataFrame(read_jsonl(Path(row["path"]) / "metrics.jsonl"))
        if "objective/kl" not in m:
            continue
        x = m["objective/kl"].clip(lower=0) ** 0.5
        tag = f"{row['name']} s{row['seed']}"
        fig.add_trace(go.Scatter(x=x, y=m["objective/scores"], mode="lines+markers", name=f"proxy ({tag})"))
        if "objective/gold_scores" in m:
            fig.add_trace(go.Scatter(x=x, y=m["objective/gold_scores"], mode="lines+markers", name=f"gold ({tag})",
                                     line=dict(dash="dash")))
    fig.update_layout(title="Over-optimisation during PPO<br><sup>training rollouts, one point per iteration</sup>",
                      xaxis_title="√KL(π ‖ π_ref)", yaxis_title="reward", **_LAYOUT)
    return fig


def fig_win_rates(table: pd.DataFrame) -> go.Figure:
    """Win rate against the dataset's chosen responses and against the SFT policy, judged by the gold reward,
    raw and length-controlled (``stats.length_controlled_win_rate``), per method."""
    pol = _policies(table)
    cols = [c for c in ("win/chosen", "win/chosen_lc", "win/sft", "win/sft_lc") if c in pol]
    agg = aggregate(pol, cols)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("vs chosen response", "vs SFT policy"), shared_yaxes=True)
    labels = [_label(r) for _, r in agg.iterrows()]
    for col, (raw, lc) in enumerate((("win/chosen", "win/chosen_lc"), ("win/sft", "win/sft_lc")), start=1):
        for m, name, color in ((raw, "raw", "#4C78A8"), (lc, "length-controlled", "#F58518")):
            if m in agg:
                fig.add_trace(go.Bar(x=labels, y=agg[m], name=name, marker_color=color, error_y=_err(agg, m),
                                     showlegend=col == 1), row=1, col=col)
        fig.add_hline(y=0.5, line_dash="dot", line_color="gray", row=1, col=col)
    fig.update_layout(title=f"Win rate (gold reward)<br><sup>{_seeds_note(agg)}</sup>", barmode="group",
                      yaxis_title="win rate", yaxis_range=[0, 1], **_LAYOUT)
    return fig


def fig_accuracy(table: pd.DataFrame) -> go.Figure:
    """Held-out preference accuracy of each arm's implicit reward and of the reward models, beside the length
    baseline on the same pairs: a length-only rule fitted on the training pairs (shaded: its interval), and the
    raw rate at which the longer response is the chosen one ("longer wins"); lengths in tokens of one tokenizer."""
    agg = aggregate(table, [c for c in ("pairs/accuracy", "pairs/length_rule", "pairs/longer_wins",
                                        "pairs/proxy_rm_accuracy", "pairs/gold_rm_accuracy") if c in table])
    fig = go.Figure(go.Bar(x=[_label(r) for _, r in agg.iterrows()], y=agg["pairs/accuracy"],
                           error_y=_err(agg, "pairs/accuracy"), name="implicit reward / RM", marker_color="#4C78A8"))
    rule = table[["pairs/length_rule", "pairs/length_rule_lo", "pairs/length_rule_hi"]].dropna() \
        if {"pairs/length_rule", "pairs/length_rule_lo", "pairs/length_rule_hi"} <= set(table) else table.iloc[:0]
    if len(rule):  # the same for every run of one evaluation: its value and its interval over pairs
        fig.add_hrect(y0=float(rule["pairs/length_rule_lo"].iloc[0]), y1=float(rule["pairs/length_rule_hi"].iloc[0]),
                      fillcolor="gray", opacity=0.12, line_width=0, layer="below")
    labels = [_label(r) for _, r in agg.iterrows()]
    for m, name, dash, colour in (("pairs/length_rule", "length-only rule (fitted on training pairs)", "dot", "black"),
                                  ("pairs/longer_wins", "longer wins", "longdashdot", "gray"),
                                  ("pairs/proxy_rm_accuracy", "proxy RM", "dash", "#E45756"),
                                  ("pairs/gold_rm_accuracy", "gold RM", "dashdot", "#54A24B")):
        if m in agg and agg[m].notna().any():  # reference lines in the legend: they lie too close to label in place
            y = float(agg[m].dropna().iloc[0])
            fig.add_trace(go.Scatter(x=[labels[0], labels[-1]], y=[y, y], mode="lines", name=f"{name}: {y:.3f}",
                                     line=dict(dash=dash, color=colour, width=2)))
    fig.update_layout(title=f"Held-out preference accuracy<br><sup>{_seeds_note(agg)}</sup>",
                      yaxis_title="accuracy", yaxis_range=[0, 1], **_LAYOUT)
    return fig


def fig_cost(table: pd.DataFrame, level: float | None = None) -> go.Figure:
    """Gold reward against the training compute of the whole pipeline behind each run (its FLOPs plus its SFT
    run's and its reward model's; ``compute.py``), one point per run: how much compute buys how much reward."""
    pol = _policies(table).dropna(subset=["compute/pipeline_flops", "eval/gold"]) if "eval/gold" in table else table.iloc[:0]
    fig = go.Figure()
    for method, g in pol.groupby("method"):
        fig.add_trace(go.Scatter(x=g["compute/pipeline_flops"], y=g["eval/gold"], mode="markers", name=method,
                                 text=[f"{_label(r)} s{r['seed']}" for _, r in g.iterrows()], marker=dict(size=10)))
    if level is not None:
        fig.add_hline(y=level, line_dash="dot", annotation_text=f"level {level:g}")
    fig.update_layout(title="Gold reward against training compute<br><sup>pipeline FLOPs: the run, its SFT run and "
                      "its reward model (Kaplan et al. 2020 counting)</sup>", xaxis_type="log",
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
        pio.write_images([f for f, _ in jobs], [p for _, p in jobs])
    except Exception as e:  # kaleido's own message does not say how to get a browser without the internet
        if "chrome" in str(e).lower() or "browser" in str(e).lower():
            raise RuntimeError(f"Exporting figures to {out_dir} needs Chrome/Chromium for kaleido: `apt-get install "
                               "chromium` (Debian/Ubuntu), or set BROWSER_PATH to a Chrome binary.") from e
        raise
    return [p for _, p in jobs]


def export_all(table: pd.DataFrame, out_dir: str | Path = "figures", formats=FORMATS) -> list[Path]:
    """Every figure of ``FIGURES`` from one results table, into ``out_dir`` as ``<name>.<format>``."""
    return export({name: fn(table) for name, fn in FIGURES.items()}, out_dir, formats)
