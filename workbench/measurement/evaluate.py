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

The evaluation in three parts, one way through: ``plan.py`` (what is evaluated, on which prompts and pairs, under which
settings, from the run folders alone), ``measure.py`` (the measurements, each a function over a batch: samples, pairs,
rewards, the judge; the pair measure is the training-time look's), and this module, the runner: it loads each run's
weights, runs the measurements, writes the evaluation folder, and spreads many runs over worker processes.

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
import multiprocessing
import os
import pickle
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import console, malloc
from ..modeling import models, scoring, sources
from ..modeling.runs import atomic_folder, run_info, run_paths, snapshots, write_json, write_jsonl
from ..training import cards
from . import measure, plan
from .plan import EvalConfig, LengthBaseline, check_not_trained_on, eval_set, fit_length_baseline

log = console.logger(__name__)

__all__ = ["EvalConfig", "Shared", "check_not_trained_on", "eval_set", "evaluate_run", "evaluate_runs",
           "fit_length_baseline", "load_run_policy"]


@dataclass
class Shared:
    """What the runs of one evaluation share, loaded or computed once by ``evaluate_runs`` and handed to each
    ``evaluate_run`` (each left None or empty is loaded or computed for the run itself): the dataset's pairs; the
    length baseline (``fit_length_baseline``); the proxy and gold reward functions; the AI judge's (summary, records)
    on the pairs; ``logps``, log-probs on the pairs by weights, so those of one set of weights (an SFT run's adapter:
    that run's policy and the reference of every arm trained from it) are computed once (``scoring.score_pairs``);
    ``readings``, what the reward models say of the fixed prompts and pairs (``measure.reward_readings``), filled on
    first use."""

    pairs: list[dict] | None = None
    length: LengthBaseline | None = None
    proxy: object = None
    gold: object = None
    judged: tuple[dict, list] | None = None
    logps: dict = field(default_factory=dict)
    readings: dict = field(default_factory=dict)


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


def evaluate_run(run_path, cfg: EvalConfig | None = None, *, overwrite: bool = False,
                 shared: Shared | None = None) -> Path:
    """Evaluate one run folder into ``<run>/eval/<cfg.name>/`` and return that folder. An evaluation already there
    under the same settings is kept (evaluations resume); under other settings it is an error unless ``overwrite``
    (one written before a setting existed is redone; ``plan.already_done``). ``shared``: what ``evaluate_runs``
    loaded once for all its runs (``Shared``)."""
    from ..modeling.rewards import JUDGE, load_reward

    run_path, cfg, shared = Path(run_path), cfg or EvalConfig(), shared or Shared()
    p = plan.plan_run(run_path, cfg)
    if plan.already_done(p, overwrite):
        return p.out
    t0 = time.time()
    prompts, eval_pairs, all_pairs = eval_set(p.data, cfg.n_prompts, cfg.n_pairs, shared.pairs)
    check_not_trained_on(run_path, prompts, all_pairs, eval_pairs)
    length = shared.length
    if length is None or (length.tokenizer_name, length.data) != (p.length_tokenizer, p.data):
        length = fit_length_baseline(p.length_tokenizer, p.data, all_pairs)
    proxy, gold = shared.proxy, shared.gold
    if proxy is None and p.proxy_spec:
        proxy = load_reward(p.proxy_spec, name="proxy", **(p.judge if p.proxy_spec == JUDGE else {}))
    if gold is None and p.gold_spec:
        gold = load_reward(p.gold_spec, name="gold", **(p.judge if p.gold_spec == JUDGE else {}))

    with atomic_folder(p.out) as partial:
        write_json(partial / "config.json", {**p.record, "prompt_ids": [q["id"] for q in prompts],
                                             "pair_ids": [ex["id"] for ex in eval_pairs],
                                             "length_rule": length.rule.to_dict(),
                                             "torch_threads": torch.get_num_threads()})
        if not shared.readings:
            shared.readings.update(measure.reward_readings(proxy, gold, prompts, eval_pairs))
        chosen_scores, summary, gens, policy = shared.readings["chosen"], {}, [], None
        if p.info["is_reward_model"]:  # a reward model is evaluated by how it ranks held-out pairs
            rm = load_reward(str(run_path))
            pair_records = scoring.score_pairs_with_reward(rm.model, rm.tokenizer, eval_pairs, max_length=cfg.max_length)
            del rm
        else:  # a policy by its samples and its implicit reward on the pairs
            policy = load_run_policy(run_path)  # loaded once for its snapshots too
            gens = measure.sample_and_score(*policy, prompts, cfg, proxy, gold, chosen_scores, p.beta)
            pair_records = measure.policy_pairs(*policy, eval_pairs, cfg, p.beta, shared.logps,
                                                plan.weights_keys(run_path))
            summary.update(measure.generation_summary(gens, cfg))
        summary.update(measure.pair_summary(pair_records, eval_pairs, length, p.info["method"], cfg))
        summary.update(shared.readings["summary"])
        if cfg.snapshots and policy is not None:  # its snapshots by their samples, after the final adapter's pairs
            steps = _evaluate_snapshots(run_path, policy, cfg, p.beta, prompts, proxy, gold, chosen_scores, partial)
            summary["eval/snapshots"] = len(steps)
        del policy
        if cfg.best_of_n and p.info["is_reward_model"] and gold is not None:
            from ..training import best_of_n, gold_pairs

            source = gold_pairs.dataset_of(run_path)
            if source is not None:  # a proxy trained on a gold-labelled dataset: best-of-n against it, measured by gold
                rows, bon = best_of_n.evaluate(run_path, source, p.gold_spec, cfg.n_bootstrap, cfg.seed)
                write_jsonl(partial / "best_of_n.jsonl", rows)
                summary.update(bon)
        if cfg.judge_model:  # the AI judge on the same pairs, beside the reward models and the length rule
            judged = shared.judged or measure.judge_agreement(cfg, eval_pairs)
            summary.update({k.replace("judge/", "pairs/judge_"): v for k, v in judged[0].items()})
            write_jsonl(partial / "judge.jsonl", judged[1])
        write_jsonl(partial / "generations.jsonl", gens)
        write_jsonl(partial / "pairs.jsonl", pair_records)
        write_json(partial / "summary.json", {**summary, "time/eval_s": round(time.time() - t0, 1)})
    cards.write_model_card(run_path)  # the adapter's card now shows this evaluation too
    log.info(f"[evaluate] {run_path.name}: {p.out}")
    return p.out


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
        gens = measure.sample_and_score(model, tokenizer, prompts, snap_cfg, proxy, gold, chosen_scores, beta)
        folder = out / "steps" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "generations.jsonl", gens)
        write_json(folder / "summary.json", {"step": step, "n_prompts": len(prompts), "n_samples": snap_cfg.n_samples,
                                             **measure.generation_summary(gens, snap_cfg)})
        steps.append(step)
        log.info(f"[evaluate] {run_path.name}: snapshot at step {step} evaluated")
    return steps


