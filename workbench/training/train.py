"""Every arm of the study, trained through one skeleton: SFT, the DPO family, KTO, ORPO, SimPO, the reward model
and RLOO/GRPO through TRL's trainers, PPO through our own loop (``ppo.PPOTrainer``).

One entry point, ``train(method, config) -> run folder``. The arms, their configs and ``make_config`` (flat
parameters -> a config, for the command line, the notebooks and the grids alike) live in ``arms.py``; they are
re-exported here, so that ``train.DPOArgs`` and ``train.make_config`` sit beside ``train.train``. After training, the
held-out pairs are scored by our own pass (``scoring.score_pairs``): per pair and per token; the RL arms also
sample the held-out prompts (``sampling.heldout_look``).

The reference model is never a second copy of the weights. The policy is a LoRA adapter (fresh, or the SFT
run's); TRL's DPO and KTO trainers copy that starting adapter into a frozen adapter named "ref", and the
reference is the base with "ref" active — the SFT model, or the base itself for a fresh adapter. Our scoring
uses the same "ref" adapter (``logprobs.reference_adapter``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..core import console, distributed, malloc, trackers
from ..modeling import data, models, sampling, scoring, sources
from . import cards
from .arms import ARMS, method_label
from .arms import (DATA_PARAMS, MODEL_PARAMS, Arm, DataConfig, DPOArgs, GRPOArgs, KTOArgs, ORPOArgs,  # noqa: F401
                   RewardArgs, RLOOArgs, SFTArgs, SimPOArgs, arm_of, config_fields, make_config)  # re-exported
from ..core.compute import TokenCounter
from ..modeling.judge import Judge, apply_labels, judge_labels
from ..modeling.rewards import JudgeReward, load_reward
from ..modeling.runs import Run
from .config import check_judge_fields, check_vllm, score_beta, snapshot_steps

log = console.logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the run folder keeps a diagnostic."""


# ----------------------------------------------------------------------------------------------------------
# Callbacks and the NaN guard


