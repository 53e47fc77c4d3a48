"""The paper draft: a template (the prose, edited by people) with its ``{{placeholders}}`` filled from the results
table and the run folders (the numbers, never typed by hand). ``python -m workbench paper`` runs it.

Two templates, chosen by what the runs are (``build``): ``papers/template.md``, the known-gold study (the evaluation
read a gold-labelled dataset; its tables and findings are ``findings.py``'s), and ``papers/template-hh.md``, the
human-label study (grids/hh.yaml).

Placeholders of both: {{setup}}, {{results}}, {{compute}} (FLOPs, tokens, time; cost to reach the SFT policy's gold
reward), {{figures}} (every figure of ``figures.FIGURES``), {{caveats}} (what these numbers can and cannot show,
computed from them), {{generated}} (when and from what). The known-gold template adds {{arms}} (arm against arm,
paired), {{reward_models}}, {{best_of_n}} and {{findings}}.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
from pathlib import Path

import pandas as pd

from ..core import methods, settings
from ..measurement import findings
from ..measurement.results import aggregate, cost_to_reach, setting
from .figures import FIGURES

REPO = settings.REPO


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and (abs(x) >= 1e5 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _ci(row, m) -> str:
    if m not in row or pd.isna(row[m]):
        return "–"
    lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
    return _fmt(row[m]) + ("" if lo is None or pd.isna(lo) else f" [{_fmt(lo)}, {_fmt(hi)}]")


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _setup(table: pd.DataFrame) -> str:
    cfgs = [json.loads((Path(p) / "config.json").read_text()) for p in table["path"]]
    envs = [json.loads((Path(p) / "env.json").read_text()) for p in table["path"]]
    ev = json.loads((Path(table["path"].iloc[0]) / "eval" / table.attrs.get("eval_name", "default") / "config.json").read_text())
    models = sorted({c.get("model", {}).get("model_name_or_path", "?") for c, m in zip(cfgs, table["method"]) if methods.role(m) != "reward-model"})
    rms = sorted({c.get("model", {}).get("model_name_or_path", "?") for c, m in zip(cfgs, table["method"]) if methods.role(m) == "reward-model"})
    data = cfgs[0].get("data", {})
    n_train = sorted({str(c.get("data", {}).get("n_train")) for c in cfgs})
    versions = envs[0].get("packages", {})
    # the machine and the dtype "auto" chose there (env.json, since the dtype rule; older runs name the device only)
    device = sorted({f"{e['hardware']}, dtype auto = {e['dtype_auto']}" if e.get("hardware") else str(e.get("device", "?"))
                     for e in envs})
    return "\n".join([
        f"- **Policy model**: {', '.join(models)} (4-bit NF4 + LoRA unless the config says otherwise); "
        f"**reward-model backbone**: {', '.join(rms) or 'none trained here'}.",
        f"- **Data**: Anthropic HH-RLHF `{data.get('subset')}` / `{data.get('split')}`; training pairs per run: "
        f"{', '.join(n_train)} (None = all); held-out split: {data.get('heldout_fraction')} of prompts by a hash "
        f"seeded with split_seed {data.get('split_seed', 0)}, never trained on (checked per run).",
        f"- **Runs**: {len(table)} ({', '.join(f'{m} × {n}' for m, n in table['method'].value_counts().sort_index().items())}); "
        f"seeds {', '.join(str(s) for s in sorted(table['seed'].unique()))}.",
        f"- **Evaluation**: {ev['n_prompts']} held-out prompts × {ev['n_samples']} samples, temperature {ev['temperature']}, "
        f"top-p {ev['top_p']}, ≤ {ev['max_new_tokens']} new tokens, sampling seed {ev['seed']}; {ev['n_pairs']} held-out "
        f"pairs for preference accuracy; proxy RM `{_name(ev.get('proxy_reward_model'))}`, gold RM `{_name(ev.get('gold_reward_model'))}`; "
        f"intervals: 95% cluster bootstrap over prompts ({ev['n_bootstrap']} resamples) within a run; across seeds a "
        f"two-level bootstrap over prompts and seeds for gold, proxy, KL, length and the differences to SFT, a "
        f"t-interval across seeds for the rest.",
        f"- **Hardware and software**: {', '.join(device)}; " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                                          if k in ("torch", "transformers", "trl", "peft", "bitsandbytes")) + ".",
    ])


def _name(spec) -> str | None:
    """A reward model as the draft names it: a run folder by its name (the same on every machine), else the spec."""
    return Path(spec).name if spec and Path(spec).is_dir() else spec


def _results(agg: pd.DataFrame, table: pd.DataFrame | None = None) -> str:
    flag = _judge_not_above_length(table) if table is not None else None
    mark = " †" if flag else ""
    rows = []
    for _, r in agg.iterrows():
        rows.append([r["method"] + ("" if r["name"] == "default" else f" ({r['name']})"), _fmt(r["beta"]), r["seeds"],
                     _ci(r, "eval/gold"), _ci(r, "eval/kl"), _ci(r, "eval/kl_t1"), _fmt(r.get("eval/ended"), 2),
                     _ci(r, "win/chosen"), _ci(r, "win/chosen_lc"), _ci(r, "win/sft"), _ci(r, "pairs/accuracy")])
    out = markdown_table(rows, ["method", "β", "seeds", f"gold reward{mark}", "KL at T", "KL at T = 1", "ended",
                                f"win vs chosen{mark}", f"LC win vs chosen{mark}", f"win vs SFT{mark}", "pref. accuracy"])
    return out + (f"\n\n† {flag}" if flag else "")


def _judge_not_above_length(table: pd.DataFrame) -> str | None:
    """When the gold reward model that judges the win rates does not beat the length-only rule on the held-out pairs
    (its paired difference's 95% lower bound at or below 0), the sentence that flags every number it judged."""
    if table is None or not len(table) or "pairs/accuracy_vs_length_rule_lo" not in table:
        return None
    ev_path = Path(table["path"].iloc[0]) / "eval" / table.attrs.get("eval_name", "default") / "config.json"
    spec = json.loads(ev_path.read_text()).get("gold_reward_model") if ev_path.exists() else None
    if not spec or not Path(spec).is_dir():
        return None
    mine = table[table["path"].map(lambda p: Path(p).resolve() == Path(spec).resolve())]
    if not len(mine) or pd.isna(mine["pairs/accuracy_vs_length_rule_lo"].iloc[0]):
        return None
    r = mine.iloc[0]
    if r["pairs/accuracy_vs_length_rule_lo"] > 0:
        return None
    return (f"Judged by the gold reward model `{Path(spec).name}`, whose held-out accuracy does not beat the length-only "
            f"rule on the same pairs (paired difference {_ci(r, 'pairs/accuracy_vs_length_rule')}): these gold rewards "
            "and win rates may measure length as much as preference.")


def _compute(table: pd.DataFrame, agg: pd.DataFrame) -> str:
    rows = [[r["method"] + ("" if r["name"] == "default" else f" ({r['name']})"), _fmt(r["beta"]),
             _fmt(r.get("compute/flops")), _fmt(r.get("compute/pipeline_flops")), _fmt(r.get("compute/tokens_train")),
             _fmt(r.get("compute/tokens_generated")), _fmt(r.get("compute/train_s"))] for _, r in agg.iterrows()]
    out = markdown_table(rows, ["method", "β", "FLOPs (run)", "FLOPs (pipeline)", "trained tokens", "generated tokens",
                                "train time (s)"])
    if "eval/gold_vs_sft_lo" in table:  # paired: a run counts when its gold beats SFT's with an interval above 0
        cost = cost_to_reach(table[~table["method"].map(methods.role).isin(["start", "reward-model"])], 0.0, metric="eval/gold_vs_sft_lo",
                             strict=True)
        out += ("\n\nCost to beat the SFT policy's gold reward (the paired difference's 95% lower bound above 0): " +
                "; ".join(f"{r['setting']}: {_fmt(r['compute/pipeline_flops'])} FLOPs ({r['runs_reaching']}/{r['runs']} runs)"
                          for _, r in cost.iterrows()) + ".")
    else:  # a point estimate against SFT's mean is no comparison: without a paired difference, no cost to reach
        out += ("\n\nNo run has a gold difference to its SFT policy paired by prompt (the evaluation had no gold reward "
                "or no SFT run), so no cost to beat SFT is given.")
    return out


def _caveats(table: pd.DataFrame, agg: pd.DataFrame) -> str:
    pol = agg[agg["method"].map(methods.role) != "reward-model"]
    notes = []
    seeds = agg["n_seeds"].max() if len(agg) else 0
    if seeds < 3:
        notes.append(f"Each configuration has {seeds} seed(s): the intervals are within-run (prompt resampling) only, "
                     "and say nothing about seed-to-seed variation. Comparisons need ≥ 3 seeds.")
    if "win/chosen_lo" in table:
        straddle = ((table["win/chosen_lo"] <= 0.5) & (table["win/chosen_hi"] >= 0.5)).sum()
        notes.append(f"{straddle} of {table['win/chosen'].notna().sum()} runs have a win-rate interval against the chosen "
                     "responses that contains 0.5: they are not distinguishable from the dataset's answers by this judge.")
    arms = pol[pol["method"].map(methods.role) != "start"]
    if "eval/kl" in arms and len(arms):
        notes.append(f"The trained policies' mean KL to their references lies between {_fmt(arms['eval/kl'].min())} and "
                     f"{_fmt(arms['eval/kl'].max())} nats per response (the SFT row's KL is to the base model, not "
                     "comparable with the arms').")
    length = _length_baseline(table)
    if length:
        notes.append(length)
    flag = _judge_not_above_length(table)
    if flag:
        notes.append("† (Table of results) " + flag)
    notes.append(_what_moved(arms))
    return "\n".join(f"- {n}" for n in notes)


def _what_moved(arms: pd.DataFrame) -> str:
    """The closing caveat, from the numbers: which arms' gold reward differs from their SFT policy's by a paired 95 %
    interval that excludes 0; when none does, that no method was shown better than another."""
    m = "eval/gold_vs_sft"
    if f"{m}_lo" not in arms or arms[f"{m}_lo"].isna().all():
        return ("No arm has a paired gold difference to its SFT policy, so these numbers show that every arm trains and "
                "is evaluated by one protocol, not which method is better.")
    up = arms[arms[f"{m}_lo"] > 0]
    down = arms[arms[f"{m}_hi"] < 0]
    if not len(up) and not len(down):
        return (f"No arm's gold reward differs from its SFT policy's with a paired 95 % interval that excludes 0 (of "
                f"{len(arms)}): at this budget the methods are not distinguishable from noise, and none was shown better "
                "than another.")
    names = lambda rows: ", ".join(f"{setting(r)}: {_fmt(r[m])} [{_fmt(r[f'{m}_lo'])}, {_fmt(r[f'{m}_hi'])}]"  # noqa: E731
                                   for _, r in rows.iterrows())
    parts = [f"{len(up)} of {len(arms)} arms beat their SFT policy on gold with a paired 95 % interval above 0 ({names(up)})"
             if len(up) else f"none of {len(arms)} arms beat its SFT policy on gold with a paired 95 % interval above 0"]
    if len(down):
        parts.append(f"{len(down)} fell below it ({names(down)})")
    return "; ".join(parts) + ". Which of them is better than another needs their paired difference, not these."


def _length_baseline(table: pd.DataFrame) -> str:
    """The caveat on the length baseline: the length-only rule fitted on training pairs, its held-out accuracy
    beside "the longer response wins", and each reward model's accuracy against the fitted rule."""
    if "pairs/length_rule" not in table or table["pairs/length_rule"].isna().all():
        return ""
    row = table.dropna(subset=["pairs/length_rule"]).iloc[0]  # one evaluation: the same rule and pairs for every run
    ev = json.loads((Path(row["path"]) / "eval" / table.attrs.get("eval_name", "default") / "config.json").read_text())
    rule = row["pairs/length_rule"]
    text = (f"The length baseline is a length-only rule fitted on {int(row['pairs/length_rule_n_train'])} training pairs "
            f"({row['pairs/length_rule_fit']}; training accuracy {_fmt(row['pairs/length_rule_train_accuracy'])}; "
            f"lengths in tokens of `{ev.get('length_tokenizer')}`); its accuracy on the held-out pairs is "
            f"{_ci(row, 'pairs/length_rule')}, that of \"the longer response wins\" {_fmt(row['pairs/longer_wins'])}.")
    judges = [(name, acc) for name in ("gold", "proxy") if (acc := _judge_accuracy(table, ev, name)) is not None]
    if judges:
        ranks = "; ".join(f"the {name} reward model ranks the same pairs with accuracy {_fmt(acc)}, "
                          f"{(acc - rule) * 100:+.1f} points against the length-only rule" for name, acc in judges)
        text += f" {ranks[0].upper()}{ranks[1:]}: a reward model is only as good a judge as its margin over length."
    return text


def _judge_accuracy(table: pd.DataFrame, ev: dict, name: str) -> float | None:
    """The gold or proxy reward model's accuracy on the evaluation's pairs: its own row's, as the results table and
    the accuracy figure show it (pairs cut to the evaluation's max_length), when that reward model is a run of the
    table; else what the evaluation read through it as a judge (``pairs/<name>_rm_accuracy``)."""
    spec = ev.get(f"{name}_reward_model")
    if spec and Path(spec).is_dir() and "pairs/accuracy" in table:
        mine = table["path"].map(lambda p: Path(p).resolve() == Path(spec).resolve())
        if table.loc[mine, "pairs/accuracy"].notna().any():
            return table.loc[mine, "pairs/accuracy"].dropna().mean()
    key = f"pairs/{name}_rm_accuracy"
    return table[key].dropna().mean() if key in table and table[key].notna().any() else None


def _figure(name: str, fn, figures_dir: Path, here: Path) -> str:
    """A figure in Markdown: the PNG, its function's first docstring paragraph as caption, a link to the PDF."""
    caption = " ".join(fn.__doc__.split("\n\n")[0].split())
    png, pdf = (os.path.relpath(figures_dir / f"{name}.{ext}", here) for ext in ("png", "pdf"))
    return f"![{name}]({png})\n\n*{caption}* ([PDF]({pdf}))"


def build(table: pd.DataFrame, out: str | Path = REPO / "papers" / "draft.md", figures_dir: str | Path = REPO / "figures",
          template: str | Path | None = None) -> Path:
    """Fill the template from the results table; the figures are expected in ``figures_dir`` (``figures.export_all``).
    ``template``: None picks papers/template.md for a known-gold study, papers/template-hh.md otherwise."""
    out, figures_dir = Path(out), Path(figures_dir)
    agg = aggregate(table)
    dataset = findings.gold_dataset(table)
    template = Path(template or REPO / "papers" / ("template.md" if dataset else "template-hh.md"))
    figs = "\n\n".join(_figure(name, fn, figures_dir, out.parent) for name, fn in FIGURES.items())
    text = template.read_text()
    fill = {"compute": _compute(table, agg), "figures": figs,
            "generated": f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `python -m workbench paper` from {len(table)} "
                         f"run folders; edit `papers/{template.name}`, not this file."}
    if dataset is not None:
        fill.update({"setup": findings.setup(table, dataset), "results": findings.policies(agg),
                     "arms": findings.arms_table(table),
                     "reward_models": findings.reward_models(agg), "best_of_n": findings.best_of_n_table(table),
                     "findings": findings.findings(table), "caveats": findings.caveats(table)})
    else:
        fill.update({"setup": _setup(table), "results": _results(agg, table), "caveats": _caveats(table, agg)})
    for key, value in fill.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ValueError(f"{template}: unknown placeholder(s) left: {sorted(set(t.split('}}')[0] for t in text.split('{{')[1:]))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
