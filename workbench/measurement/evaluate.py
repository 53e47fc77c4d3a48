"""One evaluation for every arm: the same held-out prompts, the same decoding, the same reward models.

For a run folder, ``evaluate_run`` writes ``<run>/eval/<name>/``:

    config.json        the EvalConfig, the reward models, the reference, the prompt and pair ids used
    generations.jsonl  n samples per held-out prompt: the completion, its proxy and gold reward, its length, the
                       sampled KL(π‖π_ref) = Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t) over the policy's own
                       sample, and per token log π, log π_ref and their ratio; beside it the dataset's chosen
                       response to the same prompt with its rewards (for win rates)
    pairs.jsonl        held-out preference pairs scored per pair and per token (``scoring.score_pairs``), or by
                       the reward model for a reward run; for every run the pair's lengths in tokens of the
                       evaluation's one length tokenizer and the length-only rule's credit (``scoring.add_lengths``)
    summary.json       means with bootstrap intervals, the win rate against the chosen responses (raw and
                       length-controlled), preference accuracies beside the length-only baseline

Every run is evaluated on the same prompts: the held-out pairs of the fixed split (``DataConfig.split_seed``),
read without any tokenizer-dependent filter; before anything is sampled, the run's split.json is checked so
that none of these prompts was trained on. Sampling is seeded per batch, so an evaluation repeats exactly.
``evaluate_runs`` evaluates many runs (a runs root or a list of run folders).

Samples, with their per-token log π and log π_ref, come from ``sampling.sample_completions`` (its docstring says
at which temperature the log-probs are taken). The run-folder readers (``runs.run_info``, ``runs.read_eval``) and
the results table (``results.results_table``) read what this module writes; this module imports neither.

The length-only baseline (``pairs/length_rule``) is a ``stats.LengthRule`` fitted on the training pairs of the same
split (the first ``scoring.LENGTH_FIT_PAIRS`` non-held-out pairs) and applied to the held-out pairs; beside it the raw
rate at which the longer response is the chosen one (``pairs/longer_wins``). Every run of an evaluation, policy or
reward model, measures lengths in tokens of one tokenizer (``EvalConfig.length_tokenizer``), so all report the
same baseline on the same pairs.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import console, malloc, methods, stats
from ..modeling import data, models, scoring, sources
from ..modeling.runs import atomic_folder, is_complete, run_info, run_paths, snapshots, to_jsonable, write_json, write_jsonl
from ..modeling.sampling import sample_completions
from ..training import cards

log = console.logger(__name__)

@dataclass
class EvalConfig:
    """What an evaluation samples and scores. Every field is recorded in ``eval/<name>/config.json``; runs are
    only compared under the same EvalConfig."""

    name: str = "default"  # the eval/<name>/ folder; another name keeps several evaluations of one run apart
    data: data.DataConfig | None = None  # the held-out split; None: the evaluated run's own data settings
    n_prompts: int = 32  # distinct held-out prompts, the first in the data's order
    n_samples: int = 2  # completions sampled per prompt
    n_pairs: int = 64  # held-out preference pairs scored for preference accuracy
    # of those, the first this many score a policy's implicit reward (None: all n_pairs): a reward model's accuracy is
    # the number that needs many pairs, a policy's is a side measurement and costs a forward pass of each pair
    policy_pairs: int | None = None
    temperature: float = 0.7  # as the RL arms sample in training
    top_p: float = 1.0  # nucleus sampling's p (1.0: the whole distribution)
    max_new_tokens: int = 64  # the longest completion sampled, in tokens
    max_prompt_length: int = 256  # longer prompts keep their last tokens
    max_length: int = 512  # pairs: prompt + response tokens kept when scoring (the prompt is cut from the left)
    seed: int = 0  # sampling seed (prompt i's sample j uses seed + i·n_samples + j); the same for every run
    proxy_reward_model: str | None = None  # reward run folder or model name; None: the run's own reward_model, if any
    gold_reward_model: str | None = None  # the held-out judge of win rates; None: the run's own gold_reward_model
    beta: float | None = None  # β of the implicit reward β·log π/π_ref; None: the run's own β (0.1 if it has none)
    batch_size: int = 64  # samples per decoding batch (all samples of a prompt in one; see sample_completions)
    n_bootstrap: int = 1000  # bootstrap resamples (of prompts) for every interval
    # an AI judge (judge.Judge: any causal LM) whose agreement with the human labels on the same pairs is reported
    # beside the reward models' accuracy (pairs/judge_accuracy); None: no judge
    judge_model: str | None = None
    judge_principle: str | None = None  # the judge's principle; None: judge.DEFAULT_PRINCIPLE
    # a proxy or gold reward "judge" (rewards.JudgeReward): which judge and principle; None: the one the runs trained
    # with (their saved judge_model / judge_principle)
    reward_judge_model: str | None = None
    reward_judge_principle: str | None = None  # that judge's principle (None: the one the runs trained with)
    # tokenizer (model name, local path or embedded:...) that counts the tokens of every length baseline; None: the
    # base model of the policy runs evaluated (evaluate_run alone: the run's own base, or models.EMBEDDED_POLICY for a
    # reward model)
    length_tokenizer: str | None = None
    # the prompts and pairs evaluated on: a pairs folder (a gold-labelled dataset: its held-out part) or an HH-RLHF
    # directory; None: the first run's own data source
    data_source: str | None = None
    snapshots: bool = True  # also each policy run's snapshot adapters (checkpoints/step-<n>): samples, KL, rewards
    # a snapshot's share of the evaluation (points of the frontier between SFT and the final adapter, whose own
    # numbers carry the claims): the first snapshot_prompts prompts x snapshot_samples samples; None: as the final
    snapshot_prompts: int | None = None
    snapshot_samples: int | None = None  # samples per prompt of a snapshot's share (None: n_samples)
    # reward models trained on a gold-labelled dataset: best-of-n against them over the dataset's held-out samples
    # (best_of_n.py), the over-optimisation curve of Gao et al. 2022
    best_of_n: bool = True
    # evaluate_runs: runs evaluated at once, each worker a process with its share of this process's threads (1: all
    # in this process). On 2 CPU cores 2 workers of 1 thread take ~20 % less time than one of 2 threads: sampling is
    # bound by per-token overhead and gains little from a second thread (evaluate_runs)
    workers: int = 1

    def __post_init__(self):
        for f in ("n_prompts", "n_samples", "n_pairs", "max_new_tokens", "batch_size", "n_bootstrap", "workers",
                  "snapshot_prompts", "snapshot_samples"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"EvalConfig.{f} must be >= 1 (got {getattr(self, f)}).")
        if (self.snapshot_prompts or 0) > self.n_prompts:
            raise ValueError(f"EvalConfig.snapshot_prompts ({self.snapshot_prompts}) must be <= n_prompts "
                             f"({self.n_prompts}): a snapshot is evaluated on the first of the evaluation's prompts.")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"EvalConfig needs temperature > 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p}).")
        if isinstance(self.data, dict):
            self.data = data.DataConfig(**self.data)


# ----------------------------------------------------------------------------------------------------------
# The evaluation set and the run's models


def eval_set(data_cfg: data.DataConfig, n_prompts: int, n_pairs: int, pairs: list[dict] | None = None):
    """(prompts, pairs): the first ``n_prompts`` distinct held-out prompts, each with the dataset's chosen response
    to it (of its first pair), and the first ``n_pairs`` held-out pairs. No length filter: the set must not depend
    on any model's tokenizer."""
    if pairs is None:
        pairs, _ = sources.load_pairs(data_cfg)
    if sources.row_format(pairs) != "preference":
        raise ValueError(f"The evaluation scores held-out pairs and samples held-out prompts; {data_cfg.source} is in "
                         f"the {sources.row_format(pairs)} format. Evaluate on preference data (EvalConfig.data, "
                         f"--data-source): {sources.FIX}.")
    _, heldout, _ = data.split_heldout(pairs, data_cfg.heldout_fraction, seed=data_cfg.split_seed)
    prompts = [{**p, "chosen": p["baseline"]} for p in data.prompt_view(heldout)[:n_prompts]]
    if not prompts:
        raise ValueError(f"The held-out split ({data_cfg.heldout_fraction:.0%} of prompts, split_seed "
                         f"{data_cfg.split_seed}) is empty: raise heldout_fraction or use more data.")
    return prompts, heldout[:n_pairs], pairs