def evaluate_runs(runs, cfg: EvalConfig | None = None, *, pairs: list[dict] | None = None) -> list[Path]:
    """Evaluate every run (a runs root, one run folder or a list of them: ``runs.run_paths``) under one EvalConfig,
    and return the run folders evaluated (``results.results_table(paths, cfg.name)`` tabulates them). One set of
    settings serves every run (``plan.resolve``): the proxy and gold reward models, loaded once, are ``cfg``'s,
    else those the RL runs among ``runs`` were trained and measured with (they must agree); the length baseline is
    fitted once, in tokens of ``cfg.length_tokenizer``, else of the first policy run's base model. With
    ``cfg.workers`` > 1 the runs not yet evaluated are evaluated in that many processes, each with its share of this
    process's threads, after the log-probs on the pairs of the weights they share (an SFT adapter) are computed
    here; each evaluation records its thread count."""
    malloc.keep_freed_memory()  # as training: freed activations reused (malloc.py); once per process
    cfg = cfg or EvalConfig()
    paths = [p for p in run_paths(runs) if not run_info(p)["is_dataset"]]  # a dataset's run folder has no model
    if not paths:
        raise ValueError(f"No complete run folders of models in {runs}.")
    cfg = plan.resolve(paths, cfg)
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
        judged = measure.judge_agreement(cfg, eval_pairs)
    shared = Shared(pairs=pairs, length=length, proxy=proxy, gold=gold, judged=judged)
    # with workers: the runs not evaluated yet go to them, policies first (the reward models' runs are short)
    todo = [p for p in paths if not (p / "eval" / cfg.name / "summary.json").exists()] if cfg.workers > 1 else []
    todo = sorted(todo, key=lambda p: run_info(p)["is_reward_model"]) if len(todo) > 1 else []
    for i, p in enumerate(p for p in paths if p not in todo):
        log.info(f"[evaluate] {i + 1}/{len(paths)} {p.name}")
        evaluate_run(p, cfg, shared=shared)
    if todo:
        _evaluate_in_workers(todo, cfg, shared)
    return paths


