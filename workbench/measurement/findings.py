"""The known-gold study's tables and findings, for the paper draft (``paper.build``): every sentence a number from
the results table (``results.results_table``), the snapshot table (``results.snapshot_table``) or a gold-labelled
dataset's run folder, with its seeds and its 95% interval, and a pointer to the table or figure it comes from.

Tables: ``setup`` (model, dataset recipe, arms, seeds, evaluation), ``policies`` (Table 1: per setting, the gold
reward, its paired difference to SFT, KL, the proxy, the signs of hacking, the budget), ``reward_models`` (Table 2:
held-out accuracy on gold-labelled pairs beside the length-only rule, paired), ``best_of_n`` (Table 3). Findings:
``findings`` states, against the DPO paper's Fig. 2 (left) and Gao et al. 2022, what was and what was not found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..core import methods
from ..modeling.runs import read_jsonl
from .results import aggregate, paired_arms, setting, snapshot_table



def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int,)) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):,}"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"


def _ci(row, m: str, digits: int = 3) -> str:
    if m not in row or pd.isna(row[m]):
        return "–"
    lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
    return _f(row[m], digits) + ("" if lo is None or pd.isna(lo) else f" [{_f(lo, digits)}, {_f(hi, digits)}]")


def _excludes_zero(row, m: str) -> bool | None:
    lo, hi = row.get(f"{m}_lo"), row.get(f"{m}_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return None
    return lo > 0 or hi < 0




def gold_dataset(table: pd.DataFrame) -> Path | None:
    """The gold-labelled dataset the evaluation read (its ``data.source``), if the study is a known-gold one."""
    for p in table["path"] if len(table) else []:
        ev = Path(p) / "eval" / table.attrs.get("eval_name", "default") / "config.json"
        if ev.exists():
            source = (json.loads(ev.read_text()).get("data") or {}).get("source")
            if source and (Path(source) / "pairs.jsonl").is_file():
                return Path(source)
    return None


# ----------------------------------------------------------------------------------------------------------
# Tables


def setup(table: pd.DataFrame, dataset: Path) -> str:
    cfgs = {p: json.loads((Path(p) / "config.json").read_text()) for p in table["path"]}
    envs = [json.loads((Path(p) / "env.json").read_text()) for p in table["path"]]
    ev = json.loads((Path(table["path"].iloc[0]) / "eval" / table.attrs.get("eval_name", "default") / "config.json")
                    .read_text())
    recipe = json.loads((dataset / "config.json").read_text())
    counts = json.loads((dataset / "summary.json").read_text())["counts"]
    described = json.loads((dataset / "summary.json").read_text())["describe"]
    policies = sorted({c["model"]["model_name_or_path"] for p, c in cfgs.items()
                       if methods.role(table.set_index("path").loc[p, "method"]) != "reward-model"})
    rms = sorted({c["model"]["model_name_or_path"] for p, c in cfgs.items()
                  if methods.role(table.set_index("path").loc[p, "method"]) == "reward-model"})
    device = sorted({f"{e['hardware']}, dtype auto = {e['dtype_auto']}" if e.get("hardware") else str(e.get("device"))
                     for e in envs})
    versions = envs[0].get("packages", {})
    seeds = ", ".join(str(s) for s in sorted(table["seed"].unique()))
    parts = "; ".join(f"{part}: {c['prompts']} prompts × {c['samples'] // max(c['prompts'], 1)} replies → {c['pairs']} "
                      f"pairs ({c['ties_dropped']} ties dropped, {c['flipped']} flipped)" for part, c in counts.items())
    arms = ", ".join(f"{setting(r)} × {n}" for (_, r), n in
                     ((next(g.iterrows()), len(g)) for _, g in table.groupby(["method", "name", table["beta"].fillna(-1)])))
    return "\n".join([
        f"- **Policy**: {', '.join(policies)} in NF4 4-bit with a LoRA adapter; every arm starts from the SFT adapter "
        f"({_sft_steps(table)} steps on HH-RLHF's chosen replies), which is also its reference π_ref. **Proxy reward models**: "
        f"{', '.join(rms)}, fully fine-tuned as Bradley–Terry models on gold-labelled pairs.",
        f"- **Gold**: `{recipe['gold']}` (docs/gold.md: the sentiment of the reply, not harmlessness). **Dataset** "
        f"`{dataset.name}`: the SFT policy's replies to HH-RLHF harmless-base prompts of ≤ {recipe['max_prompt_length']} "
        f"tokens, temperature {recipe['temperature']}, ≤ {recipe['max_new_tokens']} new tokens, labelled by the gold's "
        f"Bradley–Terry model at temperature {recipe['label_temperature']} (0: the higher gold wins), label noise "
        f"{recipe['label_noise']}, tie margin {recipe['tie_margin']}; {parts}. Within-prompt share of the gold's "
        f"variance {_f(described['proxy']['gold_within_prompt_variance_share'], 2)} (proxy part); the longer reply is the "
        f"chosen one in {_f(described['proxy']['longer_wins'], 2)} of the proxy part's pairs.",
        "- **Prompts never shared**: the proxies train on the proxy part (prompt half a), the policy arms on the policy "
        "part (half b: DPO, IPO, KTO pairs; PPO's and online DPO's prompts), and everything is evaluated on the held-out "
        "part (the fixed 10% split no run trains on).",
        f"- **Runs**: {len(table)} ({arms}); seeds {seeds}.",
        f"- **Evaluation**: {ev['n_prompts']} held-out prompts × {ev['n_samples']} samples, temperature "
        f"{ev['temperature']}, ≤ {ev['max_new_tokens']} new tokens, sampling seed {ev['seed']}, for every policy and every "
        f"snapshot it saved; gold `{ev['gold_reward_model']}`, proxy `{Path(str(ev['proxy_reward_model'])).name}`; "
        f"{ev['n_pairs']} held-out gold-labelled pairs for accuracies; KL(π‖π_ref) = Σ_t log π − log π_ref over each "
        f"sample (the same estimator for every arm), at the sampling temperature T = {ev['temperature']} (\"KL at T\": "
        f"the distributions sampled) and at T = 1 (the models' own, the KL DPO's β constrains), both over replies cut "
        f"at {ev['max_new_tokens']} tokens (\"ended\": the share that ended before); intervals: 95% cluster bootstrap over prompts "
        f"({ev['n_bootstrap']} resamples) for one seed; across seeds a two-level bootstrap over prompts and seeds for "
        f"gold, proxy, KL, length and the differences to SFT, a t-interval across seeds for the rest; differences to "
        f"SFT are paired by prompt and sample.",
        f"- **Hardware and software**: {', '.join(device)}; " + ", ".join(
            f"{k} {v}" for k, v in versions.items() if k in ("torch", "transformers", "trl", "peft", "bitsandbytes")) + ".",
    ])


def _markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def policies(agg: pd.DataFrame) -> str:
    """Table 1: one row per policy setting (final adapters). The arms' KL is to their SFT policy (their reference);
    the SFT row's, to the base model, is marked so and not comparable with theirs."""
    pol = agg[agg["method"].map(methods.role) != "reward-model"]
    to_base = lambda r, m: ("to the base: " if methods.role(r["method"]) == "start" else "") + _ci(r, m, 2)  # noqa: E731
    rows = [[setting(r), r["seeds"], _ci(r, "eval/gold"), _ci(r, "eval/gold_vs_sft"), to_base(r, "eval/kl"),
             to_base(r, "eval/kl_t1"), _ci(r, "eval/proxy_vs_sft", 2), _f(r.get("eval/response_tokens"), 1), _f(r.get("eval/ended"), 2),
             _f(r.get("eval/distinct2"), 2), _f(r.get("budget/gold_pairs"), 0), _f(r.get("budget/gold_queries"), 0),
             _f(r.get("budget/tokens_generated"), 0)] for _, r in pol.iterrows()]
    return _markdown(rows, ["setting", "seeds", "gold", "gold − SFT (paired)", "KL at T", "KL at T = 1", "proxy − SFT (paired)",
                            "tokens", "ended", "distinct-2", "gold pairs", "gold queries", "tokens generated"])


