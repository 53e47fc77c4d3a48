"""The plan of an evaluation: what is evaluated, on which prompts and pairs, under which settings, from the run
folders alone. Nothing here loads a policy or samples.

``EvalConfig`` (what an evaluation samples and scores), ``eval_set`` (the held-out prompts and pairs, the same for
every run), ``check_not_trained_on`` (no run, nor a run it was built from, trained on them), ``plan_run`` (one run's
settings as resolved from its folder: data, reward models, β, the length tokenizer, and the record that decides whether
an evaluation already there is kept), ``resolve`` (one set of settings for many runs), ``fit_length_baseline`` (the
length-only rule every run is compared with), ``weights_keys`` / ``runs_with_shared_weights`` (which runs share
weights, so their log-probs are computed once).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..core import console, methods, stats
from ..modeling import data, models, scoring, sources
from ..modeling.runs import is_complete, run_info, to_jsonable

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


@dataclass
class RunPlan:
    """One run's evaluation as resolved from its folder and the EvalConfig: where it goes (``out``), its data, reward
    models, β and length tokenizer, and ``record``, the settings written to ``config.json`` that decide whether an
    evaluation already there is kept."""

    run_path: Path
    info: dict  # runs.run_info
    out: Path
    data: data.DataConfig
    proxy_spec: str | None
    gold_spec: str | None
    judge: dict | None  # a reward "judge": which judge and principle
    beta: float
    length_tokenizer: str
    record: dict


def plan_run(run_path: Path, cfg: EvalConfig) -> RunPlan:
    """``cfg`` resolved for one run folder: unset fields take the run's own (its data, its reward models, its β)."""
    from ..modeling.rewards import JUDGE

    info = run_info(run_path)
    saved = info["config"]
    data_cfg = cfg.data or data.DataConfig(**saved["data"])
    proxy_spec = cfg.proxy_reward_model or saved.get("reward_model")
    gold_spec = cfg.gold_reward_model or saved.get("gold_reward_model")
    judge = reward_judge(cfg, saved) if JUDGE in (proxy_spec, gold_spec) else None
    beta = cfg.beta or (info["beta"] if methods.of(info["method"]).has_reference else None) or 0.1
    length_name = cfg.length_tokenizer or (models.EMBEDDED_POLICY if info["is_reward_model"]
                                           else saved["model"]["model_name_or_path"])
    if cfg.length_tokenizer is None:
        whose = "the default policy" if info["is_reward_model"] else "the run's base model"
        log.info(f"[evaluate] {run_path.name}: length baseline in tokens of {length_name} ({whose})")
    # how many processes evaluated at once changes the time, not what is measured
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("reward_judge_model", "reward_judge_principle", "workers")}
    record = to_jsonable({**settings, "data": data_cfg, "proxy_reward_model": proxy_spec,  # as resolved for this run
                          "gold_reward_model": gold_spec, "beta": beta, "reference": info["reference"],
                          "length_tokenizer": length_name, "reward_judge": judge})
    return RunPlan(run_path, info, run_path / "eval" / cfg.name, data_cfg, proxy_spec, gold_spec, judge, beta,
                   length_name, record)


def already_done(plan: RunPlan, overwrite: bool) -> bool:
    """Whether the evaluation in ``plan.out`` was made under these settings (then it is kept). One written before a
    setting existed is redone; one under other settings is an error unless ``overwrite``."""
    out, record = plan.out, plan.record
    if not (out / "summary.json").exists():
        return False
    before = json.loads((out / "config.json").read_text())
    # a setting added since, and off now (None: e.g. no judge, no column mapping), changes nothing that was
    # measured, at any depth (a field added to the data config)
    unset = {k for k, v in record.items() if k not in before and v is None}
    if {k: v for k, v in before.items() if k not in ("prompt_ids", "pair_ids", "length_rule", "torch_threads")} == \
            _without_new_unset(record, before):
        log.info(f"[evaluate] {plan.run_path.name}: already evaluated as '{out.name}', kept")
        return True
    if set(record) - set(before) - unset:  # written before some of these settings existed: redo it
        log.info(f"[evaluate] {plan.run_path.name}: '{out.name}' predates {sorted(set(record) - set(before) - unset)}, redone")
    elif not overwrite:
        raise FileExistsError(f"{out} holds an evaluation under other settings; pick another EvalConfig.name "
                              "or pass overwrite=True.")
    return False