def check_not_trained_on(run_path: Path, prompts: list[dict], all_pairs: list[dict],
                         pairs: list[dict] = ()) -> None:
    """Raise if the run, or a run it was built from (its SFT run, its proxy or gold reward model when that is a run
    folder, recursively), trained on any evaluation prompt or on the prompt of any evaluation pair, or on a
    conversation that opens with the same user turn (``data.group_key``; by the ids in each run's split.json). A run folder without split.json is refused: nothing would show it held those out."""
    seen_runs: set = set()
    todo = [Path(run_path)]
    while todo:
        path = todo.pop()
        if path.resolve() in seen_runs:
            continue
        seen_runs.add(path.resolve())
        split = path / "split.json"
        if not split.exists():
            raise FileNotFoundError(f"{split} is missing, so nothing shows that {path.name} held out the evaluation's "
                                    "prompts. Runs trained by this workbench write it; evaluate another run, or "
                                    "write its split.json (train_ids: the pair ids it trained on).")
        trained = set(json.loads(split.read_text()).get("train_ids", []))
        seen = {data.group_key(ex) for ex in all_pairs if ex["id"] in trained}
        for what, items in (("evaluation prompts", prompts), ("evaluation pairs", pairs)):
            leaked = [p["id"] for p in items if data.group_key(p) in seen]
            if leaked:
                whose = "" if path == Path(run_path) else f" (through {path.name}, which {Path(run_path).name} was built from)"
                raise ValueError(f"{path.name} trained on {len(leaked)} of the {len(items)} {what} (e.g. {leaked[0]}), "
                                 f"or on a conversation that opens with the same user turn{whose}: its held-out split "
                                 "differs (data.split_seed / heldout_fraction, or a run split before splits were grouped "
                                 "by first user turn). Train it again, or evaluate it with EvalConfig(data=<its "
                                 "DataConfig>) apart from the others.")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        for key in ("sft_run", "reward_model", "gold_reward_model"):
            up = config.get(key)
            if isinstance(up, str) and is_complete(up) and not run_info(up)["is_dataset"]:  # a run, not a hub name
                todo.append(Path(up))