def arms_table(table: pd.DataFrame) -> str:
    """Table 1b: every two policy settings' gold difference, paired by prompt and sample (``results.paired_arms``)."""
    pairs = paired_arms(table)
    if pairs.empty:
        return "(fewer than two policy settings with gold scores: no arm-against-arm comparison)"
    rows = [[r["a"], r["b"], r["seeds"], _ci({"d": r["estimate"], "d_lo": r["lo"], "d_hi": r["hi"]}, "d"),
             "yes" if r["lo"] > 0 or r["hi"] < 0 else "no"] for _, r in pairs.iterrows()]
    return _markdown(rows, ["A", "B", "seeds", "gold A − B (paired)", "interval excludes 0"])


def reward_models(agg: pd.DataFrame) -> str:
    """Table 2: every reward model on the held-out gold-labelled pairs, beside the length-only rule on the same pairs."""
    rms = agg[agg["method"].map(methods.role) == "reward-model"]
    rows = [[setting(r), _f(r.get("budget/gold_pairs"), 0), _ci(r, "pairs/accuracy"), _ci(r, "pairs/length_rule"),
             _ci(r, "pairs/accuracy_vs_length_rule"), _f(r.get("pairs/longer_wins"))] for _, r in rms.iterrows()]
    return _markdown(rows, ["reward model", "gold pairs trained on", "held-out accuracy", "length-only rule",
                            "accuracy − length rule (paired)", "longer wins"])


