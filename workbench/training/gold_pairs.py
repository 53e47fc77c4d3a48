"""The known-gold study's data: preference pairs of a policy's own samples, labelled by a gold reward that is known
exactly (the DPO paper's controlled-sentiment experiment, Rafailov et al. 2023, arXiv:2305.18290 §6.1: pairs sampled
from the SFT model and labelled by a sentiment classifier; Gao et al. 2022, arXiv:2210.10760: synthetic comparisons
labelled by a gold RM; Coste et al. 2023, arXiv:2310.02743: the same with label noise).

``build(cfg) -> run folder``, readable top to bottom:
  1. prompts: HH-RLHF prompts whose chat-templated length fits ``max_prompt_length`` whole (no prompt is ever cut,
     so every arm sees exactly the prompt that was sampled; longer ones are skipped and counted), split three ways by
     the fixed hashes every run uses: *eval* = the held-out split (``data.split_heldout``, ``DataConfig.split_seed``),
     *proxy* = prompt half "a" and *policy* = prompt half "b" of the rest (``data.half``). The first
     ``n_<part>_prompts`` of each part are used. The three never share a prompt.
  2. samples: the policy (the SFT run's adapter on its base, or the base) samples ``samples_per_prompt`` replies to
     each proxy and policy prompt and ``eval_samples_per_prompt`` to each eval prompt (temperature, top-p,
     ≤ ``max_new_tokens``), from its fast inference copy (``sampling.inference_copy`` in the compute dtype: the
     policy up to rounding); the gold scores every reply.
  3. pairs: within each prompt, every two samples i < j (``pairing="all"``; the eval part always pairs its samples
     disjointly, (0, 1), (2, 3), ..., so that its pairs share no reply) are labelled by the Bradley–Terry model of the
     gold, P(i ≻ j) = σ((g_i − g_j)/``label_temperature``), sampled (its deterministic limit at temperature 0: the
     higher gold wins), then flipped with probability ``label_noise`` ε; a pair whose golds differ by no more than
     ``tie_margin`` is a tie, dropped and counted (``stats.bradley_terry_labels``).
  4. the run folder: ``pairs.jsonl`` (the dataset, in the data layer's format with each pair's part, golds, label
     probability and whether it was flipped: a pairs folder, which every arm reads through ``DataConfig.source``
     exactly as it reads HH-RLHF, ``sources.load_pairs``), ``records/samples.jsonl`` (every sample with its gold score),
     ``config.json`` (the recipe) and ``summary.json`` (counts, ties, flips, tokens, seconds).

Arms read the parts through the data layer's usual knobs, because the parts *are* its split and halves: the
held-out split is the eval part (held-out gold-labelled pairs), ``half="a"`` the proxy part (a reward model's
training pairs), ``half="b"`` the policy part (DPO, IPO, KTO, ...; PPO's prompts). A dataset is built once and reused
by every arm and seed that names it; ``reuse_samples`` relabels another dataset's samples (another label noise,
temperature or tie margin) without sampling again. ``check_recipe`` refuses a dataset built from another policy or
with another gold than the run expects, showing both recipes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import console, stats
from ..modeling import data, models, sources
from ..modeling.runs import Run, read_jsonl, run_info, write_jsonl
from .config import RunFields

log = console.logger(__name__)

PARTS = ("proxy", "policy", "eval")  # proxy: half "a" of the training side; policy: half "b"; eval: the held-out split
PAIRINGS = ("all", "disjoint")
# the recipe fields that decide the samples (a dataset that reuses another's samples must agree on them)
SAMPLING_FIELDS = ("model", "sft_run", "gold", "n_proxy_prompts", "n_policy_prompts", "n_eval_prompts",
                   "samples_per_prompt", "eval_samples_per_prompt", "max_prompt_length", "max_new_tokens", "temperature",
                   "top_p", "seed", "data")


@dataclass
class GoldPairsArgs(RunFields):
    """A gold-labelled preference dataset: who samples, what labels, how many (module docstring)."""

    gold: str = "vader"  # the gold reward: a reward spec (rewards.load_reward): vader, vader:posneg, a reward run, ...
    # --- prompts: the first n of each part that fit max_prompt_length whole
    n_proxy_prompts: int = 128  # prompt half "a": the proxy reward models' training pairs
    n_policy_prompts: int = 128  # prompt half "b": the policy arms' training pairs (and PPO's prompts)
    n_eval_prompts: int = 64  # the held-out split: held-out gold-labelled pairs, best-of-n samples
    max_prompt_length: int = 96  # tokens of the chat-templated prompt; longer prompts are skipped (counted), never cut
    # --- samples (from the SFT policy, or the base without sft_run)
    samples_per_prompt: int = 4  # k replies per proxy / policy prompt: C(k, 2) pairs each with pairing "all"
    eval_samples_per_prompt: int = 8  # N replies per eval prompt: N/2 disjoint held-out pairs, best-of-n up to N
    max_new_tokens: int = 32  # the longest reply sampled, in tokens
    temperature: float = 0.7  # as the RL arms and the evaluation sample
    top_p: float = 1.0  # nucleus sampling's p (1.0: the whole distribution)
    batch_size: int = 64  # samples per generation batch
    # --- labels (stats.bradley_terry_labels)
    pairing: str = "all"  # proxy / policy parts: "all" pairs of a prompt's k samples, or "disjoint" ((0,1), (2,3), ...)
    label_temperature: float = 0.0  # Bradley–Terry temperature of P(i ≻ j) = σ(Δg/T); 0: the higher gold wins
    label_noise: float = 0.0  # ε: each label flipped with this probability (Coste et al. 2023 use 0.25)
    tie_margin: float = 0.0  # |Δg| <= this: a tie, dropped and counted (0: only equal golds, e.g. two neutral replies)
    reuse_samples: str | None = None  # another gold-pairs run folder: relabel its samples instead of sampling again

    def __post_init__(self):
        if self.data.half is not None or self.data.n_train is not None:
            raise ValueError("A gold-labelled dataset takes its prompts from every part (n_proxy_prompts, "
                             "n_policy_prompts, n_eval_prompts); data.half and data.n_train do not apply.")
        for name in ("n_proxy_prompts", "n_policy_prompts", "n_eval_prompts", "max_prompt_length", "max_new_tokens",
                     "batch_size"):
            if getattr(self, name) < 0 or (getattr(self, name) == 0 and not name.startswith("n_")):
                raise ValueError(f"{name} must be >= {0 if name.startswith('n_') else 1} (got {getattr(self, name)}).")
        if self.samples_per_prompt < 2 or self.eval_samples_per_prompt < 2 or self.eval_samples_per_prompt % 2:
            raise ValueError(f"samples_per_prompt must be >= 2 and eval_samples_per_prompt an even number >= 2 (got "
                             f"{self.samples_per_prompt}, {self.eval_samples_per_prompt}): pairs need two replies.")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS} (got {self.pairing!r}).")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be > 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p}).")
        if self.label_temperature < 0 or self.tie_margin < 0 or not 0 <= self.label_noise <= 0.5:
            raise ValueError("label_temperature >= 0, tie_margin >= 0 and 0 <= label_noise <= 0.5 (a rate above 0.5 "
                             f"inverts the labels); got {self.label_temperature}, {self.tie_margin}, {self.label_noise}.")


# ----------------------------------------------------------------------------------------------------------
# Recipes: what a dataset was built from, checked by every run that reads one


def is_gold_pairs(folder) -> bool:
    """Is ``folder`` a gold-labelled dataset's run folder (a pairs folder with a recipe)?"""
    return data.is_pairs_folder(folder) and (Path(folder) / "config.json").is_file() and \
        Path(folder).name.startswith("gold-pairs__")


