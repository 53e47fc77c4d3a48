"""The main job on the embedded default, step by step; `python -m workbench main` runs it.

Today: load and validate HH-RLHF → load the policy (4-bit base + LoRA) → score held-out pairs under the policy
and its adapter-disabled reference → write a run folder. The training arms and the evaluation extend it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import data, logprobs, models, scoring
from .runs import Run


@dataclass
class MainConfig:
    """The main job's settings; defaults run on 2 CPU cores in about a minute once the model is cached."""

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


def _step(msg: str, t0: float) -> None:
    print(f"[main {time.time() - t0:6.1f}s] {msg}", flush=True)


def run_main(cfg: MainConfig | None = None) -> Run:
    """Run the main job and return its (completed) run; its folder is ``run.path``."""
    cfg = cfg or MainConfig()
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
        _, heldout, split_info = data.split_heldout(examples, cfg.heldout_fraction, seed=cfg.seed)
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
        run.write_records("pairs", records)
        run.summary = {**scoring.summarize(records), "data/kept": report.kept, "data/read": report.read,
                       "time/total_s": round(time.time() - t0, 1)}
        run.log(run.summary, step=0)
        _step("summary:", t0)
        for k, v in run.summary.items():
            print(f"    {k:38s} {v:.4g}" if isinstance(v, float) else f"    {k:38s} {v}")
        print("    (the adapter is fresh, so policy == reference and implicit rewards are 0 until a training arm runs)")
    _step(f"run folder: {run.path}", t0)
    return run