def best_of_n_table(table: pd.DataFrame) -> str:
    """Table 3: best-of-n against each proxy, from the SFT policy's held-out replies."""
    rows = []
    for _, r in table[table["method"].map(methods.role) == "reward-model"].iterrows():
        bon = Path(r["path"]) / "eval" / table.attrs.get("eval_name", "default") / "best_of_n.jsonl"
        if not bon.exists():
            continue
        last = read_jsonl(bon)[-1]
        rows.append([setting(r), str(last["n"]), f"{_f(last['kl_bound'], 2)} / {_f(last['kl_plugin'], 2)}",
                     _ci({k: last[k] for k in ("proxy_gain", "proxy_gain_lo", "proxy_gain_hi")}, "proxy_gain", 2),
                     _ci({k: last[k] for k in ("gold_gain", "gold_gain_lo", "gold_gain_hi")}, "gold_gain"),
                     str(int(r.get("bon/gold_peak_n"))) if pd.notna(r.get("bon/gold_peak_n")) else "–",
                     f"{_f(r.get('bon/fit_gold_alpha'))}, {_f(r.get('bon/fit_gold_beta'))}",
                     f"{_f(r.get('bon/prompts_with_repeats'), 2)} / {_f(r.get('bon/prompts_with_proxy_ties'), 2)}"])
    return _markdown(rows, ["proxy", "N", "KL at N: bound / plug-in", "proxy gain at N", "gold gain at N",
                            "gold peaks at n", "gold fit α, β", "prompts with repeats / proxy ties"])


# ----------------------------------------------------------------------------------------------------------
# Findings


def _best_points(snaps: pd.DataFrame) -> dict:
    """{setting: (KL, gold, step)} of each setting's point with the highest mean gold (over seeds, per step)."""
    out = {}
    arms = snaps[snaps["method"].map(methods.role) != "start"]
    for key, g in arms.groupby(arms.apply(setting, axis=1)):
        per_step = g.groupby("step").agg(kl=("eval/kl", "mean"), gold=("eval/gold", "mean"))
        best = per_step["gold"].idxmax()
        out[key] = (float(per_step.loc[best, "kl"]), float(per_step.loc[best, "gold"]), int(best))
    return out


