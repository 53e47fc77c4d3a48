"""The arms of the study and their configs: one table (``ARMS``: each arm's facts from ``methods.FACTS``, its config
class, trainer, common-name aliases and held-out pair losses; ``register`` adds an arm to both) and one way from flat
parameters to a config (``make_config``), for the command line, the notebooks' parameters cells and the sweep grids
alike.

Each TRL arm's config subclasses TRL's own (every TRL option works) and adds the workbench's fields
(``config.RunFields``: the model, the data, the SFT run to start from); our PPO's config is ``ppo.PPOArgs``.
``train.train`` trains any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trl

from ..core import methods
from ..modeling import data, models
from . import gold_pairs, losses, online_dpo, ppo
from .config import RLFields, RunFields, check_beta, check_checkpoint_every, check_judge_fields


def _experimental():
    """ORPO, CPO/SimPO and online DPO live in ``trl.experimental`` in TRL 1.16; this is the only import of it."""
    import warnings

    with warnings.catch_warnings():  # TRL warns that these APIs may change at every import; the pin (trl==1.16) fixes them
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer, OnlineDPOConfig, OnlineDPOTrainer


ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer, OnlineDPOConfig, OnlineDPOTrainer = _experimental()


DataConfig = data.DataConfig  # re-exported: train.DataConfig is what notebooks and the README use


@dataclass
class _WorkbenchFields(RunFields):
    """``config.RunFields`` on a TRL config, and the TRL defaults the workbench changes."""

    # TRL defaults changed for CPU-first use; each is a plain TRL option:

    # None: follow the model's compute dtype (models.compute_dtype), i.e. bf16 mixed precision where the hardware
    # computes bf16 natively (a bf16 GPU, a CPU with AMX/AVX512-BF16), fp32 elsewhere. TRL: True
    bf16: bool | None = None
    gradient_checkpointing: bool = False  # TRL: True. Saves memory on big models, costs ~30% time; QLoRA on GPU: set True
    save_strategy: str = "no"  # the adapter is saved once, into the run folder (see checkpoint_every)
    # save a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position, token counts) every N steps
    # into the run's .partial folder; started again with the same run_id, a killed run resumes from the last one
    checkpoint_every: int | None = None
    logging_steps: float = 1
    report_to: str | list[str] = "none"
    per_device_train_batch_size: int = 4
    max_length: int | None = 512  # prompt + response tokens kept per example (TRL's, where the arm has it)

    def __post_init__(self):
        if hasattr(self, "beta"):
            check_beta("beta", self.beta)
        check_checkpoint_every(self.checkpoint_every, self.run_id)
        check_judge_fields(self)
        if self.checkpoint_every is not None:
            self.save_strategy, self.save_steps = "steps", self.checkpoint_every
        if self.bf16 is None:
            self.bf16 = models.compute_dtype(self.model.dtype) == torch.bfloat16
        if not torch.cuda.is_available():
            # transformers accepts bf16 without a GPU only when told it trains on the CPU, and under torchrun it
            # sets up data parallelism over CPU processes (gloo) only then
            self.use_cpu = True
        super().__post_init__()


@dataclass
class SFTArgs(_WorkbenchFields, trl.SFTConfig):
    """Supervised fine-tuning on the chosen responses ("preferred-FT", DPO paper arXiv:2305.18290 §6)."""

    learning_rate: float = 2e-4  # QLoRA's rate for adapters on small models (arXiv:2305.14314, App. B)
    num_train_epochs: float = 1.0


@dataclass
class DPOArgs(_WorkbenchFields, trl.DPOConfig):
    """DPO and its variants: ``loss_type`` is any of ``losses.PAIRED_LOSSES`` or a list with ``loss_weights``."""

    beta: float = 0.1  # DPO paper's β (arXiv:2305.18290 §6); IPO's τ
    learning_rate: float = 5e-6  # DPO used 1e-6 for full fine-tuning; LoRA adapters need a larger step
    num_train_epochs: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """What only this arm's config can get wrong (``train.validate`` asks again before training)."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in types if t not in losses.PAIRED_LOSSES]
        if unknown:
            raise ValueError(f"Unknown DPO loss_type {unknown}. Known: {', '.join(losses.PAIRED_LOSSES)}.")
        if self.f_divergence_type != "reverse_kl":
            raise ValueError("Only f_divergence_type='reverse_kl' (standard DPO) has a reference formula here.")


