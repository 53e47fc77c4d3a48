"""Compute accounting: how many tokens each part of a training run pushed through which model, and the FLOPs
those tokens cost, so that claims like "DPO is cheaper than RLHF" are checked by measurement.

Tokens are counted where they are spent: a forward pre-hook on each model's transformer backbone counts the
real (non-padding) tokens of every forward call and files them by what the call was:

    train              forward with gradients (a backward follows) through the model being trained: the policy,
                       or in a reward-model run the reward model
    forward            forward without gradients through the trained model (rollout scoring, KTO's KL batch, ...)
    reference_forward  forward with the adapter disabled or the frozen "ref" adapter active (the reference model)
    generated          tokens sampled one at a time with the KV cache (generation's decode steps)
    reward_forward     forward of a reward model used as the reward (counted on its own tokenizer)

Whatever a trainer does inside (TRL's DPO, KTO, RLOO, GRPO or our PPO), the hook sees every forward call, so
nothing is estimated from the data sizes.

FLOPs follow Kaplan et al. 2020 (arXiv:2001.08361 §2.1): a forward pass costs 2N per token, with N the
parameters that take part in matrix products (everything but the input embedding lookup; a tied output head
is counted, it is a matmul). A backward pass costs 4N for full training (2N for activation gradients, 2N for
weight gradients) but only 2N through a frozen (4-bit) base with LoRA adapters, whose weight gradients are
negligible; gradient checkpointing adds one more forward. Attention's own FLOPs (∝ context length) are left
out, as in Kaplan's C ≈ 6N; at our context lengths (≤ 512) they are a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributed import all_sum

KINDS = ("train", "forward", "reference_forward", "generated", "reward_forward", "judge_forward")


def matmul_params(model) -> int:
    """N: parameters that take part in matrix products (all but the input embedding). 4-bit weights are stored
    two to a byte; ``transformers``' count undoes that packing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = base.num_parameters(only_trainable=False)
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    n = total - emb.weight.numel()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    return n + (head.weight.numel() if tied else 0)


def _lora_layer(model):
    from peft.tuners.lora import LoraLayer

    return next((m for m in model.modules() if isinstance(m, LoraLayer)), None)


def _is_reference(lora) -> bool:
    """Is the model running as its reference right now: adapters disabled, or the frozen "ref" adapter active?"""
    if lora is None:
        return False
    return bool(lora.disable_adapters) or list(lora.active_adapters) == ["ref"]


@dataclass
class TokenCounter:
    """Counts tokens per kind (``KINDS``) over the models it is attached to; ``attach`` once per model."""

    tokens: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    params: dict = field(default_factory=dict)  # role ("trained" | "reward" | "judge") -> N
    full_training: dict = field(default_factory=dict)  # role -> True when all weights train (backward 4N, not 2N)
    gradient_checkpointing: bool = False
    _handles: list = field(default_factory=list, repr=False)
    _models: list = field(default_factory=list, repr=False)

    def attach(self, model, role: str = "trained") -> None:
        """Count ``model``'s forward calls as the model being trained (``role="trained"``), as a reward model that
        only scores (``role="reward"``) or as an AI judge (``role="judge"``, ``judge.Judge``). A model already
        attached is not counted twice (a judge that both labels and rewards)."""
        if any(m is model for m in self._models):
            return
        self._models.append(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, base.base_model_prefix)
        lora = _lora_layer(model)
        self.params[role] = matmul_params(model)
        self.full_training[role] = lora is None and any(p.requires_grad for p in base.parameters())

        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            ref = kwargs.get("inputs_embeds") if ids is None else ids
            if ref is None:
                return
            new = ref.shape[1]  # tokens this call adds (decode steps add 1 per row)
            mask = kwargs.get("attention_mask")
            n = int(mask[:, -new:].sum()) if torch.is_tensor(mask) and mask.dim() == 2 else ref.shape[0] * new
            if role in ("reward", "judge"):
                kind = f"{role}_forward"
            elif torch.is_grad_enabled():
                kind = "train"
            elif _is_reference(lora):
                kind = "reference_forward"
            elif new == 1 and kwargs.get("past_key_values") is not None:
                kind = "generated"
            else:
                kind = "forward"
            self.tokens[kind] += n

        self._handles.append(backbone.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._models.clear()

    def sum_over_processes(self) -> None:
        """Under several processes (torchrun), every count becomes the sum over all of them: the run's compute."""
        counts = all_sum(torch.tensor([self.tokens[k] for k in KINDS], dtype=torch.float64))
        self.tokens = {k: int(v) for k, v in zip(KINDS, counts.tolist())}

    def flops(self) -> dict:
        """FLOPs per kind, 2N per forward token; training tokens add the backward (and recomputation)."""
        n_pol, n_rm, n_judge = (self.params.get(role, 0) for role in ("trained", "reward", "judge"))
        backward = 4 if self.full_training.get("trained") else 2
        train = 2 + backward + (2 if self.gradient_checkpointing else 0)
        out = {
            "train": train * n_pol * self.tokens["train"],
            "forward": 2 * n_pol * self.tokens["forward"],
            "reference_forward": 2 * n_pol * self.tokens["reference_forward"],
            "generated": 2 * n_pol * self.tokens["generated"],
            "reward_forward": 2 * n_rm * self.tokens["reward_forward"],
            "judge_forward": 2 * n_judge * self.tokens["judge_forward"],
        }
        out["total"] = sum(out.values())
        return out

    def to_dict(self, wall_time_s: float | None = None) -> dict:
        """What ``compute.json`` holds."""
        return {"tokens": dict(self.tokens), "params": dict(self.params), "full_training": dict(self.full_training),
                "gradient_checkpointing": self.gradient_checkpointing, "flops": self.flops(),
                "wall_time_s": wall_time_s,
                "method": "forward pre-hooks count real tokens per call; FLOPs = 2N per forward token, +2N (LoRA on a "
                          "frozen base) or +4N (full training) per trained token (Kaplan et al. 2020, arXiv:2001.08361)"}


def peak_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """This machine's own peak: FLOP/s of a square (n × n) @ (n × n) matmul in ``dtype`` on the default device,
    best of repeated calls for about ``seconds`` after a warm-up. Benchmarks print a step's achieved FLOP/s (from
    ``TokenCounter``) as a fraction of it, so a goal like "25 % of peak" means the same on every machine."""
    import time

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best