def findings(table: pd.DataFrame) -> str:
    """The findings, each with its numbers, intervals and source (Table 1–3, the figures), against the DPO paper and
    Gao et al.: the proxy against the length rule, every preference-trained arm against SFT, the frontier, PPO
    against the gold, best-of-n and over-optimisation, the signs of hacking."""
    agg = aggregate(table)
    seeds = sorted(table["seed"].unique())
    interval = ("a 95% cluster bootstrap over the evaluation prompts" if len(seeds) == 1 else
                f"across seeds {', '.join(map(str, seeds))}: for gold, proxy, KL, length and the differences to SFT a "
                "two-level bootstrap over the evaluation prompts and the seeds; for accuracies and win rates a "
                "t-interval across seeds (it covers training noise on one set of evaluation prompts)")
    out = [f"Seeds: {', '.join(map(str, seeds))}; every interval below is {interval}."]

    # --- the proxy against the length rule (Table 2)
    for _, r in agg[agg["method"].map(methods.role) == "reward-model"].iterrows():
        margin = r.get("pairs/accuracy_vs_length_rule")
        if pd.isna(margin):
            continue
        verdict = ("at least 0.10 above it" if margin >= 0.10 else "less than 0.10 above it" if margin > 0
                   else "not above it")
        out.append(f"**{setting(r)}** ranks the held-out gold-labelled pairs with accuracy {_ci(r, 'pairs/accuracy')}, "
                   f"against {_ci(r, 'pairs/length_rule')} for the length-only rule fitted on the training pairs: "
                   f"{verdict} (paired difference {_ci(r, 'pairs/accuracy_vs_length_rule')}; Table 2).")

    # --- every preference-trained arm against SFT (Table 1)
    pol = agg[(agg["method"].map(methods.role) != "reward-model") & (agg["method"].map(methods.role) != "start")]
    beat, not_shown = [], []
    for _, r in pol.iterrows():
        ex = _excludes_zero(r, "eval/gold_vs_sft")
        text = f"{setting(r)} {_ci(r, 'eval/gold_vs_sft')}"
        (beat if ex and r["eval/gold_vs_sft"] > 0 else not_shown).append(text)
    if beat:
        out.append("Gold reward above the SFT policy's, paired by prompt and sample, with an interval that excludes 0 "
                   f"(Table 1, \"gold − SFT\"): {'; '.join(beat)}.")
    if not_shown:
        out.append(f"Not shown to beat SFT on the gold (the interval contains 0, or the difference is negative): "
                   f"{'; '.join(not_shown)}.")

    # --- arm against arm (Table 1b): which differences between methods the numbers show
    if between := arm_differences(table):
        out.append(between)

    # --- the frontier against the DPO paper's Fig. 2 (left)
    snaps = snapshot_table(list(table["path"]), table.attrs.get("eval_name", "default"))
    best = _best_points(snaps)
    if best:
        ranked = sorted(best.items(), key=lambda kv: -kv[1][1])
        out.append("Reward–KL frontier (figure `frontier`), each setting's best point, highest gold first: " + "; ".join(
            f"{k}: gold {_f(g)} at KL {_f(kl, 2)} (step {s})" for k, (kl, g, s) in ranked) + ".")
        dpo = {k: v for k, v in best.items() if k.startswith("dpo")}
        ppo = {k: v for k, v in best.items() if k.startswith("ppo")}
        for pk, (pkl, pg, _) in ppo.items():
            dominating = [dk for dk, (dkl, dg, _) in dpo.items() if dkl <= pkl and dg >= pg]
            if dominating:
                out.append(f"As in the DPO paper (Fig. 2, left: DPO's frontier above PPO's, even PPO against the gold), "
                           f"{', '.join(dominating)} reaches at least the gold of {pk} ({_f(pg)}) at no more KL "
                           f"({_f(pkl, 2)}): point estimates, read with the intervals of the figure.")
            else:
                out.append(f"Not replicated here: no DPO setting reaches the gold of {pk} ({_f(pg)}) at its KL "
                           f"({_f(pkl, 2)}) or less; the DPO paper found DPO's frontier above PPO's.")
        gt = [k for k in best if k.startswith("ppo (gt)")]
        proxy_ppo = [k for k in best if k.startswith("ppo") and k not in gt]
        for g in gt:
            for p in proxy_ppo:
                out.append(f"PPO against the gold itself ({g}) reaches gold {_f(best[g][1])} at KL {_f(best[g][0], 2)}; "
                           f"PPO against the proxy ({p}) {_f(best[p][1])} at KL {_f(best[p][0], 2)}.")

    # --- best-of-n and over-optimisation against Gao et al. (Table 3, figure `overoptimization`)
    for _, r in table[table["method"].map(methods.role) == "reward-model"].iterrows():
        if pd.isna(r.get("bon/N")):
            continue
        n_max, peak = int(r["bon/N"]), int(r["bon/gold_peak_n"])
        fall = _ci({"d": r.get("bon/gold_drop"), "d_lo": r.get("bon/gold_drop_lo"), "d_hi": r.get("bon/gold_drop_hi")}, "d")
        if peak == n_max:
            shape = (f"its gold is highest at the largest n = {n_max}: no over-optimisation within KL "
                     f"≤ {_f(r['bon/kl_bound_at_N'], 2)} nats (Gao et al. saw the gold fall only at larger KL)")
        elif _overoptimised(r):
            shape = (f"its gold peaks at n = {peak} and falls by {fall} (paired by prompt) by n = {n_max}: "
                     "over-optimisation, as Gao et al. found")
        else:
            shape = (f"its gold is highest at n = {peak}, but its fall by n = {n_max}, {fall} (paired by prompt), is "
                     "within noise: no over-optimisation shown")
        out.append(f"Best-of-n against **{setting(r)}** ({int(r.get('budget/gold_pairs') or 0)} gold pairs): at n = "
                   f"{n_max} the proxy gains {_f(r['bon/proxy_gain_at_N'], 2)} and the gold "
                   f"{_ci({'g': r['bon/gold_gain_at_N'], 'g_lo': r['bon/gold_gain_at_N_lo'], 'g_hi': r['bon/gold_gain_at_N_hi']}, 'g')} "
                   f"over n = 1; {shape}. KL at n = {n_max}: bound {_f(r['bon/kl_bound_at_N'], 2)}, plug-in "
                   f"{_f(r['bon/kl_plugin_at_N'], 2)} ({_f(r['bon/prompts_with_repeats'], 2)} of prompts repeat a reply).")
    # a peak counts where the fall after it is real (its paired interval above 0); else the curve peaks at N
    rms = [r for _, r in table[table["method"].map(methods.role) == "reward-model"].iterrows() if pd.notna(r.get("bon/gold_peak_n"))]
    peaks = {setting(r): int(r["bon/gold_peak_n"]) if _overoptimised(r) else int(r["bon/N"]) for r in rms}
    if len(peaks) > 1:
        main = min(peaks, key=lambda k: len(k))
        earlier = [k for k, v in peaks.items() if k != main and v < peaks[main]]
        out.append("Weaker proxies' gold peaking earlier (Gao et al., Fig. 1/2; Coste et al. with noise): " + (
            f"seen for {', '.join(earlier)}." if earlier else "not shown at this scale: no weaker proxy's best-of-n "
            f"gold falls significantly after a peak earlier than {main}'s (n = {peaks[main]})."))

    # --- signs of hacking (Table 1)
    sft = agg[agg["method"].map(methods.role) == "start"]
    if len(sft) and "eval/distinct2" in agg:
        s = sft.iloc[0]
        moved = [f"{setting(r)} (tokens {_f(r['eval/response_tokens'], 1)}, ended {_f(r['eval/ended'], 2)}, distinct-2 "
                 f"{_f(r['eval/distinct2'], 2)})" for _, r in pol.iterrows()
                 if abs(r["eval/distinct2"] - s["eval/distinct2"]) > 0.1 or abs(r["eval/ended"] - s["eval/ended"]) > 0.2]
        out.append(f"Signs of hacking against SFT (tokens {_f(s['eval/response_tokens'], 1)}, ended {_f(s['eval/ended'], 2)}, "
                   f"distinct-2 {_f(s['eval/distinct2'], 2)}; Table 1): " + (
                       f"replies changed in length, ending or variety for {'; '.join(moved)}; the inspector sorts "
                       "their samples by proxy − gold." if moved else
                       "no arm changed its replies' ending or variety by more than 0.2 / 0.1."))
    return "\n".join(f"- {x}" for x in out)