@dataclass
class KTOArgs(_WorkbenchFields, trl.KTOConfig):
    """KTO on the unpaired view: each pair gives a desirable and an undesirable example (arXiv:2402.01306)."""

    beta: float = 0.1  # KTO paper §4.2
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0


@dataclass
class ORPOArgs(_WorkbenchFields, ORPOConfig):
    """ORPO: NLL on chosen plus λ·odds-ratio term, no reference model (arXiv:2403.07691). TRL's ``beta`` is λ."""

    beta: float = 0.1  # λ = 0.1 in the ORPO paper §5
    learning_rate: float = 8e-6  # ORPO paper §5 (full fine-tuning), kept for adapters
    num_train_epochs: float = 1.0


@dataclass
class SimPOArgs(_WorkbenchFields, CPOConfig):
    """SimPO: length-normalised log-likelihood margin with a target margin γ, no reference (arXiv:2405.14734)."""

    loss_type: str = "simpo"
    cpo_alpha: float = 0.0  # no NLL term: pure SimPO (CPO would be cpo_alpha=1, loss_type="sigmoid")
    beta: float = 2.0  # SimPO paper: β in 2.0-2.5
    simpo_gamma: float = 1.0  # target margin γ; γ/β = 0.5 as the paper recommends
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0


@dataclass
class RewardArgs(_WorkbenchFields, trl.RewardConfig):
    """Bradley–Terry reward model, −log σ(r(x, y_w) − r(x, y_l)) (Ouyang et al. 2022, arXiv:2203.02155 Eq. 1).

    Default backbone: the embedded all-MiniLM-L6-v2 encoder, fully fine-tuned (22M parameters, fast on a CPU).
    For a decoder backbone (e.g. the policy's base) pass a ModelConfig with 4-bit + LoRA; the score head is then
    trained in full. ``center_rewards_coefficient`` (TRL option; 0.01 recommended, arXiv:2312.09244 Eq. 2) keeps
    rewards centred at 0.
    """

    model: models.ModelConfig = field(default_factory=lambda: models.ModelConfig(
        model_name_or_path=models.EMBEDDED_REWARD_BACKBONE, load_in_4bit=False, use_peft=False))
    learning_rate: float = 5e-5  # the usual rate for fine-tuning a BERT-size encoder in full
    num_train_epochs: float = 1.0

    def __post_init__(self):
        self.check()
        super().__post_init__()

    def check(self) -> None:
        """What only this arm's config can get wrong (``train.validate`` asks again before training)."""
        if self.sft_run is not None:
            raise ValueError("sft_run does not apply to a reward model: its backbone is set by cfg.model.")


@dataclass
class RLOOArgs(RLFields, _WorkbenchFields, trl.RLOOConfig):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): k samples per prompt, reward = score − β·Σ_t k1-KL, the
    mean reward of the other k − 1 samples as baseline. The reference is the policy's adapter disabled."""

    num_generations: int = 4  # k = 4, the paper's main setting
    beta: float = 0.05  # TRL's default KL coefficient
    max_completion_length: int = 64
    temperature: float = 0.7  # as our PPO, so the RL arms optimise the same sampling distribution
    learning_rate: float = 3e-5  # LoRA adapters (full fine-tuning: ~1e-6)
    num_train_epochs: float = 1.0


@dataclass
class GRPOArgs(RLFields, _WorkbenchFields, trl.GRPOConfig):
    """GRPO (Shao et al. 2024, arXiv:2402.03300): group-normalised advantages, KL to the reference as a loss term
    (k3 estimator). TRL's default β is 0, no reference; ours is the paper's 0.04 so every RL arm has a KL."""

    num_generations: int = 4
    beta: float = 0.04  # DeepSeekMath §4.2
    max_completion_length: int = 64
    temperature: float = 0.7
    learning_rate: float = 3e-5
    num_train_epochs: float = 1.0