def recipe(folder) -> dict:
    """What a gold-labelled dataset was built from: the policy that sampled (its base and SFT run), the gold, the
    sampling and labelling settings, the seed (from its config.json)."""
    saved = json.loads((Path(folder) / "config.json").read_text())
    keep = (*SAMPLING_FIELDS, "pairing", "label_temperature", "label_noise", "tie_margin", "reuse_samples")
    out = {k: saved.get(k) for k in keep}
    out["model"] = (saved.get("model") or {}).get("model_name_or_path")
    return out


def _same_run(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return Path(a).resolve() == Path(b).resolve()


def check_recipe(folder, *, sft_run=None, model: str | None = None, gold: str | None = None, check_policy: bool = True,
                 who: str = "this run") -> dict:
    """The dataset's recipe if it fits what ``who`` expects: pairs sampled from its own starting policy (``sft_run``
    on ``model``: the DPO paper's setup, where the reference is the policy that sampled the pairs), and labelled by
    ``gold`` when it names one. Otherwise a ValueError that shows both recipes."""
    have = recipe(folder)
    want, problems = {}, []
    if check_policy:
        want.update(model=model, sft_run=sft_run)
        if have["model"] != model or not _same_run(have["sft_run"], sft_run):
            problems.append("its replies were sampled from another policy")
    if gold is not None:
        want["gold"] = gold
        if have["gold"] != gold:
            problems.append("it was labelled by another gold")
    if problems:
        shown = {k: have[k] for k in ("model", "sft_run", "gold")}
        raise ValueError(f"The gold-labelled dataset {Path(folder).name} does not fit {who}: {'; '.join(problems)}.\n"
                         f"  dataset recipe: {json.dumps(shown)}\n  {who} expects: {json.dumps(want)}\n"
                         "Build a dataset from this policy with this gold (a gold-pairs run), or point the run at it.")
    return have


# ----------------------------------------------------------------------------------------------------------
# The steps


def select_prompts(cfg: GoldPairsArgs, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """{part: prompt rows} (``data.prompt_view`` rows: id, prompt, baseline) and counts: the first prompts of each part
    whose chat-templated length fits ``max_prompt_length``."""
    pairs, _ = sources.load_pairs(cfg.data)
    train_side, heldout, _ = data.split_heldout(pairs, cfg.data.heldout_fraction, seed=cfg.data.split_seed)
    parts = {"proxy": data.half(train_side, "a"), "policy": data.half(train_side, "b"), "eval": heldout}
    wanted = {"proxy": cfg.n_proxy_prompts, "policy": cfg.n_policy_prompts, "eval": cfg.n_eval_prompts}
    from ..modeling.sampling import encode_prompts

    out, counts = {}, {}
    for part, rows in parts.items():
        candidates = data.prompt_view(rows)
        fits, too_long = [], 0
        for row in candidates:
            if len(fits) == wanted[part]:
                break
            if len(encode_prompts(tokenizer, [row["prompt"]], 10**9)[0]) <= cfg.max_prompt_length:
                fits.append(row)
            else:
                too_long += 1
        if len(fits) < wanted[part]:
            raise ValueError(f"Only {len(fits)} of the {len(candidates)} {part} prompts fit max_prompt_length="
                             f"{cfg.max_prompt_length} tokens; n_{part}_prompts={wanted[part]} asks for more. Raise "
                             "max_prompt_length or ask for fewer prompts.")
        out[part] = fits
        counts[part] = {"prompts": len(fits), "prompts_available": len(candidates), "prompts_too_long_skipped": too_long}
    return out, counts


def sample_replies(cfg: GoldPairsArgs, prompts: dict[str, list[dict]], gold) -> tuple[list[dict], float]:
    """Every sample of every part, scored by the gold: (records, seconds). The policy samples from its inference copy;
    part p's batches are seeded from ``cfg.seed`` and the part, so a part's samples do not depend on the others' sizes."""
    from ..modeling.sampling import inference_copy, sample_completions

    adapter = str(Path(cfg.sft_run) / "adapter") if cfg.sft_run else None
    model, tokenizer = models.load_policy(cfg.model, adapter=adapter, trainable=False)
    # the texts alone are kept, no log-probs: the fast copy, every weight in the compute dtype (the policy up to rounding)
    sampler = inference_copy(model, "default" if adapter else None, dtype=models.compute_dtype(cfg.model.dtype))
    del model
    t0, records = time.time(), []
    for offset, part in enumerate(PARTS):
        k = cfg.eval_samples_per_prompt if part == "eval" else cfg.samples_per_prompt
        got = sample_completions(sampler, tokenizer, prompts[part], n_samples=k, rewards={"gold": gold},
                                 max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 1_000_000 * offset,
                                 batch_size=cfg.batch_size, logprobs=False, min_new_tokens=1,  # a pair's texts: never empty
                                 desc=f"gold-pairs: sampling {len(prompts[part]) * k} replies ({part})")
        records += [{"part": part, **r} for r in got]
        done = sum(len(prompts[q]) * (cfg.eval_samples_per_prompt if q == "eval" else cfg.samples_per_prompt)
                   for q in PARTS[: offset + 1])
        total = sum(len(prompts[q]) * (cfg.eval_samples_per_prompt if q == "eval" else cfg.samples_per_prompt)
                    for q in PARTS)
        took = time.time() - t0
        left = f", ~{(total - done) * took / done / 60:.1f} min left" if done < total else ""
        line = f"[gold-pairs] {done}/{total} replies sampled ({part} part done) in {took / 60:.1f} min{left}"
        console.progress(log, line)
    return records, time.time() - t0


def pair_indices(k: int, pairing: str) -> list[tuple[int, int]]:
    """The (i, j) sample pairs of one prompt's k samples: every i < j, or disjoint neighbours (0, 1), (2, 3), ..."""
    if pairing == "all":
        return [(i, j) for i in range(k) for j in range(i + 1, k)]
    return [(i, i + 1) for i in range(0, k - 1, 2)]


def label_pairs(samples: list[dict], cfg: GoldPairsArgs) -> tuple[list[dict], dict]:
    """(pairs, counts): the pairs of each prompt's samples (``pair_indices``; the eval part disjoint) labelled by
    ``stats.bradley_terry_labels`` with one seed for the whole dataset; ties dropped and counted per part."""
    by_prompt: dict[tuple, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault((s["part"], s["id"]), []).append(s)
    candidates = []
    for (part, _), group in by_prompt.items():
        group = sorted(group, key=lambda s: s["sample"])
        for i, j in pair_indices(len(group), "disjoint" if part == "eval" else cfg.pairing):
            candidates.append((part, group[i], group[j]))
    a = np.array([x["gold"] for _, x, _ in candidates], float)
    b = np.array([y["gold"] for _, _, y in candidates], float)
    labels = stats.bradley_terry_labels(a, b, temperature=cfg.label_temperature, flip_rate=cfg.label_noise,
                                        tie_margin=cfg.tie_margin, seed=cfg.seed)
    pairs, counts = [], {p: {"candidate_pairs": 0, "ties_dropped": 0, "flipped": 0, "pairs": 0} for p in PARTS}
    for n, (part, x, y) in enumerate(candidates):
        c = counts[part]
        c["candidate_pairs"] += 1
        if labels["tie"][n]:
            c["ties_dropped"] += 1
            continue
        win, lose = (x, y) if labels["a_wins"][n] else (y, x)
        p_x = float(labels["p_a"][n])
        c["flipped"] += int(labels["flipped"][n])
        c["pairs"] += 1
        pairs.append({
            "id": f"{x['id']}#{x['sample']}-{y['sample']}", "prompt": x["prompt"],
            "chosen": [{"role": "assistant", "content": win["completion"]}],
            "rejected": [{"role": "assistant", "content": lose["completion"]}],
            "part": part, "chosen_gold": win["gold"], "rejected_gold": lose["gold"],
            "chosen_sample": win["sample"], "rejected_sample": lose["sample"],
            "chosen_tokens": win["response_tokens"], "rejected_tokens": lose["response_tokens"],
            "p_chosen": p_x if win is x else 1 - p_x, "flipped": bool(labels["flipped"][n])})
    return pairs, counts


def describe(samples: list[dict], pairs: list[dict]) -> dict:
    """What the dataset holds, per part: the gold's mean and spread, the share of its variance within prompts (the
    signal a preference can carry), how often the longer reply is the chosen one (a length-only rule's best case on
    these pairs), and how often a prompt's samples repeat one another."""
    out = {}
    for part in PARTS:
        mine = [s for s in samples if s["part"] == part]
        if not mine:
            continue
        g = np.array([s["gold"] for s in mine])
        groups: dict[str, list[dict]] = {}
        for s in mine:
            groups.setdefault(s["id"], []).append(s)
        within = np.mean([np.var([s["gold"] for s in grp]) for grp in groups.values()])
        repeats = np.mean([len({s["completion"] for s in grp}) < len(grp) for grp in groups.values()])
        prs = [p for p in pairs if p["part"] == part]
        longer = [1.0 if p["chosen_tokens"] > p["rejected_tokens"] else 0.5 if p["chosen_tokens"] == p["rejected_tokens"]
                  else 0.0 for p in prs]
        out[part] = {"gold_mean": float(g.mean()), "gold_sd": float(g.std()),
                     "gold_within_prompt_variance_share": float(within / g.var()) if g.var() > 0 else math.nan,
                     "longer_wins": float(np.mean(longer)) if longer else math.nan,
                     "prompts_with_repeated_samples": float(repeats),
                     "mean_response_tokens": float(np.mean([s["response_tokens"] for s in mine])),
                     "ended": float(np.mean([s["ended"] for s in mine]))}
    return out


# ----------------------------------------------------------------------------------------------------------
# The entry point


def build(cfg: GoldPairsArgs) -> Path:
    """Sample, score, label; write the dataset's run folder (module docstring) and return it."""
    from ..modeling.rewards import load_reward

    t0 = time.time()
    gold = load_reward(cfg.gold, name="gold")
    with Run("gold-pairs", cfg.run_name, cfg.seed, config=cfg, root=cfg.runs_dir, run_id=cfg.run_id) as run:
        if cfg.reuse_samples:  # another dataset's samples, relabelled here
            source = Path(cfg.reuse_samples)
            theirs, mine = recipe(source), recipe(run.path)
            differ = {k: (theirs[k], mine[k]) for k in SAMPLING_FIELDS if theirs[k] != mine[k]}
            if differ:
                raise ValueError(f"reuse_samples={source.name}: its samples were drawn under other settings; "
                                 f"(theirs, this run's): {json.dumps(differ)}")
            samples, t_sample = read_jsonl(source / "records" / "samples.jsonl"), 0.0
            counts = json.loads((source / "summary.json").read_text())["counts"]
            log.info(f"[gold-pairs] relabelling the {len(samples)} samples of {source.name}")
        else:
            tokenizer = models.load_tokenizer(cfg.model.model_name_or_path)
            prompts, counts = select_prompts(cfg, tokenizer)
            samples, t_sample = sample_replies(cfg, prompts, gold)
        pairs, pair_counts = label_pairs(samples, cfg)
        for part in PARTS:
            counts[part] = {**counts[part], **pair_counts[part],
                            "samples": sum(s["part"] == part for s in samples),
                            "tokens_generated": sum(s["response_tokens"] for s in samples if s["part"] == part)}
        write_jsonl(run.path / data.PAIRS_FILE, pairs)
        run.write_records("samples", samples)
        run.summary = {"counts": counts, "describe": describe(samples, pairs),
                       "gold/labels": len(samples),  # gold queries: one score per sample
                       "pairs/total": len(pairs), "tokens/generated": sum(s["response_tokens"] for s in samples),
                       "time/sampling_s": round(t_sample, 1), "time/total_s": round(time.time() - t0, 1)}
        run.write_json("compute.json", {"tokens": {"generated": run.summary["tokens/generated"]},
                                        "wall_time_s": round(t_sample, 1)})
        for part in PARTS:
            c = counts[part]
            log.info(f"[gold-pairs] {part}: {c['prompts']} prompts x {c['samples'] // max(c['prompts'], 1)} replies, "
                     f"{c['pairs']} pairs ({c['ties_dropped']} ties dropped, {c['flipped']} flipped)")
    log.info(f"[gold-pairs] run folder {run.path}")
    return run.path


def parts_of(run_path) -> dict[str, list[dict]]:
    """{part: samples} of a gold-labelled dataset (its records/samples.jsonl), e.g. the eval part's N replies per
    prompt for best-of-n."""
    out: dict[str, list[dict]] = {p: [] for p in PARTS}
    for s in read_jsonl(Path(run_path) / "records" / "samples.jsonl"):
        out[s["part"]].append(s)
    return out


def dataset_of(run_path) -> Path | None:
    """The gold-labelled dataset a run read its pairs from (its data.source), or None."""
    source = (run_info(run_path)["config"].get("data") or {}).get("source")
    return Path(source) if source and is_gold_pairs(source) else None