def arm_differences(table: pd.DataFrame) -> str:
    """The finding of Table 1b: which settings' gold differs from another's by a paired interval that excludes 0,
    the one ahead named first; "" with fewer than two settings."""
    pairs = paired_arms(table)
    if pairs.empty:
        return ""
    shown = pairs[(pairs["lo"] > 0) | (pairs["hi"] < 0)]
    ahead = [(r["a"], r["b"], r["estimate"], r["lo"], r["hi"]) if r["estimate"] > 0 else
             (r["b"], r["a"], -r["estimate"], -r["hi"], -r["lo"]) for _, r in shown.iterrows()]
    text = "; ".join(f"{a} above {b} by {_f(d)} [{_f(lo)}, {_f(hi)}]" for a, b, d, lo, hi in ahead)
    return (f"Arm against arm on the gold, paired by prompt and sample (Table 1b): {len(shown)} of {len(pairs)} "
            "differences have an interval that excludes 0" + (f": {text}" if len(shown) else "") +
            ("; the others are not distinguishable at this size" if len(shown) < len(pairs) else "") + ".")


def _n_eval_prompts(table: pd.DataFrame) -> int | str:
    ev = Path(table["path"].iloc[0]) / "eval" / table.attrs.get("eval_name", "default") / "config.json"
    return json.loads(ev.read_text())["n_prompts"] if len(table) and ev.exists() else "some"


