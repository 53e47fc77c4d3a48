"""What each arm of the study is, declared once: ``FACTS``, the one table every module asks (training, the evaluation,
tables, figures, the draft) instead of testing an arm's name. Light on purpose (no torch, no TRL), so reading a run
folder never loads a trainer; ``arms.ARMS`` binds each arm's config class and trainer to its facts, and
``arms.register`` adds an arm to both in one call.

A run folder's ``<method>`` is the arm's name, or for the DPO family the loss type(s) it trained (``method_label``);
``of(method)`` reads it back to the arm's facts.
"""

from __future__ import annotations

from dataclasses import dataclass

VIEWS = ("sft", "pairs", "unpaired", "prompts", "dataset")
ROLES = ("policy", "start", "reward-model", "dataset")
IMPLICIT_REWARDS = ("log-ratio", "avg-logp", None)


@dataclass(frozen=True)
class Facts:
    """One arm's facts.

    view: the data it trains on: "sft" (prompt, chosen), "pairs", "unpaired" (KTO), "prompts" (it samples its own
        responses against a reward: the RL arms and online DPO); "dataset": not a policy but a stage that writes a
        dataset (gold-pairs).
    has_reference: trained against a reference model (the SFT adapter, or the base), so its KL to it is its budget.
    role: "policy", an arm the study compares; "start", the policy the arms start from and are measured against
        (SFT: its gold is the zero of the frontier, its KL is 0); "reward-model", a reward model (ranked on pairs, never
        sampled); "dataset".
    implicit_reward: how its held-out pairs rank the chosen above the rejected reply: "log-ratio", β·log π/π_ref;
        "avg-logp", the length-normalised log-likelihood (the reference-free arms, ORPO and SimPO); None: not a
        policy's (a reward model scores the pair itself).
    pairs_loss: trains a DPO-family loss on pairs although it samples its own (online DPO).
    """

    view: str
    has_reference: bool
    role: str = "policy"
    implicit_reward: str | None = "log-ratio"
    pairs_loss: bool = False

    def __post_init__(self):
        for name, value, allowed in (("view", self.view, VIEWS), ("role", self.role, ROLES),
                                     ("implicit_reward", self.implicit_reward, IMPLICIT_REWARDS)):
            if value not in allowed:
                raise ValueError(f"an arm's {name} must be one of {allowed} (got {value!r}).")

    @property
    def rl(self) -> bool:
        """Samples its own responses against a reward model (so it reads prompts, not the dataset's replies)."""
        return self.view == "prompts"

    @property
    def has_beta(self) -> bool:
        """Has a β of its own (KL coefficient, IPO's τ, ORPO's λ, ...): the policies the study compares."""
        return self.role == "policy"

    @property
    def scores_with_own_beta(self) -> bool:
        """Its β scales an implicit reward on pairs (DPO family, KTO): the held-out pairs are scored with it."""
        return self.has_reference and (self.view in ("pairs", "unpaired") or self.pairs_loss)


FACTS: dict[str, Facts] = {
    "sft": Facts("sft", has_reference=False, role="start"),
    "dpo": Facts("pairs", has_reference=True),
    "kto": Facts("unpaired", has_reference=True),
    "orpo": Facts("pairs", has_reference=False, implicit_reward="avg-logp"),
    "simpo": Facts("pairs", has_reference=False, implicit_reward="avg-logp"),
    "reward": Facts("pairs", has_reference=False, role="reward-model", implicit_reward=None),
    "rloo": Facts("prompts", has_reference=True),
    "grpo": Facts("prompts", has_reference=True),
    "ppo": Facts("prompts", has_reference=True),
    "trl-online-dpo": Facts("prompts", has_reference=True),
    "online-dpo": Facts("prompts", has_reference=True, pairs_loss=True),
    "gold-pairs": Facts("dataset", has_reference=False, role="dataset", implicit_reward=None),
}

# the arm whose run folders are named by the loss type(s) they trained ("ipo", "hinge", "dpo+sft", ...)
LOSS_NAMED = "dpo"


def method_label(method: str, cfg) -> str:
    """The run folder's <method>: the arm's name, or for the DPO family the loss type(s) ("dpo" for sigmoid)."""
    if method != LOSS_NAMED:
        return method
    names = [LOSS_NAMED if t == "sigmoid" else t for t in cfg.loss_type]
    if names == ["sft"]:  # DPO's NLL-only loss type must not name its run like the SFT arm
        names = ["dpo-sft"]
    return "+".join(names).replace("_", "-")


def arm_name(label: str) -> str:
    """The arm a run folder's <method> belongs to: its own name, else the DPO family's (a loss-type label)."""
    return label if label in FACTS else LOSS_NAMED


def of(label: str) -> Facts:
    """The facts of the arm of a run folder's <method> (``arm_name``)."""
    return FACTS[arm_name(label)]


def role(label: str) -> str:
    """``of(label).role``, for a table's method column: ``table["method"].map(methods.role) == "reward-model"``."""
    return of(label).role
