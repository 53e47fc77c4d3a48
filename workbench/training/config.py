"""The fields every arm's config shares, declared once.

``RunFields``: the run folder, the seed, the model, the data, the SFT run to start from, and how the held-out pairs
are scored at the end. ``RLFields``: the reward models of the arms that sample their own responses. TRL's arms add
both to TRL's own configs (``train.py``: every TRL option keeps working); our PPO adds them to its own
(``ppo.PPOArgs``). Flat parameters become one of these configs in one place, ``train.make_config``, for the command
line, the notebooks and the sweep grids alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..modeling.data import DataConfig
from ..modeling.judge import DEFAULT_PRINCIPLE
from ..modeling.models import ModelConfig

PAIR_LABELS = ("human", "judge")


@dataclass
class RunFields:
    """Fields of every arm."""

    run_name: str = "default"  # the <name> part of runs/<method>__<name>__s<seed>__<time>/
    seed: int = 0  # set first, recorded, part of the run folder name
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model and its adapter (``models.ModelConfig``)
    data: DataConfig = field(default_factory=DataConfig)  # what it trains on and holds out (``data.DataConfig``)
    sft_run: str | None = None  # an SFT run folder: the policy starts from its adapter, and it is the reference
    runs_dir: str | None = None  # None: $WORKBENCH_RUNS, else ./runs
    # the run folder's last part instead of the time it starts: a sweep sets its job id, so the job owns exactly
    # one folder, known before it runs (resume adopts it when complete, never writes a second)
    run_id: str | None = None
    score_batch_size: int | None = None  # pairs per scoring forward at the end; None: 8 on a GPU, 2 on a CPU
    # β of the implicit reward β·log π/π_ref recorded on the held-out pairs at the end; None: the arm's own β for
    # the arms trained on pairs against a reference (DPO family, KTO), else 0.1 (see ``score_beta``)
    score_beta: float | None = None
    # AI feedback (``judge.Judge``). The labels of the dataset's pairs an arm trains on: "human" (HH-RLHF's), or
    # "judge": every training pair relabelled by the judge, both orders averaged; a pair it prefers the other way
    # round is swapped, a tie dropped (RLAIF's labels, Lee et al. 2023, arXiv:2309.00267). The held-out
    # pairs keep the human labels, so the evaluation measures a judge-trained arm against people.
    pair_labels: str = "human"
    # the judge wherever one is used; hub name, local path or embedded:...; None: the embedded policy. Used by
    # pair_labels="judge", online DPO's labeller="judge" and the RL arms' reward_model="judge"
    judge_model: str | None = None
    judge_principle: str = DEFAULT_PRINCIPLE  # what the judge is asked to prefer (``judge.DEFAULT_PRINCIPLE``)
    # adapters saved at evenly spaced points of training besides the final one (2: after 1/3 and 2/3 of the steps),
    # into <run>/checkpoints/step-<n>/adapter; the evaluation measures each (the reward–KL frontier plots every
    # evaluation of a run, as the DPO paper's Fig. 2 does)
    snapshots: int = 0
    # experiment trackers, as transformers names them: "tensorboard", "wandb", "trackio", ... or a list; "none": none.
    # Every arm reports through the run's log (``trackers.py``); TensorBoard's files stay in <run>/logs/tensorboard
    report_to: str | list[str] = "none"
    # upload the run's adapter folder (adapter, tokenizer, model card) to the hub as hub_model_id when training ends
    # (``cards.push_to_hub``; a private repo). TRL's own push during training is off: the run folder is the artifact
    push_to_hub: bool = False
    hub_model_id: str | None = None  # the hub repository push_to_hub uploads to ("user/name")


@dataclass
class RLFields:
    """Fields of the arms that sample their own responses and learn from a reward model (PPO, RLOO, GRPO)."""

    # the reward optimised: a reward run folder, a sequence-classifier name/path, or "judge": the AI judge's log-odds
    # that the sample beats the dataset's chosen reply to its prompt (``rewards.JudgeReward``)
    reward_model: str | None = None
    gold_reward_model: str | None = None  # another one, only measured (over-optimisation; Gao et al. 2022)
    max_prompt_length: int = 256  # prompts longer than this keep their last tokens


def score_beta(cfg, trained_on_pairs_with_reference: bool) -> float:
    """The β of the implicit reward recorded on held-out pairs: ``cfg.score_beta``, else the arm's own β where that
    β scales an implicit reward (DPO family, KTO), else 0.1 (the DPO paper's default, arXiv:2305.18290 §6)."""
    if cfg.score_beta is not None:
        return cfg.score_beta
    return cfg.beta if trained_on_pairs_with_reference else 0.1


def snapshot_steps(total: int, count: int) -> list[int]:
    """The steps after which ``count`` snapshots are saved in a run of ``total`` steps: evenly spaced, rounded, never
    the last step (the final adapter is saved anyway) nor step 0."""
    if count < 0:
        raise ValueError(f"snapshots must be >= 0 (got {count}).")
    return sorted({round(total * i / (count + 1)) for i in range(1, count + 1)} - {0, total})


def check_beta(name: str, value: float, zero_ok: bool = False) -> None:
    """The one check of a KL coefficient / implicit-reward scale: > 0 (or ≥ 0 where no KL term is allowed)."""
    if value is None or not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'} (got {value}): it weighs the KL term / "
                         "scales the implicit reward.")