@dataclass
class TRLOnlineDPOArgs(RLFields, _WorkbenchFields, OnlineDPOConfig):
    """TRL's experimental online DPO (Guo et al. 2024, arXiv:2402.04792), a baseline beside ours (``online-dpo``):
    two samples per prompt, labelled by our reward model as its one reward function, one DPO step on each batch's
    pairs, the reference the policy's adapter disabled. No judge of TRL's own (TRL removed its judges; ours works as
    its reward function, reward_model="judge"), no ties dropped, no reference refresh, no per-sample records."""

    beta: float = 0.1  # as our online DPO
    max_new_tokens: int = 64
    temperature: float = 0.7  # as the RL arms
    learning_rate: float = 5e-6  # as the DPO arm (TRL's default 5e-7 barely moves a LoRA adapter)
    num_train_epochs: float = 1.0


# ----------------------------------------------------------------------------------------------------------
# What each arm's held-out pairs add to their records: the pair's loss under the arm's own objective (our reference
# formulas, ``losses``), from the pair log-probs. Batch-coupled terms are left out: TRL's "sft" and "aot" are batch
# quantities, KTO needs the batch KL estimate, and ORPO's NLL covers prompt tokens; for ORPO the odds-ratio term
# alone is recorded.

def _dpo_pair_losses(cfg, pc, pr, rc, rr, n_c, n_r) -> dict:
    kept = [t for t in cfg.loss_type if t not in ("sft", "aot", "aot_unpaired")]
    if not kept:
        return {}
    batch = losses.PairLogps(pc, pr, rc, rr, chosen_lengths=n_c, rejected_lengths=n_r)
    return losses.preference_loss(kept, batch, cfg.beta, label_smoothing=cfg.label_smoothing,
                                  discopop_tau=cfg.discopop_tau)[1]


def _simpo_pair_losses(cfg, pc, pr, rc, rr, n_c, n_r) -> dict:
    return {"simpo": losses.simpo_loss(pc / n_c, pr / n_r, cfg.beta, simpo_gamma=cfg.simpo_gamma)[0]}


def _orpo_pair_losses(cfg, pc, pr, rc, rr, n_c, n_r) -> dict:
    return {"orpo_odds_ratio": losses.orpo_loss(pc / n_c, pr / n_r, cfg.beta, chosen_nll_loss=0.0)[0]}


def _sft_pair_losses(cfg, pc, pr, rc, rr, n_c, n_r) -> dict:
    return {"nll_per_token": -pc / n_c}


@dataclass(frozen=True)
class Arm:
    """One arm of the study: its facts (``methods.Facts``: data view, reference, role, ...), its config class and its
    trainer. A trainer with a ``build`` classmethod (our PPO, our online DPO) loads its own model(s) from the config
    (``build(cfg, train_rows, run, reward_fn, gold_fn) -> (model, tokenizer, trainer)``); TRL's are built by
    ``train.build_trainer``."""

    config: type  # its config class
    trainer: type  # TRL's trainer class, or ours; for a dataset, the function that builds it (``trainer(cfg) -> run``)
    facts: methods.Facts
    aliases: tuple = ()  # (common name, the arm's own field): one name per idea across arms (``make_config``)
    # (cfg, policy/reference log-probs of chosen and rejected, their token counts) -> {loss name: per-pair tensor}
    pair_losses: Callable | None = None

    # the facts, read through the arm as well
    view = property(lambda self: self.facts.view)
    has_reference = property(lambda self: self.facts.has_reference)
    rl = property(lambda self: self.facts.rl)
    scores_with_own_beta = property(lambda self: self.facts.scores_with_own_beta)