def load_run_policy(run_path: Path, adapter: Path | None = None):
    """(model, tokenizer) of a policy run: its base (as recorded) with its adapter (or ``adapter``, e.g. one of its
    snapshots) as "default"; when it started from an SFT run, that adapter frozen as "ref" — the run's own
    reference, as in training."""
    info = run_info(run_path)
    adapter = Path(adapter) if adapter is not None else run_path / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} does not exist: only runs that trained a policy can be sampled.")
    model, tokenizer = models.load_policy(models.ModelConfig.from_saved(info["config"]["model"]), adapter=str(adapter),
                                          trainable=False)
    if info["config"].get("sft_run"):
        model.load_adapter(str(Path(info["config"]["sft_run"]) / "adapter"), adapter_name="ref", is_trainable=False)
        model.set_adapter("default")
    model.eval()
    return model, tokenizer


def _weights_keys(run_path: Path) -> dict:
    """Names of the weights ``load_run_policy`` puts behind a run's policy and its reference: the base as loaded
    (its model config less the LoRA shape, which the adapter's own config fixes) and the adapter folder."""
    saved = run_info(run_path)["config"]
    base = {k: v for k, v in saved["model"].items() if not k.startswith(("lora_", "use_rslora", "use_dora"))}
    ref = saved.get("sft_run")
    name = lambda adapter: json.dumps([base, adapter], sort_keys=True)  # noqa: E731
    return {"policy_key": name(str((run_path / "adapter").resolve())),
            "reference_key": name(str((Path(ref) / "adapter").resolve()) if ref else None)}


# ----------------------------------------------------------------------------------------------------------
# Evaluating one run, and many


pair_clusters = scoring.pair_clusters  # the bootstrap clusters of pair records: their prompts


@dataclass
class LengthBaseline:
    """The length-only baseline of an evaluation: lengths in tokens of ``tokenizer_name`` (loaded: ``tokenizer``),
    and ``rule`` fitted on the training pairs of ``data``'s split (``fit_length_baseline``)."""

    tokenizer_name: str
    data: data.DataConfig
    tokenizer: object
    rule: stats.LengthRule


def fit_length_baseline(tokenizer_name: str, data_cfg: data.DataConfig, pairs: list[dict] | None = None) -> LengthBaseline:
    """Fit the length-only rule on the training side of ``data_cfg``'s held-out split (all non-held-out pairs, not
    narrowed by a run's ``half`` or ``n_train``, so that every run evaluated on this split gets the same rule; the
    first ``scoring.LENGTH_FIT_PAIRS`` of them), lengths in tokens of ``tokenizer_name``."""
    if pairs is None:
        pairs, _ = sources.load_pairs(data_cfg)
    train_side, _, _ = data.split_heldout(pairs, data_cfg.heldout_fraction, seed=data_cfg.split_seed)
    tokenizer = models.load_tokenizer(tokenizer_name)
    return LengthBaseline(tokenizer_name, data_cfg, tokenizer, scoring.fit_length_rule(tokenizer, train_side))


def reward_readings(proxy, gold, prompts: list[dict], pairs: list[dict]) -> dict:
    """What the reward models (None: left out) say of the evaluation's fixed texts, the same for every run and so
    computed once by ``evaluate_runs``: "summary", their accuracy on the pairs (``pairs/proxy_rm_accuracy``,
    ``pairs/gold_rm_accuracy``: how often the chosen response scores above the rejected one), and "chosen", their
    scores of each prompt's chosen response (``chosen_score``, ``chosen_gold_score``; for win rates)."""
    from ..modeling.rewards import score_replies

    out = {"summary": {}, "chosen": {}}
    chosen = [p["chosen"] for p in prompts]
    for fn, accuracy_key, chosen_key in ((proxy, "pairs/proxy_rm_accuracy", "chosen_score"),
                                         (gold, "pairs/gold_rm_accuracy", "chosen_gold_score")):
        if fn is not None:
            out["summary"][accuracy_key] = _rm_accuracy(fn, pairs)
            out["chosen"][chosen_key] = score_replies(fn, [p["prompt"] for p in prompts], chosen, chosen).tolist()
    return out


def _rm_accuracy(fn, pairs: list[dict]) -> float:
    from ..modeling.rewards import score_replies

    # each reply against the chosen one (the baseline a pairwise judge's reward compares with; a reward model ignores it)
    baselines = [ex["chosen"][0]["content"] for ex in pairs]
    c = score_replies(fn, [ex["prompt"] for ex in pairs], [ex["chosen"] for ex in pairs], baselines)
    r = score_replies(fn, [ex["prompt"] for ex in pairs], [ex["rejected"] for ex in pairs], baselines)
    return float(stats.wins(c.tolist(), r.tolist()).mean())  # a tie counts ½, as in every accuracy here