def resolve(paths: list[Path], cfg: EvalConfig) -> EvalConfig:
    """One set of settings for every run of an evaluation: the reward models (``cfg``'s, else those the RL runs were
    trained and measured with: they must agree), the reward judge, the held-out split (the first run's, or
    ``cfg.data_source``), and the length tokenizer (the first policy run's base model)."""
    from ..modeling.rewards import JUDGE

    specs, configs = {}, [run_info(p)["config"] for p in paths]
    for key, field_ in (("proxy_reward_model", "reward_model"), ("gold_reward_model", "gold_reward_model")):
        found = {c.get(field_) for c in configs} - {None}
        if getattr(cfg, key) is None and len(found) > 1:
            raise ValueError(f"The runs were trained with different {field_}s {sorted(found)}; set EvalConfig.{key}.")
        specs[key] = getattr(cfg, key) or (found.pop() if found else None)
    if JUDGE in (specs["proxy_reward_model"], specs["gold_reward_model"]) and cfg.reward_judge_model is None:
        # one judge for every run, recorded as the one used: that of the runs trained with it (they must agree)
        found = {json.dumps(reward_judge(cfg, c), sort_keys=True) for c in configs
                 if JUDGE in (c.get("reward_model"), c.get("gold_reward_model"))}
        if len(found) > 1:
            raise ValueError(f"The runs were trained with different reward judges {sorted(found)}; set "
                             "EvalConfig.reward_judge_model (and reward_judge_principle).")
        chosen = json.loads(found.pop()) if found else reward_judge(cfg, {})
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
    return dataclasses.replace(cfg, **specs)


def reward_judge(cfg: EvalConfig, saved: dict) -> dict:
    """The judge of a proxy or gold reward "judge": ``cfg.reward_judge_model`` / ``_principle`` where set, else the
    run's own (its saved ``judge_model`` / ``judge_principle``), else the embedded policy and the default principle."""
    from ..modeling.judge import DEFAULT_PRINCIPLE

    return {"judge_model": cfg.reward_judge_model or saved.get("judge_model") or models.EMBEDDED_POLICY,
            "judge_principle": cfg.reward_judge_principle or saved.get("judge_principle") or DEFAULT_PRINCIPLE}


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


def weights_keys(run_path: Path) -> dict:
    """Names of the weights ``load_run_policy`` puts behind a run's policy and its reference: the base as loaded
    (its model config less the LoRA shape, which the adapter's own config fixes) and the adapter folder."""
    saved = run_info(run_path)["config"]
    base = {k: v for k, v in saved["model"].items() if not k.startswith(("lora_", "use_rslora", "use_dora"))}
    ref = saved.get("sft_run")
    name = lambda adapter: json.dumps([base, adapter], sort_keys=True)  # noqa: E731
    return {"policy_key": name(str((run_path / "adapter").resolve())),
            "reference_key": name(str((Path(ref) / "adapter").resolve()) if ref else None)}


def runs_with_shared_weights(paths: list[Path]) -> list[Path]:
    """The runs whose log-probs on the pairs ``evaluate_runs`` computes in its own process before the workers
    start: those whose weights other runs have as their reference (an SFT run: its adapter is the reference of
    every arm trained from it), and one run for each reference not covered so. Their entries in the log-prob cache
    go to every worker, so no reference pass is computed twice."""
    keys = {p: weights_keys(p) for p in paths if not run_info(p)["is_reward_model"]}
    references = {k["reference_key"] for k in keys.values()}
    first = [p for p, k in keys.items() if k["policy_key"] in references]
    covered = {key for p in first for key in keys[p].values()}
    for p, k in keys.items():
        if k["reference_key"] not in covered:
            first.append(p)
            covered.update(k.values())
    return first


def _without_new_unset(now, before):
    """``now`` less the settings that ``before`` lacks and that are off (None), at every depth of nested settings."""
    if not isinstance(now, dict) or not isinstance(before, dict):
        return now
    return {k: _without_new_unset(v, before.get(k)) for k, v in now.items() if k in before or v is not None}