_F = methods.FACTS
ARMS = {
    "sft": Arm(SFTArgs, trl.SFTTrainer, _F["sft"], pair_losses=_sft_pair_losses),
    "dpo": Arm(DPOArgs, trl.DPOTrainer, _F["dpo"], pair_losses=_dpo_pair_losses),
    "kto": Arm(KTOArgs, trl.KTOTrainer, _F["kto"]),
    "orpo": Arm(ORPOArgs, ORPOTrainer, _F["orpo"], pair_losses=_orpo_pair_losses),
    "simpo": Arm(SimPOArgs, CPOTrainer, _F["simpo"], pair_losses=_simpo_pair_losses),
    "reward": Arm(RewardArgs, trl.RewardTrainer, _F["reward"]),
    "rloo": Arm(RLOOArgs, trl.RLOOTrainer, _F["rloo"], (("max_new_tokens", "max_completion_length"),)),
    "grpo": Arm(GRPOArgs, trl.GRPOTrainer, _F["grpo"], (("max_new_tokens", "max_completion_length"),)),
    # our own loop; its own field names for PPO's ideas, the common names map onto them
    "ppo": Arm(ppo.PPOArgs, ppo.PPOTrainer, _F["ppo"],
               (("max_steps", "iterations"), ("beta", "kl_coef"), ("per_device_train_batch_size", "rollout_batch_size"))),
    "trl-online-dpo": Arm(TRLOnlineDPOArgs, OnlineDPOTrainer, _F["trl-online-dpo"]),
    # our own loop too: DPO on pairs the policy samples and a reward model or an AI judge labels, round after round
    # (named with '-': a run folder's name keeps '_' for its separators; "online_dpo" is accepted too)
    "online-dpo": Arm(online_dpo.OnlineDPOArgs, online_dpo.OnlineDPOTrainer, _F["online-dpo"],
                      (("max_steps", "rounds"), ("per_device_train_batch_size", "prompts_per_round"))),
    # the known-gold study's data: the SFT policy's own samples, labelled by a gold reward (gold_pairs.py)
    "gold-pairs": Arm(gold_pairs.GoldPairsArgs, gold_pairs.build, _F["gold-pairs"]),
}
assert set(ARMS) == set(methods.FACTS), "every arm has its facts in methods.FACTS, and every fact an arm here"


def register(name: str, config: type, trainer: type, facts: methods.Facts, aliases: tuple = (),
             pair_losses: Callable | None = None) -> Arm:
    """Add an arm, in one place: its facts (``methods.FACTS``, which every module asks), its config class and its
    trainer (``ARMS``). From then on ``train.train(name, cfg)``, the command line, the grids, the evaluation, the
    tables and the figures take it as they take the others."""
    if name in ARMS or name in methods.FACTS or "_" in name or "." in name:
        raise ValueError(f"arm name {name!r} is taken, or has a '_' or '.' (a run folder's name keeps them for "
                         "its separators).")
    methods.FACTS[name] = facts
    ARMS[name] = Arm(config, trainer, facts, aliases, pair_losses)
    return ARMS[name]


method_label = methods.method_label  # re-exported: the run folder's <method> of an arm and its config


# ----------------------------------------------------------------------------------------------------------
# Flat parameters -> a config (the command line, notebooks' parameters cells, sweep grids)

MODEL_PARAMS = {"model": "model_name_or_path", "load_in_4bit": "load_in_4bit", "use_peft": "use_peft", "lora_r": "lora_r",
                "lora_alpha": "lora_alpha", "dtype": "dtype"}
DATA_PARAMS = {"subset": "subset", "split": "split", "data_source": "source", "heldout_fraction": "heldout_fraction",
               "split_seed": "split_seed", "half": "half", "n_train": "n_train", "n_score": "n_score",
               "data_max_length": "max_length", "columns": "columns"}


def arm_of(method: str) -> tuple[str, dict]:
    """(arm, fixed fields): an arm's own name is that arm; "ipo", "hinge", ... (any other DPO loss type) are the DPO
    arm with that loss_type. "sft" is the SFT arm (TRL's SFTTrainer), never DPO's loss type of that name (reach
    that one as ``method="dpo", loss_type=["sft"]``)."""
    if method.replace("_", "-") in ARMS and method != "dpo":
        return method.replace("_", "-"), {}
    if method == "dpo" or method in losses.PAIRED_LOSSES:
        return "dpo", {"loss_type": ["sigmoid" if method == "dpo" else method]}
    known = sorted({*ARMS, *losses.PAIRED_LOSSES} - {"sigmoid"})
    raise ValueError(f"Unknown method '{method}'. Known: {', '.join(known)}.")