def _sft_steps(table: pd.DataFrame) -> str:
    sft = table[table["method"].map(methods.role) == "start"]
    steps = sorted({json.loads((Path(p) / "config.json").read_text()).get("max_steps") for p in sft["path"]}
                   if len(sft) else set(), key=str)
    return "/".join(str(s) for s in steps) or "some"


def _overoptimised(r) -> bool:
    """Best-of-n's gold fell after its peak, by a paired interval over prompts above 0 (``bon/gold_drop_lo``)."""
    return int(r["bon/gold_peak_n"]) < int(r["bon/N"]) and pd.notna(r.get("bon/gold_drop_lo")) and r["bon/gold_drop_lo"] > 0


def caveats(table: pd.DataFrame) -> str:
    seeds = table["seed"].nunique()
    notes = [
        "The gold is a lexicon of word sentiment. It rewards positive words whatever the prompt asks; a policy that "
        "learns to sound cheerful scores high without being more helpful or more harmless. The study measures how well "
        "each method optimises a known reward from its own labels, not human preference.",
        "The evaluation's KL is the sampled estimate Σ_t log π − log π_ref per response, from the same samples as the "
        "gold, at the sampling temperature and at T = 1; both are of replies cut at the evaluation's length, so for the "
        "replies that did not end (Table 1, \"ended\") a lower bound on the whole reply's. Best-of-n's KL is the bound "
        "log n − (n−1)/n beside its plug-in estimate.",
        "Best-of-n is computed from the gold-labelled dataset's held-out replies (sampled from the SFT adapter merged "
        "into a dequantized copy of the base, the same policy up to bf16 rounding); the policies' gold from their own "
        f"evaluation samples on {_n_eval_prompts(table)} of those prompts.",
    ]
    if seeds < 3:
        notes.append(f"{seeds} seed(s): the intervals cover the evaluation prompts, not training noise. Claims about "
                     "methods need ≥ 3 seeds (`python -m workbench main --seeds 0,1,2`).")
    return "\n".join(f"- {n}" for n in notes)