def _without_new_unset(now, before):
    """``now`` less the settings that ``before`` lacks and that are off (None), at every depth of nested settings."""
    if not isinstance(now, dict) or not isinstance(before, dict):
        return now
    return {k: _without_new_unset(v, before.get(k)) for k, v in now.items() if k in before or v is not None}


def _generation_summary(gens: list[dict], cfg: EvalConfig) -> dict:
    """Means with bootstrap intervals over prompts, and the win rate against the chosen responses."""
    ids = [g["id"] for g in gens]
    out = {"n_prompts": len(set(ids)), "n_samples": len(gens)}
    for key, name in (("gold_score", "gold"), ("score", "proxy"), ("kl", "kl"), ("kl_t1", "kl_t1"),
                      ("response_tokens", "response_tokens")):
        if gens and gens[0].get(key) is not None:
            est, lo, hi = stats.bootstrap_mean([float(g[key]) for g in gens], ids, cfg.n_bootstrap, cfg.seed)
            out.update({f"eval/{name}": est, f"eval/{name}_lo": lo, f"eval/{name}_hi": hi})
    out["eval/ended"] = sum(g["ended"] for g in gens) / max(len(gens), 1)
    # signs of reward hacking beside the rewards: length (above), how often a reply ends, how varied the replies are
    out["eval/distinct2"] = stats.distinct_n([g["completion_token_ids"] for g in gens], 2) if gens else float("nan")
    if gens and gens[0].get("gold_score") is not None and gens[0].get("chosen_gold_score") is not None:
        wins = stats.wins([g["gold_score"] for g in gens], [g["chosen_gold_score"] for g in gens])
        dlen = [g["response_tokens"] - g["chosen_tokens"] for g in gens]  # tokens, the unit of every length metric
        out.update(stats.win_rate_summary(wins, dlen, ids, "win/chosen", cfg.n_bootstrap, cfg.seed))
    return out