def _check_type(key: str, value, default, declared: str = "") -> str | None:
    if value is None or default is None:
        return None
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,)}.get(type(default))
    if ok and "list" in str(declared):  # a field that takes a value or a list of them (report_to: str | list[str])
        ok = (*ok, list)
    if ok and (not isinstance(value, ok) or (isinstance(value, bool) and type(default) is not bool)):
        return f"{key}={value!r} should be a {type(default).__name__}"
    return None


def config_fields(method: str) -> list[str]:
    """Every flat parameter ``make_config`` takes for ``method``: the arm's own fields (TRL's included), the model's
    and the data's, and the common names the arm maps onto its own."""
    arm = ARMS[arm_of(method)[0]]
    own = [f.name for f in dataclasses.fields(arm.config) if f.init and f.name not in ("model", "data")]
    return sorted({*own, *MODEL_PARAMS, *DATA_PARAMS, *dict(arm.aliases)})


def _vllm_hint() -> str:
    takes = [name for name, arm in ARMS.items() if any(f.name == "use_vllm" for f in dataclasses.fields(arm.config))]
    return (f" (generation by vLLM is TRL's option of {', '.join(takes)}; this arm samples with the workbench's own "
            "sampler, workbench/modeling/decoding.py)")


def make_config(method: str, **params):
    """(arm, config) from flat parameters: the arm's own fields (``beta``, ``max_steps``, ``learning_rate``, any TRL
    option), the model's (``MODEL_PARAMS``) and the data's (``DATA_PARAMS``). The one way from flat parameters to a
    config: the command line, the notebooks' parameters cells and the sweep grids all come through here. Unknown
    names and values of the wrong type fail here, all listed at once, before anything loads; so do values out of
    range (the config classes check them). A value of None means the arm's default. An arm's ``aliases`` map the
    common names (``max_steps``, ``beta``, ``max_new_tokens``, ``per_device_train_batch_size``) onto its own."""
    import difflib

    arm_name, fixed = arm_of(method)
    arm = ARMS[arm_name]
    fields_ = {f.name: f for f in dataclasses.fields(arm.config) if f.init}
    defaults = {k: (f.default if f.default is not dataclasses.MISSING else None) for k, f in fields_.items()}
    aliases = dict(arm.aliases)
    params = {aliases.get(k, k): v for k, v in params.items() if v is not None}  # None: the arm's default
    model_kw, data_kw, kw, problems = {}, {}, dict(fixed), []
    for key, value in params.items():
        if key in MODEL_PARAMS:
            model_kw[MODEL_PARAMS[key]] = value
        elif key in DATA_PARAMS:
            data_kw[DATA_PARAMS[key]] = value
        elif key in fields_ and key not in ("model", "data"):
            kw[key] = value
            problems.append(_check_type(key, value, defaults[key], fields_[key].type))
        else:
            near = difflib.get_close_matches(key, config_fields(arm_name), n=1)
            problems.append(f"unknown parameter '{key}'" + (_vllm_hint() if key.startswith(("use_vllm", "vllm_")) else
                                                            f" (did you mean '{near[0]}'?)" if near else ""))
    data_defaults = data.DataConfig()
    problems += [_check_type(k, v, getattr(data_defaults, k)) for k, v in data_kw.items()]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{method}: " + "; ".join(problems))
    model = fields_["model"].default_factory()
    kw["model"] = dataclasses.replace(model, **model_kw) if model_kw else model
    data_cfg = fields_["data"].default_factory()
    kw["data"] = dataclasses.replace(data_cfg, **data_kw) if data_kw else data_cfg
    try:
        return arm_name, arm.config(**kw)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None

