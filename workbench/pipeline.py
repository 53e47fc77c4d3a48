"""The main job, ``python -m workbench main``: the whole study on the embedded default (``run_study``), and the
quick scoring job it grew from, ``python -m workbench score`` (``run_score``).

``run_study``: the sweep of ``grids/main.yaml`` (data → SFT → proxy and gold reward models → PPO → DPO, IPO, KTO →
evaluation of every run → figures), then the paper draft filled from the results table; it prints where
everything is. ``run_score``: load and validate HH-RLHF → load the policy (4-bit base + LoRA) → score held-out
pairs under the policy and its adapter-disabled reference → a run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import data, logprobs, models, scoring
from .runs import Run


@dataclass
class ScoreConfig:
    """The scoring job's settings; defaults run on 2 CPU cores in about a minute once the model is cached."""

    seed: int = 0  # seeds Python/NumPy/torch and the held-out split; part of the run folder's name
    subset: str = "harmless-base"  # HH-RLHF subset: harmless-base, helpful-base, helpful-online, helpful-rejection-sampled, all
    split: str = "test"  # split file to read; the held-out pairs are carved from it (seeded)
    data_source: str | None = None  # local hh-rlhf directory or "hub"; None: $WORKBENCH_HH_SOURCE, a local copy, the hub
    heldout_fraction: float = 0.1  # share of prompts held out, by a seeded hash of the prompt
    n_pairs: int = 16  # held-out pairs to score
    max_length: int = 512  # pairs longer than this (prompt + longer response, tokens) are skipped and counted
    beta: float = 0.1  # β of the implicit reward β·log(π/π_ref) (DPO paper's default, arXiv:2305.18290 §6)
    batch_size: int | None = None  # pairs per scoring forward; None: 8 on a GPU, 2 on a CPU
    runs_dir: str | None = None  # None: $WORKBENCH_RUNS, else ./runs
    model: models.ModelConfig = field(default_factory=models.ModelConfig)

    def __post_init__(self):
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1 (got {self.n_pairs}).")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1) (got {self.heldout_fraction}).")


MAIN_GRID = Path(__file__).resolve().parents[1] / "grids" / "main.yaml"


def run_study(grid: str | Path = MAIN_GRID, runs_dir: str | None = None, figures_dir: str = "figures",
              paper_path: str = "papers/draft.md", seeds: list[int] | None = None):
    """Run (or resume) the study's sweep, then fill the paper draft; returns the sweep's result. ``seeds``: the
    same study once per seed (the grid's own seed otherwise); the table and figures then show intervals across
    seeds."""
    from . import paper
    from .sweep import run_sweep

    t0 = time.time()
    result = run_sweep(grid, runs_dir=runs_dir, seeds=seeds)
    if result.table is None or result.table.empty:
        raise RuntimeError(f"The study produced no evaluated runs; see {result.state_dir}/state.json.\n{result.report()}")
    draft = paper.build(result.table, paper_path, figures_dir)
    _step("done. Where everything is:", t0)
    print(f"    run folders      {result.state_dir.parent.parent}\n"
          f"    executed notebooks in each run folder (notebook.ipynb) and {result.state_dir / 'notebooks'}\n"
          f"    results table    {len(result.table)} runs (python -m workbench evaluate {result.state_dir.parent.parent} "
          f"reprints it)\n    figures          {Path(figures_dir).resolve()}\n    paper draft      {Path(draft).resolve()}")
    if result.failed:
        print(f"    {len(result.failed)} job(s) FAILED; see above")
    return result


def _step(msg: str, t0: float) -> None:
    print(f"[main {time.time() - t0:6.1f}s] {msg}", flush=True)


def run_score(cfg: ScoreConfig | None = None) -> Run:
    """Run the main job and return its (completed) run; its folder is ``run.path``."""
    cfg = cfg or ScoreConfig()
    t0 = time.time()
    with Run("score", "embedded-demo", seed=cfg.seed, config=cfg, root=cfg.runs_dir) as run:
        # --- data
        source = data.resolve_source(cfg.data_source)
        _step(f"reading HH-RLHF {cfg.subset}/{cfg.split} from {source}", t0)
        _step(f"loading tokenizer of {cfg.model.model_name_or_path}", t0)
        tokenizer = models.load_tokenizer(cfg.model.model_name_or_path)
        examples, report = data.load_hh(cfg.subset, cfg.split, source, tokenizer=tokenizer, max_length=cfg.max_length)
        print(report.summary(), flush=True)
        run.write_json("data_report.json", report.to_dict())
        train_rows, heldout, split_info = data.split_heldout(examples, cfg.heldout_fraction, seed=cfg.seed)
        run.write_json("split.json", {**split_info, "heldout_ids": [ex["id"] for ex in heldout]})
        pairs = heldout[: cfg.n_pairs]
        _step(f"held out {len(heldout)} of {len(examples)} pairs (seed {cfg.seed}); scoring {len(pairs)}", t0)

        # --- model
        quant = "4-bit NF4" if cfg.model.load_in_4bit else "8-bit" if cfg.model.load_in_8bit else "unquantized"
        _step(f"loading policy {cfg.model.model_name_or_path} ({quant}, LoRA r={cfg.model.lora_r}) on {models.device()}", t0)
        policy, tokenizer = models.load_policy(cfg.model)
        n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        _step(f"policy ready: {n_train:,} trainable LoRA parameters; reference = same weights, adapter disabled", t0)

        # --- score
        _step(f"scoring {len(pairs)} pairs under policy and reference (batch {cfg.batch_size or logprobs.default_batch_size()})", t0)
        records = scoring.score_pairs(policy, tokenizer, pairs, beta=cfg.beta, batch_size=cfg.batch_size)
        length_rule = scoring.fit_length_rule(tokenizer, train_rows)  # the length baseline, fitted on training pairs
        scoring.add_lengths(records, pairs, tokenizer, length_rule)
        run.write_records("pairs", records)
        run.summary = {**scoring.summarize(records, length_rule), "data/kept": report.kept, "data/read": report.read,
                       "time/total_s": round(time.time() - t0, 1)}
        run.log(run.summary, step=0)
        _step("summary:", t0)
        for k, v in run.summary.items():
            print(f"    {k:38s} {v:.4g}" if isinstance(v, float) else f"    {k:38s} {v}")
        print("    (the adapter is fresh, so policy == reference and implicit rewards are 0 until a training arm runs)")
    _step(f"run folder: {run.path}", t0)
    return run