def evaluate_run(run_path, cfg: EvalConfig | None = None, *, proxy=None, gold=None, pairs: list[dict] | None = None,
                 overwrite: bool = False, length: LengthBaseline | None = None, logps_cache: dict | None = None,
                 judged: tuple[dict, list] | None = None, reward_cache: dict | None = None) -> Path:
    """Evaluate one run folder into ``<run>/eval/<cfg.name>/`` and return that folder. An evaluation already there
    under the same settings is kept (evaluations resume); under other settings it is an error unless ``overwrite``
    (one written before a setting existed is redone). ``proxy`` / ``gold``: reward functions already loaded
    (``evaluate_runs`` loads each once); ``length``: the length baseline already fitted for this tokenizer and
    split (``fit_length_baseline``; fitted here otherwise); ``logps_cache``: a dict kept across runs, so that the
    log-probs of one set of weights on the evaluation pairs (an SFT run's adapter: that run's policy and the
    reference of every arm trained from it) are computed once (``scoring.score_pairs``); ``judged``: the AI judge's
    (summary, records) on these pairs (``judge.agreement``; computed here when ``cfg.judge_model`` is set);
    ``reward_cache``: a dict kept across runs evaluated with the same reward models, prompts and pairs, filled
    with their ``reward_readings`` on first use."""
    from ..modeling.rewards import JUDGE, load_reward

    run_path, cfg = Path(run_path), cfg or EvalConfig()
    info = run_info(run_path)
    data_cfg = cfg.data or data.DataConfig(**info["config"]["data"])
    saved_cfg = info["config"]
    proxy_spec = cfg.proxy_reward_model or saved_cfg.get("reward_model")
    gold_spec = cfg.gold_reward_model or saved_cfg.get("gold_reward_model")
    judge = _reward_judge(cfg, saved_cfg) if JUDGE in (proxy_spec, gold_spec) else None  # a reward "judge": which
    facts = methods.of(info["method"])
    has_reference = facts.has_reference
    beta = cfg.beta or (info["beta"] if has_reference else None) or 0.1
    length_name = cfg.length_tokenizer or (
        models.EMBEDDED_POLICY if info["is_reward_model"] else info["config"]["model"]["model_name_or_path"])
    if cfg.length_tokenizer is None:
        whose = "the default policy" if info["is_reward_model"] else "the run's base model"
        log.info(f"[evaluate] {run_path.name}: length baseline in tokens of {length_name} ({whose})")
    out = run_path / "eval" / cfg.name
    # how many processes evaluated at once changes the time, not what is measured
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("reward_judge_model", "reward_judge_principle", "workers")}
    record = to_jsonable({**settings, "data": data_cfg, "proxy_reward_model": proxy_spec,  # as resolved for this run
                          "gold_reward_model": gold_spec, "beta": beta, "reference": info["reference"],
                          "length_tokenizer": length_name, "reward_judge": judge})
    if (out / "summary.json").exists():
        before = json.loads((out / "config.json").read_text())
        # a setting added since, and off now (None: e.g. no judge, no column mapping), changes nothing that was
        # measured, at any depth (a field added to the data config)
        unset = {k for k, v in record.items() if k not in before and v is None}
        if {k: v for k, v in before.items() if k not in ("prompt_ids", "pair_ids", "length_rule", "torch_threads")} == \
                _without_new_unset(record, before):
            log.info(f"[evaluate] {run_path.name}: already evaluated as '{cfg.name}', kept")
            return out
        if set(record) - set(before) - unset:  # written before some of these settings existed: redo it
            log.info(f"[evaluate] {run_path.name}: '{cfg.name}' predates {sorted(set(record) - set(before) - unset)}, redone")
        elif not overwrite:
            raise FileExistsError(f"{out} holds an evaluation under other settings; pick another EvalConfig.name "
                                  "or pass overwrite=True.")
    t0 = time.time()
    prompts, eval_pairs, all_pairs = eval_set(data_cfg, cfg.n_prompts, cfg.n_pairs, pairs)
    check_not_trained_on(run_path, prompts, all_pairs, eval_pairs)
    if length is None or (length.tokenizer_name, length.data) != (length_name, data_cfg):
        length = fit_length_baseline(length_name, data_cfg, all_pairs)
    if proxy is None and proxy_spec:
        proxy = load_reward(proxy_spec, name="proxy", **(judge if proxy_spec == JUDGE else {}))
    if gold is None and gold_spec:
        gold = load_reward(gold_spec, name="gold", **(judge if gold_spec == JUDGE else {}))

    with atomic_folder(out) as partial:
        write_json(partial / "config.json", {**record, "prompt_ids": [p["id"] for p in prompts],
                                             "pair_ids": [ex["id"] for ex in eval_pairs], "length_rule": length.rule.to_dict(),
                                             "torch_threads": torch.get_num_threads()})
        readings = {} if reward_cache is None else reward_cache
        if not readings:
            readings.update(reward_readings(proxy, gold, prompts, eval_pairs))
        policy = None if info["is_reward_model"] else load_run_policy(run_path)  # loaded once for its snapshots too
        gens, pair_records, summary = _evaluate(run_path, info, cfg, beta, prompts, eval_pairs, proxy, gold, length,
                                                logps_cache, readings["chosen"], policy)
        summary.update(readings["summary"])
        if cfg.snapshots and policy is not None:
            steps = _evaluate_snapshots(run_path, policy, cfg, beta, prompts, proxy, gold, readings["chosen"], partial)
            summary["eval/snapshots"] = len(steps)
        del policy
        if cfg.best_of_n and info["is_reward_model"] and gold is not None:
            from ..training import best_of_n, gold_pairs

            source = gold_pairs.dataset_of(run_path)
            if source is not None:  # a proxy trained on a gold-labelled dataset: best-of-n against it, measured by gold
                rows, bon = best_of_n.evaluate(run_path, source, gold_spec, cfg.n_bootstrap, cfg.seed)
                write_jsonl(partial / "best_of_n.jsonl", rows)
                summary.update(bon)
        if cfg.judge_model:  # the AI judge on the same pairs, beside the reward models and the length rule
            judged = judged or judge_agreement(cfg, eval_pairs)
            summary.update({k.replace("judge/", "pairs/judge_"): v for k, v in judged[0].items()})
            write_jsonl(partial / "judge.jsonl", judged[1])
        write_jsonl(partial / "generations.jsonl", gens)
        write_jsonl(partial / "pairs.jsonl", pair_records)
        write_json(partial / "summary.json", {**summary, "time/eval_s": round(time.time() - t0, 1)})
    cards.write_model_card(run_path)  # the adapter's card now shows this evaluation too
    log.info(f"[evaluate] {run_path.name}: {out}")
    return out


def _evaluate(run_path: Path, info: dict, cfg: EvalConfig, beta: float, prompts: list[dict], eval_pairs: list[dict],
              proxy, gold, length: LengthBaseline, logps_cache: dict | None, chosen_scores: dict,
              policy: tuple | None) -> tuple[list, list, dict]:
    """(generations, pair records, summary) of one run: a policy's samples (``policy``: its (model, tokenizer) as
    ``load_run_policy`` gives them) and its implicit reward on the pairs, or a reward model's ranking of the pairs;
    for both the length baseline and the reward models' accuracy."""
    from ..modeling.rewards import load_reward

    summary = {}
    if info["is_reward_model"]:  # a reward model is evaluated by how it ranks held-out pairs
        rm = load_reward(str(run_path))
        pair_records = scoring.score_pairs_with_reward(rm.model, rm.tokenizer, eval_pairs, max_length=cfg.max_length)
        gens = []
    else:
        model, tokenizer = policy
        gens = _sample_and_score(model, tokenizer, prompts, cfg, proxy, gold, chosen_scores, beta)
        eval_pairs = eval_pairs[: cfg.policy_pairs]  # a policy's implicit reward: the first policy_pairs pairs
        pair_records = scoring.score_pairs(model, tokenizer, eval_pairs, beta=beta, max_length=cfg.max_length,
                                           batch_size=None, cache=logps_cache, **_weights_keys(run_path))
        for r, ex in zip(pair_records, eval_pairs):  # the inspector shows the prompt and the texts beside the tokens
            r.update({"prompt": ex["prompt"], "chosen": ex["chosen"][0]["content"], "rejected": ex["rejected"][0]["content"]})
        summary.update(_generation_summary(gens, cfg))
    # the pairs as the training-time look measures them (one function, one set of names), beside the length-only
    # baseline in the evaluation's one unit, with intervals and the accuracy's paired margin over the baseline
    scoring.add_lengths(pair_records, eval_pairs, length.tokenizer, length.rule)
    summary.update(scoring.pair_metrics(pair_records, length.rule, prefix="pairs/", n_bootstrap=cfg.n_bootstrap,
                                        seed=cfg.seed,
                                        reference_free=methods.of(info["method"]).implicit_reward == "avg-logp"))
    return gens, pair_records, summary