def check_judge_fields(cfg) -> None:
    """``pair_labels`` names a labelling the arm can use: the dataset's pairs are relabelled only for the arms that
    train on them (the RL arms sample their own; online DPO's ``labeller`` says who labels its samples)."""
    if cfg.pair_labels not in PAIR_LABELS:
        raise ValueError(f"pair_labels must be one of {PAIR_LABELS} (got {cfg.pair_labels!r}).")
    if isinstance(cfg, RLFields) and cfg.pair_labels != "human":
        raise ValueError("pair_labels='judge' relabels the dataset's pairs, which the arms that sample their own "
                         "responses do not train on; for AI feedback there use reward_model='judge' (or online DPO's "
                         "labeller='judge').")


def check_checkpoint_every(checkpoint_every: int | None, run_id: str | None) -> None:
    """Checkpoints need a run id: the folder a restarted run finds its last checkpoint in."""
    if checkpoint_every is not None and (checkpoint_every < 1 or run_id is None):
        raise ValueError("checkpoint_every needs an integer >= 1 and a run_id (the folder a restart resumes; "
                         f"got checkpoint_every={checkpoint_every}, run_id={run_id}).")
    if checkpoint_every is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("checkpoint_every under several processes (torchrun) is not built: the other ranks write into "
                         "scratch folders, so on restart only rank 0 would find its checkpoint and the ranks would part "
                         "ways. Checkpoint on one process, or train without --checkpoint-every.")


def check_vllm(cfg) -> None:
    """``use_vllm``, TRL's option of GRPO, RLOO and TRL's online DPO (generation by vLLM instead of
    ``model.generate``), asks here for what vLLM needs, before anything loads: vLLM installed (the ``vllm`` extra)
    and a CUDA GPU, which both of TRL's modes need ("colocate": vLLM beside the trainer on its GPU; "server": a
    ``trl vllm-serve`` process that the trainer sends its weights to over NCCL). Without this, TRL fails deep in the
    trainer's construction, after the model has loaded."""
    if not getattr(cfg, "use_vllm", False):
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("use_vllm=True, but vLLM is not installed: install it beside the GPU (pip install -e "
                         "'.[vllm]'; docs/arms.md#generation-by-vllm-on-a-gpu), or leave use_vllm off to generate "
                         "with transformers.")
    if not torch.cuda.is_available():
        raise ValueError(f"use_vllm=True (vllm_mode={getattr(cfg, 'vllm_mode', None)!r}) needs a CUDA GPU: vLLM "
                         "generates on GPUs only. On this machine leave use_vllm off.")


# ----------------------------------------------------------------------------------------------------------
# Each field's help, for ``--help``, the notebooks' parameter docs and docs/config.md


def field_help(cls) -> dict[str, str]:
    """{field: help} of a config class: a field's ``metadata["help"]`` (TRL's and transformers' fields carry it),
    and the comment written with the field's declaration in the workbench's source (beside it, or the comment lines
    right above it), the one place a workbench field or default is explained; both where both exist."""
    import dataclasses

    ours: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment replaces its base's
        if dataclasses.is_dataclass(klass) and klass.__module__.split(".")[0] == __name__.split(".")[0]:
            ours.update(_declaration_comments(klass))
    out = {}
    for f in dataclasses.fields(cls):  # a field redeclared with another default loses its metadata: the base's help
        theirs = next((k.__dataclass_fields__[f.name].metadata.get("help") for k in cls.__mro__
                       if f.name in getattr(k, "__dataclass_fields__", {})
                       and k.__dataclass_fields__[f.name].metadata.get("help")), "")
        parts = [" ".join(str(theirs).replace("%%", "%").split()), ours.get(f.name, "")]
        if parts[0] and parts[1]:
            parts[1] = f"(workbench: {parts[1]})"
        out[f.name] = " ".join(p for p in parts if p)
    return out


def _declaration_comments(klass) -> dict[str, str]:
    """{field: its comment} from a dataclass's own source: the trailing comment of the field's declaration (all of
    its lines), after the block of comment lines directly above it."""
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # defined at run time (a test's, a notebook's): no source to read
        return {}
    out, above, field_name, trailing, depth, pos = {}, [], None, [], 0, 0  # pos: significant tokens on this line
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT and tok.string.lstrip("#").strip().startswith("---"):
            above = []  # "# --- rollouts": a section's heading, not a field's help
        elif tok.type == tokenize.COMMENT:
            (trailing if pos else above).append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NL:
            if pos == 0 and tok.line.strip() == "":
                above = []  # a blank line ends a block of comments: it was about what follows it, not one field
        elif tok.type == tokenize.NEWLINE:
            if field_name:
                out[field_name] = " ".join(above + trailing)
            above, field_name, trailing, pos = [], None, [], 0
        else:
            if pos == 0 and depth == 1 and tok.type == tokenize.NAME:
                field_name = tok.string  # a field if an annotation's ':' follows
            elif pos == 1 and not (tok.type == tokenize.OP and tok.string == ":"):
                field_name = None
            pos += 1
    return {k: v for k, v in out.items() if v}