def _evaluate_in_workers(todo: list[Path], cfg: EvalConfig, shared: Shared) -> None:
    """``evaluate_runs``' runs not yet evaluated, in ``cfg.workers`` spawned processes with their share of the
    threads (``_worker``). A run that fails in a worker raises its error here; a worker that dies is an error."""
    # first, in this process: what the reward models say of the prompts and pairs, and the log-probs on the pairs
    # of the weights several runs share (an SFT adapter), so that no worker computes them again
    prompts, eval_pairs, _ = eval_set(cfg.data, cfg.n_prompts, cfg.n_pairs, shared.pairs)
    shared.readings.update(measure.reward_readings(shared.proxy, shared.gold, prompts, eval_pairs))
    for p in plan.runs_with_shared_weights(todo):
        log.info(f"[evaluate] log-probs on the pairs of {p.name}, which other runs share")
        model, tokenizer = load_run_policy(p)
        scoring.score_pairs(model, tokenizer, eval_pairs[: cfg.policy_pairs], max_length=cfg.max_length,
                            cache=shared.logps, **plan.weights_keys(p))
        del model
    threads = max(1, torch.get_num_threads() // cfg.workers)
    n = min(cfg.workers, len(todo))
    log.info(f"[evaluate] {len(todo)} runs in {n} processes of {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or kernel state
    tasks, done = ctx.Queue(), ctx.Queue()
    for p in todo:
        tasks.put(str(p))
    for _ in range(n):
        tasks.put(None)  # one stop sign each
    to_send = dataclasses.replace(shared, proxy=None, gold=None)  # each worker loads its own reward functions
    tqdm_before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm in the workers as they start; this process's tqdm read it already
    workers = [ctx.Process(target=_worker, args=(cfg, to_send, threads, tasks, done)) for _ in range(n)]
    try:
        for w in workers:
            w.start()
        t0 = time.time()
        for i in range(1, len(todo) + 1):
            path, error = _next_result(done, workers)
            if error is not None:
                raise error
            took = time.time() - t0  # the runs left, at the mean pace so far (policies go first: an upper bound)
            left = f", ~{(len(todo) - i) * took / i / 60:.1f} min left" if i < len(todo) else ""
            console.progress(log, f"[evaluate] {i}/{len(todo)} done in {took / 60:.1f} min{left}: {Path(path).name}")
    finally:
        for w in workers:
            if w.is_alive() and w.exitcode is None:
                w.terminate()
            w.join()
        if tqdm_before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = tqdm_before


def _next_result(done, workers) -> tuple[str, BaseException | None]:
    """The next (run folder, error) a worker reports; a worker that died without reporting is an error."""
    while True:
        try:
            return done.get(timeout=2)
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                return "?", RuntimeError(f"An evaluation worker (pid {dead[0].pid}) died with exit code "
                                         f"{dead[0].exitcode} (out of memory? killed?); its run was not evaluated. "
                                         "Evaluate again: finished runs are kept.")


def _worker(cfg: EvalConfig, shared: Shared, threads: int, tasks, done) -> None:
    """A worker process of ``evaluate_runs``: its threads, its reward models loaded once, then run folders from
    ``tasks`` until a stop sign, each reported to ``done`` as (folder, None) or (folder, its error). No progress
    bars and no per-run lines (they would interleave with the other workers'; the parent prints one line as each run
    ends; tqdm's are off through the environment it was started with; errors reach the parent)."""
    import sys

    import transformers

    transformers.utils.logging.disable_progress_bar()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the worker's whole life
    torch.set_num_threads(threads)
    shared.proxy, shared.gold = _load_rewards(cfg)
    while (path := tasks.get()) is not None:
        try:
            evaluate_run(Path(path), cfg, shared=shared)
            done.put((path, None))
        except Exception as e:  # reported, with its traceback, and raised by the parent
            error = e if _picklable(e) else RuntimeError(repr(e))
            error.__cause__ = RuntimeError(f"in the worker evaluating {path}:\n{traceback.format_exc()}")
            done.put((path, error))


def _picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


def _load_rewards(cfg: EvalConfig) -> tuple:
    """(proxy, gold) reward functions of an evaluation whose specs ``evaluate_runs`` resolved (None where unset)."""
    from ..modeling.rewards import JUDGE, load_reward

    return tuple(load_reward(spec, name=name, **(plan.reward_judge(cfg, {}) if spec == JUDGE else {})) if spec else None
                 for spec, name in ((cfg.proxy_reward_model, "proxy"), (cfg.gold_reward_model, "gold")))