def _sample_and_score(model, tokenizer, prompts: list[dict], cfg: EvalConfig, proxy, gold, chosen_scores: dict,
                      beta: float) -> list[dict]:
    """A policy's samples of the evaluation prompts (``sampling.sample_completions``: per-token log π, log π_ref, the
    sampled KL), their proxy and gold rewards and implicit reward β·Σ_t log π/π_ref, beside the dataset's chosen
    response to the same prompt as the reward models judge it (``reward_readings``; for win rates)."""
    gens = sample_completions(model, tokenizer, prompts, n_samples=cfg.n_samples,
                              rewards={"score": proxy, "gold_score": gold}, max_prompt_length=cfg.max_prompt_length,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=cfg.seed, batch_size=cfg.batch_size)  # from inference.for_sampling(model)
    chosen = {p["id"]: p for p in prompts}
    for key, values in chosen_scores.items():
        for p, v in zip(prompts, values):
            p[key] = v
    for p in prompts:  # its length in tokens, as the samples' response_tokens count them (end of turn included)
        p["chosen_tokens"] = len(models.encode(tokenizer, p["prompt"], [{"role": "assistant", "content": p["chosen"]}])[1])
    for g in gens:
        p = chosen[g["id"]]
        g.update({"implicit_reward": beta * g["kl"], "chosen": p["chosen"], "chosen_chars": len(p["chosen"]),
                  "chosen_tokens": p["chosen_tokens"], "chosen_score": p.get("chosen_score"),
                  "chosen_gold_score": p.get("chosen_gold_score")})
    return gens