class _RunLogger(TrainerCallback):
    """Copies the trainer's logs into the run's metrics.jsonl."""

    def __init__(self, run: Run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.run.log(logs, step=state.global_step)


class _Snapshots(TrainerCallback):
    """Saves the policy's adapter at ``config.snapshot_steps`` of the run's steps (``RunFields.snapshots``)."""

    def __init__(self, run: Run, count: int):
        self.run, self.count, self.steps = run, count, set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = set(snapshot_steps(state.max_steps, self.count))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            self.run.save_snapshot(model, state.global_step)


class _CheckpointCounts(TrainerCallback):
    """Saves the token counts with every checkpoint, so a resumed run's compute.json counts the whole run."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / "workbench_tokens.json").write_text(json.dumps(self.counter.tokens))


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in a trainer folder (one with its token counts written last), or None."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "workbench_tokens.json").exists()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _guarded(trainer_cls, run: Run, tokenizer):
    """``trainer_cls`` with a check after every loss: a NaN/inf stops training and writes nan_diagnostic.json
    (step, loss, the batch's first tokens decoded) instead of training on."""

    class Guarded(trainer_cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if not torch.isfinite(loss).all():
                ids = next((inputs[k] for k in ("input_ids", "prompt_input_ids", "completion_input_ids") if k in inputs), None)
                batch = [tokenizer.decode(row[:64], skip_special_tokens=True) for row in ids] if ids is not None else []
                run.write_json("nan_diagnostic.json", {
                    "step": self.state.global_step, "loss": loss.detach().float().cpu().tolist(),
                    "batch_starts": batch, "hint": "lower learning_rate, check beta, or look at these examples"})
                raise NonFiniteLossError(f"loss became {loss.item()} at step {self.state.global_step}; "
                                         f"see {run.path / 'nan_diagnostic.json'}")
            return out

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


# ----------------------------------------------------------------------------------------------------------
# Validation


def validate(method: str, cfg) -> None:
    """Fail before anything loads: unknown method, wrong config class, unknown loss type, a reward missing, an SFT
    run that is not one. (Each value's own range is checked where the config is built.)"""
    if method not in ARMS:
        raise ValueError(f"Unknown method '{method}'. Known: {', '.join(ARMS)}.")
    arm = ARMS[method]
    if not isinstance(cfg, arm.config):
        raise TypeError(f"method '{method}' takes a {arm.config.__name__}, got {type(cfg).__name__}.")
    check_judge_fields(cfg)
    check_vllm(cfg)
    trackers.check(getattr(cfg, "report_to", None))
    if hasattr(cfg, "check"):  # the arm's own checks (DPO's loss types, ...), again: fields may have changed since
        cfg.check()
    if cfg.sft_run is not None:
        sft = Path(cfg.sft_run)
        if not (sft / "adapter").is_dir() or not (sft / "config.json").exists():
            raise FileNotFoundError(f"sft_run '{sft}' has no adapter/ folder or config.json: give a complete SFT run folder.")
        sft_base = json.loads((sft / "config.json").read_text()).get("model", {}).get("model_name_or_path")
        if sft_base != cfg.model.model_name_or_path:
            # an adapter only means something on the base it was trained on; the reference would be wrong
            raise ValueError(f"sft_run '{sft}' was trained on base '{sft_base}', but this run's model is "
                             f"'{cfg.model.model_name_or_path}'. Use the same base, or another SFT run.")


def _check_gold_dataset(method: str, cfg) -> None:
    """A run that reads a gold-labelled dataset (``cfg.data.source``) reads one that fits it (``gold_pairs.check_recipe``):
    an arm trained against a reference on its pairs needs pairs sampled from that reference (its SFT run on its base,
    as in the DPO paper); an RL arm measured by a gold needs the dataset's gold to be that gold."""
    from . import gold_pairs

    if not gold_pairs.is_gold_pairs(cfg.data.source):
        return
    arm = ARMS[method]
    gold = getattr(cfg, "gold_reward_model", None)
    gold_pairs.check_recipe(cfg.data.source, sft_run=cfg.sft_run, model=cfg.model.model_name_or_path, gold=gold,
                            check_policy=arm.has_reference and arm.view in ("pairs", "unpaired"),
                            who=f"this {method} run")


def _dataset(view: str, rows: list[dict], seed: int = 0):
    """The TRL dataset for an arm, with the columns its trainer needs (checked here, not deep inside TRL). The
    unpaired view's rows are shuffled by ``seed``: TRL's KTO reads them in order (its KL term pairs each row with its
    neighbours in a fixed-order batch, ``train_sampling_strategy="sequential"``), so the run's seed would otherwise
    not reach the order, and every seed of a KTO run trained the same steps."""
    have = sources.row_format(rows)
    needs = {"pairs": ("preference",), "sft": ("preference", "unpaired preference", "prompt-completion"),
             "unpaired": ("preference", "unpaired preference"), "prompts": tuple(sources.FORMATS)}[view if view in (
                 "prompts", "sft", "unpaired") else "pairs"]
    if rows and have not in needs:
        raise ValueError(f"This arm trains on {' or '.join(needs)} rows; the data is in the {have} format "
                         f"({', '.join(sources.FORMATS[have])}). {sources.FIX}.")
    if view == "prompts":  # the RL arms sample their own responses to the distinct prompts; TRL hands the reward
        # functions the other columns: "baseline", the chosen reply a pairwise judge compares with
        rows = [{"prompt": r["prompt"], "baseline": r["baseline"]} for r in data.prompt_view(rows)]
    elif view == "sft":  # prompt-completion: TRL trains on the completion tokens only (unpaired: the desirable ones)
        rows = [{"prompt": ex["prompt"], "completion": ex.get("chosen") or ex["completion"]} for ex in rows
                if ex.get("label", True)]
    elif view == "unpaired" and have == "unpaired preference":  # already one reply a row, labelled
        rows = [{k: r[k] for k in ("prompt", "completion", "label")} for r in rows]
        random.Random(seed).shuffle(rows)
    elif view == "unpaired":
        counts: dict = {}
        unpaired = data.unpaired_view(rows, counts)
        if counts["merged"] or counts["even"]:
            log.info(f"[data] the unpaired view: {len(unpaired)} replies from {len(rows)} pairs; {counts['merged']} in "
                     f"several pairs, labelled by their net wins; {counts['even']} with as many wins as losses left out")
        rows = [{k: r[k] for k in ("prompt", "completion", "label")} for r in unpaired]
        random.Random(seed).shuffle(rows)
    else:
        rows = [{k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in rows]
    if not rows:
        raise ValueError("No training examples left after filtering and the held-out split; see data_report.json.")
    return data.to_dataset(rows)


# ----------------------------------------------------------------------------------------------------------
# The trainer of each arm


def build_trainer(method: str, cfg, policy, tokenizer, dataset, run: Run, reward_fn=None):
    """TRL's trainer for ``method`` with the workbench's two additions: the NaN guard and metrics.jsonl logging.
    The RL arms get ``reward_fn`` as their one reward function."""
    arm = ARMS[method]
    cfg.output_dir = str(run.path / "trainer")
    extra = {"reward_funcs": [reward_fn]} if arm.rl else {}
    # the trackers hear TRL's logs through the run (run.log, as PPO's and online DPO's): none of TRL's own as well
    # and the hub push is the run folder's, once it is complete (cards.push_to_hub), not TRL's output folder's
    report_to, push, cfg.report_to, cfg.push_to_hub = cfg.report_to, cfg.push_to_hub, "none", False
    try:
        trainer = _guarded(arm.trainer, run, tokenizer)(
            model=policy, args=cfg, train_dataset=dataset, processing_class=tokenizer, callbacks=[_RunLogger(run)],
            **extra)
    finally:
        cfg.report_to, cfg.push_to_hub = report_to, push
    # Mixed precision: every trained parameter stays float32 (bf16 compute comes from TRL's autocast). TRL's
    # RewardTrainer casts the trainable parameters of a quantized model to bf16 (QLoRA's advice); undo that.
    for p in policy.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return trainer


def _load_and_build(method: str, cfg, train_rows: list[dict], run: Run, reward_fn, gold_fn):
    """(policy, tokenizer, trainer): the model the arm trains and the trainer that trains it. PPO's model holds
    three adapters (policy, reference, critic) and a value head on one base (``ppo.load_actor_critic``); TRL's DPO
    and KTO trainers copy the starting adapter into a frozen "ref" adapter, the reference."""
    arm = ARMS[method]
    if hasattr(arm.trainer, "build"):  # our own loops load their own model(s): PPO's three adapters, online DPO's
        return arm.trainer.build(cfg, train_rows, run, reward_fn, gold_fn)
    sft_adapter = str(Path(cfg.sft_run) / "adapter") if cfg.sft_run else None
    load = models.load_reward_model if arm.facts.role == "reward-model" else models.load_policy
    policy, tokenizer = load(cfg.model, adapter=sft_adapter)
    trainer = build_trainer(method, cfg, policy, tokenizer, _dataset(arm.view, train_rows, cfg.seed), run, reward_fn)
    return policy, tokenizer, trainer


def add_pair_losses(method: str, cfg, records: list[dict]) -> None:
    """Add each held-out pair's loss under the arm's own objective (its ``Arm.pair_losses``: our reference formulas)
    to its record, as ``loss/<name>``; an arm without one adds nothing."""
    pair_losses = ARMS[method].pair_losses
    if not records or pair_losses is None:
        return
    col = lambda key: torch.tensor([float(r[key]) for r in records])  # noqa: E731
    per_type = pair_losses(cfg, *(col(k) for k in ("policy_chosen_logp", "policy_rejected_logp",
                                                   "reference_chosen_logp", "reference_rejected_logp",
                                                   "chosen_tokens", "rejected_tokens")))
    for name, values in per_type.items():
        for r, v in zip(records, values.tolist()):
            r[f"loss/{name}"] = v



REQUIRED_COLUMNS = ("id", "prompt", "chosen", "rejected")


def check_pairs(pairs: list[dict], where: str = "pairs") -> None:
    """Preference pairs in the data layer's format, or a ValueError naming the first bad row and what is missing."""
    for i, row in enumerate(pairs):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{where}[{i}] lacks column(s) {missing}; each pair needs {list(REQUIRED_COLUMNS)} "
                             "(prompt: list of messages; chosen/rejected: a list with one assistant message).")
        for side in ("chosen", "rejected"):
            if not (isinstance(row[side], list) and len(row[side]) == 1 and row[side][0].get("role") == "assistant"):
                raise ValueError(f"{where}[{i}] ('{row['id']}'): '{side}' must be [{{'role': 'assistant', 'content': ...}}].")


# ----------------------------------------------------------------------------------------------------------
# The entry point: one skeleton for every arm


def train(method: str, cfg=None, pairs: list[dict] | None = None, reward_fn=None, gold_fn=None) -> Path:
    """Train one arm and return its run folder (config, env, metrics, adapter, per-sample records, summary).

    The same steps for every arm: run folder → reward models (RL arms) → model → data → the arm's trainer (TRL's,
    or ``ppo.PPOTrainer``) under a token counter → compute.json → the adapter (and PPO's critic) → held-out pairs
    scored per pair and per token, and for the RL arms fresh samples of held-out prompts → summary.json.

    ``pairs``: your own preference pairs (data layer format) instead of HH-RLHF; split and scored the same way.
    ``reward_fn`` / ``gold_fn`` (RL arms): a TRL-style reward function instead of ``cfg.reward_model`` /
    ``cfg.gold_reward_model``, e.g. ``rewards.TokenSetReward`` or your own.
    """
    malloc.keep_freed_memory()  # freed activations reused, not faulted back in (malloc.py); once per process
    arm = ARMS.get(method)
    cfg = cfg if cfg is not None else (arm.config() if arm else None)
    validate(method, cfg)
    if arm.view == "dataset":  # a stage that writes a dataset (gold-pairs), not a policy
        return arm.trainer(cfg)
    if pairs is not None:
        check_pairs(pairs)
    _check_gold_dataset(method, cfg)
    judged = getattr(cfg, "labeller", None) == "judge"  # online DPO labelled by the AI judge needs no reward model
    if arm.rl and reward_fn is None and cfg.reward_model is None and not judged:
        raise ValueError(f"{method} needs a reward: set reward_model (a reward run folder or a model name) or pass reward_fn.")
    t0 = time.time()
    resumable = getattr(cfg, "checkpoint_every", None) is not None
    with Run(method_label(method, cfg), cfg.run_name, cfg.seed, config=cfg, root=cfg.runs_dir, run_id=cfg.run_id,
             resume=resumable) as run:
        # --- the reward models the RL arms learn from (proxy) and are measured by (gold)
        if arm.rl:  # "judge": the AI judge of cfg.judge_model (rewards.JudgeReward)
            judge_args = {"judge_model": cfg.judge_model, "judge_principle": cfg.judge_principle}
            reward_fn = reward_fn or (load_reward(cfg.reward_model, name="proxy", **judge_args) if cfg.reward_model else None)
            gold_fn = gold_fn or (load_reward(cfg.gold_reward_model, name="gold", **judge_args)
                                  if cfg.gold_reward_model else None)

        if trackers.names(cfg.report_to) and run.scratch is None:  # experiment trackers, fed by run.log (rank 0)
            run.trackers = trackers.Trackers(cfg.report_to, run.partial_path / "logs", run.folder)

        # --- data: training rows, and held-out pairs scored at the end
        tokenizer = models.load_tokenizer(cfg.model.model_name_or_path)
        train_rows, heldout, report, split_info = sources.load_for_run(cfg.data, cfg.seed, tokenizer, pairs)
        if report is not None:
            run.write_json("data_report.json", report.to_dict())
        run.write_json("split.json", split_info)
        counter = TokenCounter(gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)))

        # --- AI feedback: the training pairs as the judge labels them; the held-out pairs keep the human labels
        labels_summary, human_rows = {}, train_rows
        if cfg.pair_labels == "judge":
            distributed.init_distributed()  # under torchrun each process judges its share: pairs rank, rank + n, ...
            rank, n_proc = distributed.world()
            judge = Judge.load(cfg.judge_model, principle=cfg.judge_principle)
            counter.attach(judge.model, role="judge")
            label_records = distributed.gather_rows(judge_labels(judge, train_rows[rank::n_proc]))
            train_rows, labels_summary = apply_labels(train_rows, label_records)
            run.write_records("judge_labels", label_records)
            del judge
            log.info(f"[train] {method}: the judge relabelled {labels_summary['labels/n_pairs']} training pairs: "
                     f"{labels_summary['labels/swapped']} swapped, {labels_summary['labels/ties']} ties dropped")

        # --- the model and its trainer; train under the token counter (compute.json)
        policy, tokenizer, trainer = _load_and_build(method, cfg, train_rows, run, reward_fn, gold_fn)
        counter.attach(policy)
        for scorer in (reward_fn, getattr(trainer, "judge", None)):  # what scores the samples: reward model or judge
            if getattr(scorer, "model", None) is not None:
                counter.attach(scorer.model, role="judge" if isinstance(scorer, (Judge, JudgeReward)) else "reward")
        if cfg.snapshots and isinstance(trainer, Trainer) and hasattr(policy, "peft_config"):  # TRL's arms; PPO and
            trainer.add_callback(_Snapshots(run, cfg.snapshots))  # online DPO save their own (their loops' steps)
        checkpoint = None
        if resumable:  # a killed attempt's last checkpoint: its steps, metrics and token counts carry on from there
            trainer.add_callback(_CheckpointCounts(counter))
            checkpoint = _last_checkpoint(Path(cfg.output_dir))
            if checkpoint is not None:
                counter.tokens = {**counter.tokens, **json.loads((checkpoint / "workbench_tokens.json").read_text())}
                run.drop_metrics_after(int(checkpoint.name.split("-")[1]))
                log.info(f"[train] {method}: resuming from {checkpoint}")
        result = trainer.train(resume_from_checkpoint=str(checkpoint)) if checkpoint else trainer.train()
        counter.detach()
        counter.sum_over_processes()
        run.write_json("compute.json", counter.to_dict(wall_time_s=result.metrics.get("train_runtime")))

        # --- save: the adapter (a fully fine-tuned reward encoder: its weights), and what else the trainer trains
        if getattr(cfg, "output_dir", None):  # TRL's trainer folder: nothing to keep (save_strategy="no")
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
        if hasattr(policy, "peft_config"):  # loadable elsewhere: the tokenizer beside it, the base by a portable name
            policy.save_pretrained(run.path / "adapter", selected_adapters=["default"])
            if run.scratch is None:
                cards.make_portable(run.path / "adapter", tokenizer, run.config["model"])
        else:
            policy.save_pretrained(run.path / "model")
            tokenizer.save_pretrained(run.path / "model")
        if hasattr(trainer, "save_critic"):
            trainer.save_critic(run.path / "critic")

        # --- score held-out pairs: per pair and per token for a policy, per pair for a reward model
        summary = ({} if run.scratch is not None else  # another rank under torchrun: rank 0 looks and writes
                   _heldout_summary(method, cfg, policy, tokenizer, human_rows, heldout, run, reward_fn, gold_fn))
        run.summary = {
            **{f"eval/{k}": v for k, v in summary.items()},
            "train/loss": result.training_loss,
            "train/steps": result.global_step,
            "train/pairs": len(train_rows),
            **labels_summary,
            **getattr(trainer, "summary", {}),
            "time/train_s": result.metrics.get("train_runtime"),
            "time/total_s": round(time.time() - t0, 1),
        }
        if not all(math.isfinite(v) for v in run.summary.values() if isinstance(v, float)):
            raise NonFiniteLossError(f"non-finite summary: {json.dumps(run.summary, default=str)}")
    if run.scratch is None and cards.write_model_card(run.path) and cfg.push_to_hub:
        url = cards.push_to_hub(run.path, cfg.hub_model_id or f"{run.folder}")
        log.info(f"[train] {method}: adapter pushed to the hub: {url}")
    log.info(f"[train] {method}: run folder {run.path}")
    return run.path


def _heldout_summary(method: str, cfg, policy, tokenizer, train_rows, heldout, run: Run, reward_fn, gold_fn) -> dict:
    """The run's own held-out look, as summary metrics (the comparison across arms is ``evaluate``'s), beside the
    length-only baseline: a rule fitted on this run's training pairs with their human labels (as the held-out pairs
    keep theirs, whoever labelled what the run trained on), lengths in this run's tokens."""
    arm = ARMS[method]
    fmt = sources.row_format(train_rows)
    if fmt != "preference":  # the look scores held-out pairs beside a length rule fitted on training pairs
        log.info(f"[train] {method}: the data is in the {fmt} format, not pairs: no held-out pair look")
        return {}
    scored = heldout[: cfg.data.n_score]
    length_rule = scoring.fit_length_rule(tokenizer, train_rows)
    beta = score_beta(cfg, arm.scores_with_own_beta)
    if arm.rl:  # fresh samples with reward and per-token KL, and the pairs' log-ratio drift
        eval_summary = sampling.heldout_look(
            policy, tokenizer, heldout, run, reward_fn=reward_fn, gold_fn=gold_fn, n=cfg.data.n_score,
            max_prompt_length=cfg.max_prompt_length,
            max_new_tokens=getattr(cfg, "max_completion_length", None) or cfg.max_new_tokens,
            temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.score_batch_size, beta=beta,
            max_length=cfg.data.max_length, length_rule=length_rule)
        return {k.removeprefix("eval/"): v for k, v in eval_summary.items()}
    if arm.facts.role == "reward-model":
        records = scoring.score_pairs_with_reward(policy, tokenizer, scored, max_length=cfg.max_length,
                                                  batch_size=cfg.score_batch_size)
        scoring.add_lengths(records, scored, tokenizer, length_rule)
        run.write_records("heldout_pairs", records)
        return scoring.pair_metrics(records, length_rule)
    records = scoring.score_pairs(policy, tokenizer, scored, beta=beta, batch_size=cfg.score_batch_size,
                                  max_length=cfg.max_length)
    add_pair_losses(method, cfg, records)
    scoring.add_lengths(records, scored, tokenizer, length_rule)
    run.write_records("heldout_pairs", records)
    return scoring.pair_metrics(records, length_rule, reference_free=arm.facts.implicit_reward == "avg-logp")
