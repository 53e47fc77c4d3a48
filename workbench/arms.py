"""The arms of the study and their configs: one table (``ARMS``: config class, trainer, dataset view, reference,
common-name aliases) and one way from flat parameters to a config (``make_config``), for the command line, the
notebooks' parameters cells and the sweep grids alike.

Each TRL arm's config subclasses TRL's own (every TRL option works) and adds the workbench's fields
(``config.RunFields``: the model, the data, the SFT run to start from); our PPO's config is ``ppo.PPOArgs``.
``train.train`` trains any of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import trl

from . import data, gold_pairs, losses, models, online_dpo, ppo
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
    max_length: int | None = 512

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


@dataclass(frozen=True)
class Arm:
    """One arm of the study: how its config, data and training are put together."""

    config: type  # its config class
    trainer: type  # TRL's trainer class, or ours (ppo.PPOTrainer); for a dataset, the function that builds it
    # the dataset it trains on: "sft" (prompt, chosen), "pairs", "unpaired" (KTO) or "prompts" (RL); "dataset": not a
    # policy at all but a stage that writes a dataset (gold-pairs), built by ``trainer(cfg) -> run folder``
    view: str
    has_reference: bool  # trained against a reference model (the SFT adapter, or the base)
    aliases: tuple = ()  # (common name, the arm's own field): one name per idea across arms (``make_config``)
    pairs_loss: bool = False  # trains a DPO-family loss on pairs although it samples its own (online DPO)

    @property
    def rl(self) -> bool:
        """Samples its own responses against a reward model."""
        return self.view == "prompts"

    @property
    def scores_with_own_beta(self) -> bool:
        """Its β scales an implicit reward on pairs (DPO family, KTO): the held-out pairs are scored with it."""
        return self.has_reference and (self.view in ("pairs", "unpaired") or self.pairs_loss)


ARMS = {
    "sft": Arm(SFTArgs, trl.SFTTrainer, "sft", False),
    "dpo": Arm(DPOArgs, trl.DPOTrainer, "pairs", True),
    "kto": Arm(KTOArgs, trl.KTOTrainer, "unpaired", True),
    "orpo": Arm(ORPOArgs, ORPOTrainer, "pairs", False),
    "simpo": Arm(SimPOArgs, CPOTrainer, "pairs", False),
    "reward": Arm(RewardArgs, trl.RewardTrainer, "pairs", False),
    "rloo": Arm(RLOOArgs, trl.RLOOTrainer, "prompts", True, (("max_new_tokens", "max_completion_length"),)),
    "grpo": Arm(GRPOArgs, trl.GRPOTrainer, "prompts", True, (("max_new_tokens", "max_completion_length"),)),
    # our own loop; its own field names for PPO's ideas, the common names map onto them
    "ppo": Arm(ppo.PPOArgs, ppo.PPOTrainer, "prompts", True,
               (("max_steps", "iterations"), ("beta", "kl_coef"), ("per_device_train_batch_size", "rollout_batch_size"))),
    # our own loop too: DPO on pairs the policy samples and a reward model or an AI judge labels, round after round
    "trl-online-dpo": Arm(TRLOnlineDPOArgs, OnlineDPOTrainer, "prompts", True),
    # (named with '-': a run folder's name keeps '_' for its separators; "online_dpo" is accepted too)
    "online-dpo": Arm(online_dpo.OnlineDPOArgs, online_dpo.OnlineDPOTrainer, "prompts", True,
                      (("max_steps", "rounds"), ("per_device_train_batch_size", "prompts_per_round")), pairs_loss=True),
    # the known-gold study's data: the SFT policy's own samples, labelled by a gold reward (gold_pairs.py)
    "gold-pairs": Arm(gold_pairs.GoldPairsArgs, gold_pairs.build, "dataset", False),
}



def method_label(method: str, cfg) -> str:
    """The run folder's <method>: the arm's name, or for the DPO family the loss type(s) ("dpo" for sigmoid)."""
    if method != "dpo":
        return method
    names = ["dpo" if t == "sigmoid" else t for t in cfg.loss_type]
    if names == ["sft"]:  # DPO's NLL-only loss type must not name its run like the SFT arm
        names = ["dpo-sft"]
    return "+".join(names).replace("_", "-")



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
            problems.append(f"unknown parameter '{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
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