def _evaluate_snapshots(run_path: Path, policy: tuple, cfg: EvalConfig, beta: float, prompts: list[dict], proxy, gold,
                        chosen_scores: dict, out: Path) -> list[int]:
    """Each snapshot adapter of a policy run (``runs.snapshots``) sampled and scored as its final adapter is (the same
    seeds and rewards; the first ``cfg.snapshot_prompts`` prompts, ``cfg.snapshot_samples`` samples each), into
    ``<out>/steps/step-<n>/`` (generations.jsonl, summary.json); no pairs pass. Returns the steps evaluated.
    ``policy``: the run's (model, tokenizer) from ``load_run_policy``; each snapshot's weights replace its adapter's
    in turn (its LoRA shape is the run's), so the base is loaded once for the run, not once per snapshot."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    n_prompts = cfg.snapshot_prompts or len(prompts)
    snap_cfg = dataclasses.replace(cfg, n_samples=cfg.snapshot_samples or cfg.n_samples)
    prompts, chosen_scores = prompts[:n_prompts], {k: v[:n_prompts] for k, v in chosen_scores.items()}
    model, tokenizer = policy
    steps = []
    for step, adapter in snapshots(run_path):
        result = set_peft_model_state_dict(model, load_peft_weights(str(adapter)), adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(f"{adapter}: weights the run's adapter does not have: {result.unexpected_keys[:3]}")
        gens = _sample_and_score(model, tokenizer, prompts, snap_cfg, proxy, gold, chosen_scores, beta)
        folder = out / "steps" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "generations.jsonl", gens)
        write_json(folder / "summary.json", {"step": step, "n_prompts": len(prompts), "n_samples": snap_cfg.n_samples,
                                             **_generation_summary(gens, snap_cfg)})
        steps.append(step)
        log.info(f"[evaluate] {run_path.name}: snapshot at step {step} evaluated")
    return steps


def evaluate_runs(runs, cfg: EvalConfig | None = None, *, pairs: list[dict] | None = None) -> list[Path]:
    """Evaluate every run (a runs root, one run folder or a list of them: ``runs.run_paths``) under one EvalConfig,
    and return the run folders evaluated (``results.results_table(paths, cfg.name)`` tabulates them). The proxy
    and gold reward models are loaded once: ``cfg``'s, else those the RL runs among ``runs`` were trained and
    measured with (they must agree). The length baseline is fitted once, in tokens of ``cfg.length_tokenizer``,
    else of the first policy run's base model. With ``cfg.workers`` > 1 the runs not yet evaluated are evaluated
    in that many processes, each with its share of this process's threads, after the log-probs on the pairs of
    the weights they share (an SFT adapter) are computed here; each evaluation records its thread count."""
    from ..modeling.rewards import JUDGE

    malloc.keep_freed_memory()  # as training: freed activations reused (malloc.py); once per process
    cfg = cfg or EvalConfig()
    paths = [p for p in run_paths(runs) if not run_info(p)["is_dataset"]]  # a dataset's run folder has no model
    if not paths:
        raise ValueError(f"No complete run folders of models in {runs}.")
    specs, configs = {}, [run_info(p)["config"] for p in paths]
    for key, field_ in (("proxy_reward_model", "reward_model"), ("gold_reward_model", "gold_reward_model")):
        found = {c.get(field_) for c in configs} - {None}
        if getattr(cfg, key) is None and len(found) > 1:
            raise ValueError(f"The runs were trained with different {field_}s {sorted(found)}; set EvalConfig.{key}.")
        specs[key] = getattr(cfg, key) or (found.pop() if found else None)
    if JUDGE in (specs["proxy_reward_model"], specs["gold_reward_model"]) and cfg.reward_judge_model is None:
        # one judge for every run, recorded as the one used: that of the runs trained with it (they must agree)
        found = {json.dumps(_reward_judge(cfg, c), sort_keys=True) for c in configs
                 if JUDGE in (c.get("reward_model"), c.get("gold_reward_model"))}
        if len(found) > 1:
            raise ValueError(f"The runs were trained with different reward judges {sorted(found)}; set "
                             "EvalConfig.reward_judge_model (and reward_judge_principle).")
        chosen = json.loads(found.pop()) if found else _reward_judge(cfg, {})
        specs["reward_judge_model"], specs["reward_judge_principle"] = chosen["judge_model"], chosen["judge_principle"]
    if cfg.data is None:  # one held-out split for all: the first run's (check_not_trained_on guards the others), from
        first = run_info(paths[0])["config"]["data"]  # cfg.data_source where it names one
        specs["data"] = data.DataConfig(**{k: v for k, v in first.items() if k not in ("half", "n_train")})
        if cfg.data_source:
            specs["data"] = dataclasses.replace(specs["data"], source=cfg.data_source)
    if cfg.length_tokenizer is None:  # one unit for every run: the tokens of the first policy run's base model
        policies = [p for p in paths if not run_info(p)["is_reward_model"]]
        specs["length_tokenizer"] = (run_info(policies[0])["config"]["model"]["model_name_or_path"] if policies
                                     else models.EMBEDDED_POLICY)
    cfg = dataclasses.replace(cfg, **specs)
    log.info(f"[evaluate] length baseline in tokens of {cfg.length_tokenizer}")
    if pairs is None:
        pairs, _ = sources.load_pairs(cfg.data)
    length = fit_length_baseline(cfg.length_tokenizer, cfg.data, pairs)
    log.info(f"[evaluate] length baseline: {length.rule.describe()} (fitted on {length.rule.n_train} training pairs, "
             f"training accuracy {length.rule.train_accuracy:.3f})")
    proxy, gold = _load_rewards(cfg)
    judged = None
    if cfg.judge_model:  # judged once: the pairs are the same for every run
        _, eval_pairs, _ = eval_set(cfg.data, cfg.n_prompts, cfg.n_pairs, pairs)
        judged = judge_agreement(cfg, eval_pairs)
    # one SFT adapter's log-probs on the pairs serve its run and every arm trained from it; what the reward models
    # say of the fixed prompts and pairs is the same for every run
    shared = {"pairs": pairs, "length": length, "judged": judged, "logps_cache": {}, "reward_cache": {}}
    # with workers: the runs not evaluated yet go to them, policies first (the reward models' runs are short)
    todo = [p for p in paths if not (p / "eval" / cfg.name / "summary.json").exists()] if cfg.workers > 1 else []
    todo = sorted(todo, key=lambda p: run_info(p)["is_reward_model"]) if len(todo) > 1 else []
    for i, p in enumerate(p for p in paths if p not in todo):
        log.info(f"[evaluate] {i + 1}/{len(paths)} {p.name}")
        evaluate_run(p, cfg, proxy=proxy, gold=gold, **shared)
    if todo:
        _evaluate_in_workers(todo, cfg, proxy, gold, shared)
    return paths


def _evaluate_in_workers(todo: list[Path], cfg: EvalConfig, proxy, gold, shared: dict) -> None:
    """``evaluate_runs``' runs not yet evaluated, in ``cfg.workers`` spawned processes with their share of the threads."""
    # first, in this process: what the reward models say of the prompts and pairs, and the log-probs on the pairs
    # of the weights several runs share (an SFT adapter), so that no worker computes them again
    prompts, eval_pairs, _ = eval_set(cfg.data, cfg.n_prompts, cfg.n_pairs, shared["pairs"])
    shared["reward_cache"].update(reward_readings(proxy, gold, prompts, eval_pairs))
    for p in _runs_with_shared_weights(todo):
        log.info(f"[evaluate] log-probs on the pairs of {p.name}, which other runs share")
        model, tokenizer = load_run_policy(p)
        scoring.score_pairs(model, tokenizer, eval_pairs[: cfg.policy_pairs], max_length=cfg.max_length, cache=shared["logps_cache"],
                            **_weights_keys(p))
        del model
    threads = max(1, torch.get_num_threads() // cfg.workers)
    log.info(f"[evaluate] {len(todo)} runs in {min(cfg.workers, len(todo))} processes of {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or kernel state
    tqdm_before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm in the workers as they start; this process's tqdm read it already
    try:
        t0, workers = time.time(), min(cfg.workers, len(todo))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start,
                                 initargs=(cfg, shared, threads)) as pool:
            futures = [pool.submit(_worker_evaluate, str(p)) for p in todo]
            for i, future in enumerate(as_completed(futures), 1):
                took = time.time() - t0  # the runs left, at the mean pace so far (policies go first: an upper bound)
                left = f", ~{(len(todo) - i) * took / i / 60:.1f} min left" if i < len(todo) else ""
                console.progress(log, f"[evaluate] {i}/{len(todo)} done in {took / 60:.1f} min{left}: "
                    f"{Path(future.result()).parent.parent.name}")
    finally:
        if tqdm_before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = tqdm_before


def _load_rewards(cfg: EvalConfig) -> tuple:
    """(proxy, gold) reward functions of an evaluation whose specs ``evaluate_runs`` resolved (None where unset)."""
    from ..modeling.rewards import JUDGE, load_reward

    return tuple(load_reward(spec, name=name, **(_reward_judge(cfg, {}) if spec == JUDGE else {})) if spec else None
                 for spec, name in ((cfg.proxy_reward_model, "proxy"), (cfg.gold_reward_model, "gold")))


def _runs_with_shared_weights(paths: list[Path]) -> list[Path]:
    """The runs whose log-probs on the pairs ``evaluate_runs`` computes in its own process before the workers
    start: those whose weights other runs have as their reference (an SFT run: its adapter is the reference of
    every arm trained from it), and one run for each reference not covered so. Their entries in the log-prob cache
    go to every worker, so no reference pass is computed twice."""
    keys = {p: _weights_keys(p) for p in paths if not run_info(p)["is_reward_model"]}
    references = {k["reference_key"] for k in keys.values()}
    first = [p for p, k in keys.items() if k["policy_key"] in references]
    covered = {key for p in first for key in keys[p].values()}
    for p, k in keys.items():
        if k["reference_key"] not in covered:
            first.append(p)
            covered.update(k.values())
    return first


_worker: dict = {}


def _worker_start(cfg: EvalConfig, shared: dict, threads: int) -> None:
    """A worker process of ``evaluate_runs``: its threads, no progress bars and no per-run lines (they would interleave
    with the other workers'; the parent prints one line as each run ends; tqdm's are off through the environment it
    was started with; errors still reach stderr and the parent), and the reward models loaded once."""
    import sys

    import transformers

    transformers.utils.logging.disable_progress_bar()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the worker's whole life
    torch.set_num_threads(threads)
    proxy, gold = _load_rewards(cfg)
    _worker.update(cfg=cfg, kwargs={"proxy": proxy, "gold": gold, **shared})


def _worker_evaluate(path: str) -> str:
    return str(evaluate_run(Path(path), _worker["cfg"], **_worker["kwargs"]))


def _reward_judge(cfg: EvalConfig, saved: dict) -> dict:
    """The judge of a proxy or gold reward "judge": ``cfg.reward_judge_model`` / ``_principle`` where set, else the
    run's own (its saved ``judge_model`` / ``judge_principle``), else the embedded policy and the default principle."""
    from ..modeling.judge import DEFAULT_PRINCIPLE

    return {"judge_model": cfg.reward_judge_model or saved.get("judge_model") or models.EMBEDDED_POLICY,
            "judge_principle": cfg.reward_judge_principle or saved.get("judge_principle") or DEFAULT_PRINCIPLE}


def judge_agreement(cfg: EvalConfig, eval_pairs: list[dict]) -> tuple[dict, list]:
    """The AI judge of ``cfg.judge_model`` on the evaluation's pairs: (summary, per-pair records), ``judge.agreement``."""
    from ..modeling.judge import Judge, agreement

    judge = Judge.load(cfg.judge_model, principle=cfg.judge_principle)
    summary, records = agreement(judge, eval_pairs, cfg.n_bootstrap, cfg.seed)
    log.info(f"[evaluate] judge {cfg.judge_model}: agreement with the human labels {summary['judge/accuracy']:.3f} "
             f"[{summary['judge/accuracy_lo']:.3f}, {summary['judge/accuracy_hi']:.3f}] on {len(eval_pairs)} pairs, "
             f"position bias {summary['judge/position_bias']:+.3f}")
    return summary, records
