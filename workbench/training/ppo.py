"""PPO for RLHF, written here (TRL 1.16 has no PPO trainer). Readable top to bottom: the pieces are pure
functions of tensors, then one loop, ``PPOTrainer.train``. ``train.train("ppo", cfg)`` runs it inside the same
skeleton as every TRL arm (run folder, data, token counter, saving, held-out look); this module holds the
algorithm alone.

Follows InstructGPT (Ouyang et al. 2022, arXiv:2203.02155) and the details collected by Huang et al. 2024
("The N+ implementation details of RLHF with PPO", arXiv:2403.17031); the details we take, and where:
  - reward = reward-model score at the end of the response − β·KL per token (``per_token_rewards``);
    KL estimated per token as k1 = log π − log π_ref, or k3 (``kl_per_token``; Schulman 2020, "Approximating
    KL divergence"); optionally a penalty for responses that never end (``missing_eos_penalty``);
  - the response is cut after its first EOS and every later token is masked (``sampling.generate``);
  - logits are divided by the sampling temperature whenever log-probs are computed, so π_old is the
    distribution that was sampled (``logprobs.response_logprobs``);
  - GAE with γ, λ; advantages whitened per batch; returns = advantages + values (``gae``, ``whiten``);
  - clipped policy loss and clipped value loss (``policy_loss``, ``value_loss``), several PPO epochs over
    shuffled minibatches (``ppo_update``), Adam with ε = 1e-5, learning rate annealed linearly to 0,
    gradient-norm clipping; dropout off (the model stays in eval mode), so the first minibatch's ratio is 1;
    with one minibatch per epoch the rollout's forward at θ_old is that minibatch's, kept with its graph, so the
    rows go through policy and critic once less per iteration (``ppo_update``'s ``first_pass``);
  - a fixed KL coefficient or Ziegler et al.'s adaptive controller (arXiv:1909.08593 §2.2).

Memory: one base model. The policy is the LoRA adapter "default"; the reference is the base with adapters
disabled, or the frozen SFT adapter "ref" when training starts from an SFT run; the critic is a second LoRA
adapter "value" with a linear value head on the last hidden state. A separate critic adapter rather than a
value head on the policy's own hidden states: with a shared trunk the value loss moves the policy too, and
its weight against the policy loss becomes one more thing to tune (Huang et al. use separate policy and value
networks). It costs one extra forward and backward per minibatch and a few MB of adapter.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from ..core import console, distributed
from ..core.distributed import all_sum, average_gradients, world
from ..modeling import data, models
from ..modeling.logprobs import reference_adapter, response_hidden, response_logprobs
from ..modeling.runs import Run, read_jsonl, write_jsonl
from ..modeling.sampling import baselines, call_reward, encode_prompts, generate
from .config import RLFields, RunFields, check_beta, check_checkpoint_every, check_judge_fields, snapshot_steps

log = console.logger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class PPOArgs(RLFields, RunFields):
    """Our PPO's settings (not a TRL config: TRL 1.16 has no PPO), beside the fields every arm has
    (``config.RunFields``, ``config.RLFields``). Defaults follow Huang et al. 2024 (arXiv:2403.17031, Table 3) where
    they apply to LoRA; the learning rate is LoRA's, not full fine-tuning's."""

    # what it trains on and holds out (``data.DataConfig``); n_score: held-out prompts and pairs
    data: data.DataConfig = field(default_factory=lambda: data.DataConfig(n_score=16))
    # --- rollouts
    iterations: int = 100  # PPO iterations: rollout, then ppo_epochs of updates
    rollout_batch_size: int = 16  # prompts (= responses) per iteration
    max_new_tokens: int = 64  # the longest response sampled, in tokens
    temperature: float = 0.7  # sampling temperature; log-probs use the same (Huang et al. detail)
    missing_eos_penalty: float | None = None  # subtracted from the score of a response that did not end (TRL's name)
    # --- reward
    kl_coef: float = 0.05  # β of score − β·KL (Huang et al.: 0.05)
    kl_estimator: str = "k1"  # "k1": log π − log π_ref (unbiased, can be < 0); "k3": (r − 1) − log r, r = π_ref/π (≥ 0)
    adaptive_kl: bool = False  # Ziegler et al.'s controller: β moves so that the KL tracks target_kl
    target_kl: float = 6.0  # nats per response (Ziegler et al. 2019)
    kl_horizon: int = 10000  # responses over which β may change by its clipped proportional error
    whiten_rewards: bool = False  # scale per-token rewards by their std (mean kept); Huang et al.: off
    # --- PPO
    ppo_epochs: int = 4  # passes of PPO updates over each iteration's rollouts
    num_minibatches: int = 1  # minibatches per epoch (rollout_batch_size must divide evenly)
    gamma: float = 1.0  # discount of GAE (1.0: none, the reward comes at the end of the response)
    lam: float = 0.95  # GAE's λ: bias (0) against variance (1) of the advantages
    cliprange: float = 0.2  # ε of the clipped policy objective
    cliprange_value: float = 0.2  # ε of the clipped value loss
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    learning_rate: float = 3e-5  # LoRA adapters; full fine-tuning of 1B models uses ~3e-6
    max_grad_norm: float = 1.0  # gradient clipping
    anneal_lr: bool = True  # the learning rate falls linearly to 0 over the iterations
    # --- checkpoints: every N iterations, policy and critic adapters, value head, optimizer, KL coefficient, RNG
    # states and the rollouts so far; a killed run started again with the same run_id resumes from the last one
    checkpoint_every: int | None = None
    output_dir: str | None = None  # where checkpoints go while the run is open; train.train sets <run folder>/trainer

    def __post_init__(self):
        check_checkpoint_every(self.checkpoint_every, self.run_id)
        check_judge_fields(self)
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3' (got {self.kl_estimator!r}).")
        check_beta("kl_coef", self.kl_coef, zero_ok=True)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1 (got {self.iterations}).")
        if self.rollout_batch_size % self.num_minibatches:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} is not divisible by num_minibatches "
                             f"{self.num_minibatches}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); PPO needs sampled responses.")


# ----------------------------------------------------------------------------------------------------------
# The pieces: pure functions of (batch, response_length) tensors. mask marks real response tokens, which
# always form a prefix of each row.


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def global_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The masked mean over the entries of every process's batch together."""
    return all_sum((x * mask).sum().double()) / all_sum(mask.sum().double()).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − mean)/std over the masked entries (of every process's batch together, under torchrun); with
    shift_mean=False the mean is added back (scale only)."""
    mean = global_masked_mean(x, mask).to(x.dtype)
    var = global_masked_mean((x - mean) ** 2, mask).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π; (B, T) in, (B, T) out."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio  # E_π[log π/π_ref] = KL: unbiased, per-token values can be negative
    return torch.expm1(-log_ratio) + log_ratio  # k3 = (r − 1) − log r with r = π_ref/π: unbiased and ≥ 0


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = −β·kl_t on every response token, plus the score on the last one (InstructGPT's reward, Eq. 2 of
    arXiv:2203.02155, spread over tokens). scores: (B,); kl, mask: (B, T). Σ_t r_t = score − β·Σ_t kl_t."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438 Eq. 16): (advantages, returns).

    values[:, t] = V(s_t), the state before token t. The episode ends after the last real token, so the value
    after it is 0; padded positions get advantage 0. returns = advantages + values (the critic's target).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # TD error δ_t
        last_gae = delta + gamma * lam * last_gae  # A_t = δ_t + γλ·A_{t+1}
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347 Eq. 7), as a loss to minimise:
    mean over tokens of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():  # three estimates of KL(π_old‖π) from tokens sampled from π_old (Schulman 2020)
        stats = {"policy/approxkl": masked_mean(0.5 * log_ratio**2, mask).item(),  # k2, TRL's
                 "policy/approxkl_k1": masked_mean(-log_ratio, mask).item(),  # cleanrl's old_approx_kl
                 "policy/approxkl_k3": masked_mean(ratio - 1 - log_ratio, mask).item(),  # cleanrl's approx_kl
                 "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "val/ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, dict]:
    """Clipped value loss: ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε_v)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, {"val/clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask).item()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens: how much of the returns the critic predicts (1: all, 0: no
    better than their mean, < 0: worse; NaN when the returns do not vary). cleanrl logs it; with a critic started
    at V ≡ 0 it is 0 at first and is the first thing to check when advantages look like noise."""
    var_r = global_masked_mean((returns - global_masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = global_masked_mean((err - global_masked_mean(err, mask)) ** 2, mask)
    return float("nan") if var_r.item() == 0 else (1 - var_err / var_r).item()


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_samples: int) -> None:
        pass


class AdaptiveKLController:
    """β_{t+1} = β_t·(1 + e_t·n/horizon), e_t = clip(KL_t/KL_target − 1, −0.2, 0.2) (Ziegler et al. 2019, §2.2).
    ``kl``: the batch's mean KL per response; n: responses in the batch."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740 Eq. 5, the estimator of TRL's RLOOTrainer):
    rewards (n_prompts, k) of k samples per prompt -> r_i − mean_{j≠i} r_j, same shape. No critic is needed."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


@dataclass
class Batch:
    """One iteration's rollouts, (B, T) tensors over response tokens (T = longest response)."""

    mask: Tensor  # real response tokens (a prefix of each row)
    logprobs: Tensor  # log π_old at sampling time
    values: Tensor  # V_old(s_t)
    advantages: Tensor
    returns: Tensor


def ppo_update(actor_critic, batch: Batch, optimizer, cfg: PPOArgs, params: list[Tensor],
               generator: torch.Generator, first_pass: tuple[Tensor, Tensor, Tensor] | None = None) -> dict:
    """``cfg.ppo_epochs`` passes over shuffled minibatches of ``batch``; returns the metrics averaged over them.

    ``actor_critic`` has ``logprobs(idx) -> (logprobs, entropy)``, ``values(idx) -> values`` (each (mb, T) for the
    rows ``idx``) and ``critic()``, a context in which the critic is the active model (the "value" adapter). The
    policy and value losses of a minibatch are summed and take one backward pass; under torchrun each process holds
    its share of the rollouts and the gradients are averaged over processes (one all-reduce) before clipping, as
    DDP would average them, so every process takes the same step. The tabular bandit of ``bandit.py`` and the
    language model share this loop.

    ``first_pass``: (logprobs, entropy, values) of every row, computed with their graphs at θ_old (the rollout's
    scoring pass, ``PPOTrainer.train``). With one minibatch (``cfg.num_minibatches == 1``) the first epoch's forward
    is at θ_old too, so it is that pass: its loss is taken over them instead of a second forward of the same rows.
    """
    n = batch.mask.shape[0]
    mb_size = n // cfg.num_minibatches
    if first_pass is not None and cfg.num_minibatches != 1:
        raise ValueError("first_pass stands for the first epoch's forward only when that epoch is one minibatch.")
    totals: dict[str, float] = {}
    steps = 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, mb_size):
            idx = perm[start : start + mb_size]
            optimizer.zero_grad(set_to_none=True)
            # Policy loss (the policy adapter active), value loss (the critic's), one backward for both
            if epoch == 0 and first_pass is not None:  # every row at θ_old: the rollout's forward, not another one
                idx = torch.arange(n)
                logprobs, entropy, vpred = first_pass
            else:
                (logprobs, entropy), vpred = actor_critic.logprobs(idx), None
            mb = {k: getattr(batch, k)[idx].to(logprobs.device)  # the rollout is kept on the CPU, the model may not be
                  for k in ("mask", "logprobs", "values", "advantages", "returns")}
            mb_mask = mb["mask"]
            pg_loss, stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb_mask, cfg.cliprange)
            if vpred is None:
                with actor_critic.critic():
                    vpred = actor_critic.values(idx)
                for p in params:  # leaving the critic, peft's set_adapter froze its adapter: its gradient must still land
                    p.requires_grad_(True)
            vf_loss, vstats = value_loss(vpred, mb["values"], mb["returns"], mb_mask, cfg.cliprange_value)
            (pg_loss + cfg.vf_coef * vf_loss).backward()
            average_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            step_stats = {**stats, **vstats, "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                          "policy/entropy": masked_mean(entropy.detach(), mb_mask).item(), "grad_norm": grad_norm.item()}
            for k, v in step_stats.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    keys = sorted(totals)
    means = all_sum(torch.tensor([totals[k] / steps for k in keys], dtype=torch.float64)) / world()[1]
    return dict(zip(keys, means.tolist()))




# ----------------------------------------------------------------------------------------------------------
# The language model as the actor-critic


class _LMActorCritic:
    """The language model as ``ppo_update`` sees it: policy = adapter "default", critic = adapter "value" + head."""

    def __init__(self, model, value_head, prompt_ids, response_ids, mask, pad_id, temperature):
        self.model, self.value_head = model, value_head
        self.prompt_ids, self.response_ids, self.mask = prompt_ids, response_ids, mask
        self.pad_id, self.temperature = pad_id, temperature

    def _rows(self, idx):
        idx = idx.tolist()
        return [self.prompt_ids[i] for i in idx], self.response_ids[idx], self.mask[idx]

    def logprobs(self, idx):
        return response_logprobs(self.model, *self._rows(idx), self.pad_id, self.temperature)

    def values(self, idx):
        prompts, responses, mask = self._rows(idx)
        hidden = response_hidden(self.model, prompts, responses, mask, self.pad_id)
        return self.value_head(hidden.float()).squeeze(-1) * mask.to(hidden.device)

    def critic(self):
        from trl.trainer.utils import use_adapter

        return use_adapter(self.model, "value")


# ----------------------------------------------------------------------------------------------------------
# The loop


def load_actor_critic(cfg: PPOArgs):
    """(model, value_head, tokenizer): the policy ("default"), the frozen SFT reference ("ref", when starting
    from an SFT run) and the critic ("value" + a linear head) on one base model."""
    from peft import PeftModel

    sft_adapter = str(Path(cfg.sft_run) / "adapter") if cfg.sft_run else None
    model, tokenizer = models.load_policy(cfg.model, adapter=sft_adapter)
    if not isinstance(model, PeftModel):
        raise ValueError("PPO trains LoRA adapters (the reference is the adapter disabled): set model.use_peft=True.")
    if sft_adapter:  # as TRL's trainers do: the SFT adapter, frozen, is the reference
        model.load_adapter(sft_adapter, adapter_name="ref", is_trainable=False)
    model.add_adapter("value", models.lora_config(cfg.model, task_type="CAUSAL_LM"))
    model.set_adapter("default")
    hidden = model.get_base_model().config.hidden_size
    value_head = torch.nn.Linear(hidden, 1).to(next(model.parameters()).device)
    # V ≡ 0 at the start. Huang et al. initialise the critic from the reward model; ours may have another backbone,
    # and a randomly initialised head would put values of O(1) noise into every advantage, swamping the reward.
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    model.eval()  # dropout off for rollouts and updates alike; gradients still flow
    return model, value_head, tokenizer


def _trainable(model, value_head) -> list[Tensor]:
    params = [p for n, p in model.named_parameters() if ".default." in n or ".value." in n]
    for p in params:
        p.requires_grad_(True)  # both adapters; peft's set_adapter toggles requires_grad, our contexts restore it
    return params + list(value_head.parameters())


@dataclass
class PPOResult:
    """What ``PPOTrainer.train`` returns, with the names of TRL's ``TrainOutput``: ``train.train`` reads either."""

    global_step: int  # iterations run
    training_loss: float  # mean over iterations of policy loss + vf_coef · value loss
    metrics: dict  # {"train_runtime": seconds}


class PPOTrainer:
    """Our PPO loop, plugged into ``train.train`` as a TRL trainer is: built on the loaded actor-critic and the
    training prompts, ``train(resume_from_checkpoint=None)`` runs it, ``save_critic(folder)`` saves what it trains
    besides the policy adapter, ``add_callback(cb)`` takes an object whose ``on_save(args, state, control)`` runs
    after each checkpoint, as TRL's ``TrainerCallback.on_save`` does.

    ``reward_fn`` is any TRL-style reward function ``f(prompts=..., completions=..., completion_ids=...) ->
    list[float]``; ``gold_fn`` likewise, measured only. Every iteration logs its metrics to the run's metrics.jsonl
    (step = iterations done) and keeps its samples as records (``records/rollouts.jsonl``).

    Under torchrun (N processes) ``rollout_batch_size`` is the global batch: each process samples and scores its
    1/N of the iteration's prompts with its own copy of the model; rewards are whitened and advantages normalised
    over the global batch, gradients are averaged (``ppo_update``), so the copies stay identical; metrics and
    records cover the global batch, and rank 0 writes them (the others write into a scratch folder)."""

    @classmethod
    def build(cls, cfg: PPOArgs, train_rows: list[dict], run: Run, reward_fn, gold_fn=None):
        """(model, tokenizer, trainer) for ``train.train``: one base with three adapters (policy, reference, critic)
        and a value head (``load_actor_critic``), trained on the distinct prompts of ``train_rows``."""
        distributed.init_distributed()  # under torchrun: TRL's trainers join the process group themselves, ours here
        cfg.output_dir = str(run.path / "trainer")  # its checkpoints, if any
        model, value_head, tokenizer = load_actor_critic(cfg)
        return model, tokenizer, cls(cfg, model, value_head, tokenizer, data.prompt_view(train_rows), run, reward_fn,
                                     gold_fn)

    def __init__(self, cfg: PPOArgs, model, value_head, tokenizer, prompts: list[dict], run: Run, reward_fn,
                 gold_fn=None):
        if not prompts:
            raise ValueError("No training prompts left after the held-out split; see data_report.json.")
        rank, n = world()
        if cfg.rollout_batch_size % n or (cfg.rollout_batch_size // n) % cfg.num_minibatches:
            raise ValueError(f"rollout_batch_size {cfg.rollout_batch_size} must split evenly over {n} processes and "
                             f"then into num_minibatches {cfg.num_minibatches}.")
        self.cfg, self.model, self.value_head, self.tokenizer = cfg, model, value_head, tokenizer
        self.prompts, self.run, self.reward_fn, self.gold_fn = prompts, run, reward_fn, gold_fn
        self.summary = {"train/iterations": cfg.iterations, "train/prompts": len(prompts),
                        "train/reward_queries": cfg.iterations * cfg.rollout_batch_size}  # samples the reward scored
        self.callbacks = []

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def save_critic(self, folder: Path) -> None:
        """The critic: its LoRA adapter "value" (peft writes it to ``folder/value/``) and the value head's weights."""
        self.model.save_pretrained(folder, selected_adapters=["value"])
        torch.save(self.value_head.state_dict(), folder / "value_head.pt")

    # --- checkpoints: what a resumed run needs to continue exactly where this one stands after `done` iterations

    def _trained(self) -> dict[str, Tensor]:
        named = {f"model.{n}": p for n, p in self.model.named_parameters() if ".default." in n or ".value." in n}
        return {**named, **{f"value_head.{n}": p for n, p in self.value_head.named_parameters()}}

    def _save_checkpoint(self, done: int, optimizer, kl_ctl, generator, losses: list, samples: list) -> None:
        folder = Path(self.cfg.output_dir) / f"checkpoint-{done}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        torch.save({"iterations_done": done, "parameters": {k: v.detach().cpu() for k, v in self._trained().items()},
                    "optimizer": optimizer.state_dict(), "kl_coef": kl_ctl.value, "losses": losses,
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   folder / "ppo_state.pt")
        write_jsonl(folder / "rollouts.jsonl", samples)
        for cb in self.callbacks:  # e.g. train.train's token counts, written last: they mark the checkpoint complete
            cb.on_save(self.cfg, SimpleNamespace(global_step=done), None)
        for old in Path(self.cfg.output_dir).glob("checkpoint-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, folder: Path, optimizer, kl_ctl, generator) -> tuple[int, list, list]:
        state = torch.load(Path(folder) / "ppo_state.pt", weights_only=False)
        trained = self._trained()
        with torch.no_grad():
            for k, v in state["parameters"].items():
                trained[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.value = state["kl_coef"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["iterations_done"], state["losses"], read_jsonl(Path(folder) / "rollouts.jsonl")

    def train(self, resume_from_checkpoint: str | None = None) -> PPOResult:
        cfg, model, value_head, tokenizer, run = self.cfg, self.model, self.value_head, self.tokenizer, self.run
        reward_fn, gold_fn, prompts = self.reward_fn, self.gold_fn, self.prompts
        rank, n_proc = world()
        params = _trainable(model, value_head)
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5)
        kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                  else FixedKLController(cfg.kl_coef))
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(prompts), generator=generator).tolist()
        pad = tokenizer.pad_token_id
        samples, losses, start = [], [], 0
        if resume_from_checkpoint:
            start, losses, samples = self._load_checkpoint(resume_from_checkpoint, optimizer, kl_ctl, generator)
        t_loop = time.time()
        snapshot_at = set(snapshot_steps(cfg.iterations, cfg.snapshots))
        for it in range(start, cfg.iterations):
            if cfg.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * (1 - it / cfg.iterations)
            batch_rows = [prompts[order[(it * cfg.rollout_batch_size + j) % len(prompts)]]
                          for j in range(cfg.rollout_batch_size)]
            rows = batch_rows[rank::n_proc]  # this process's share of the iteration's prompts
            prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)

            # --- 1. rollout: the policy samples; policy, reference and critic score the samples; the RM scores them
            t0 = time.time()
            response, mask, ended = generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature)
            t_gen = time.time() - t0
            texts = tokenizer.batch_decode(response, skip_special_tokens=True)
            ac = _LMActorCritic(model, value_head, prompt_ids, response, mask, pad, cfg.temperature)
            t0 = time.time()
            all_idx = torch.arange(len(rows))
            with torch.no_grad(), reference_adapter(model):
                ref_logprobs = ac.logprobs(all_idx)[0].cpu()
            # log π_old and V_old. With one minibatch the first PPO epoch's forward is this one (at θ_old): it keeps
            # its graph and ppo_update takes its loss over it, so the rows go through policy and critic once less
            fused = cfg.num_minibatches == 1
            for p in params:  # switching adapters froze some (peft's set_adapter); every one must learn
                p.requires_grad_(True)
            with torch.set_grad_enabled(fused):
                policy_out = ac.logprobs(all_idx)
                with ac.critic():
                    value_out = ac.values(all_idx)
            for p in params:
                p.requires_grad_(True)
            logprobs, entropy = (t.detach().cpu() for t in policy_out)
            values = value_out.detach().float().cpu()
            first_pass = (*policy_out, value_out) if fused else None
            with torch.no_grad():
                messages, base = [r["prompt"] for r in rows], baselines(rows)
                scores = call_reward(reward_fn, messages, texts, response, mask, base)
                gold = call_reward(gold_fn, messages, texts, response, mask, base) if gold_fn else None
            t_score = time.time() - t0

            # --- 2. rewards: score − β·KL per token (and a penalty for not ending); GAE; whitened advantages
            raw_scores = scores.clone()
            if cfg.missing_eos_penalty is not None:
                scores = scores - cfg.missing_eos_penalty * (~ended).float()
            kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask
            rewards = per_token_rewards(scores, kl, mask, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
            batch = Batch(mask, logprobs, values, advantages, returns)

            # --- 3. PPO epochs over minibatches
            t0 = time.time()
            stats = ppo_update(ac, batch, optimizer, cfg, params, generator, first_pass)
            del first_pass, policy_out, value_out  # their graphs
            t_train = time.time() - t0
            losses.append(stats["loss/policy"] + cfg.vf_coef * stats["loss/value"])

            # --- 4. bookkeeping: metrics with TRL/cleanrl names (over the global batch), records, the KL controller
            seq_kl = kl.sum(1)
            non_score = -kl_ctl.value * seq_kl
            n_rows = cfg.rollout_batch_size

            def batch_mean(x: Tensor) -> float:  # over the rows of every process
                return all_sum(x.double().sum()).item() / n_rows

            metrics = {
                "objective/kl": batch_mean(seq_kl),
                "objective/kl_coef": kl_ctl.value,
                "objective/entropy": batch_mean((entropy * mask).sum(1)),
                "objective/non_score_reward": batch_mean(non_score),
                "objective/rlhf_reward": batch_mean(scores + non_score),
                "objective/scores": batch_mean(raw_scores),
                **({"objective/gold_scores": batch_mean(gold)} if gold is not None else {}),
                **stats,
                "val/num_eos_tokens": int(all_sum(ended.sum()).item()),
                "val/mean_value": global_masked_mean(values, mask).item(),
                # of the critic that made this rollout's advantages (before this iteration's updates)
                "val/explained_variance": explained_variance(values, returns, mask),
                "lengths/response_tokens": batch_mean(mask.sum(1).float()),
                "lr": optimizer.param_groups[0]["lr"],
                "episode": (it + 1) * cfg.rollout_batch_size,
                "time/generation_s": t_gen, "time/scoring_s": t_score, "time/training_s": t_train,
                "tokens/generated_per_s": all_sum(mask.sum()).item() / max(t_gen, 1e-9),
            }
            finite = [v for k, v in metrics.items() if k != "val/explained_variance"]  # NaN there: returns all equal
            if not all(math.isfinite(v) for v in finite):
                run.write_json("nan_diagnostic.json", {"iteration": it, "metrics": metrics,
                                                       "prompt_ids": [r["id"] for r in rows]})
                raise FloatingPointError(f"non-finite PPO metrics at iteration {it}; see {run.path / 'nan_diagnostic.json'}")
            run.log(metrics, step=it + 1)
            kl_ctl.update(metrics["objective/kl"], cfg.rollout_batch_size)
            mine = []
            for i, row in enumerate(rows):
                m = mask[i]
                mine.append({
                    "iteration": it, "id": row["id"], "prompt": row["prompt"], "completion": texts[i],
                    "completion_token_ids": response[i][m].tolist(), "response_tokens": int(m.sum()),
                    "ended": ended[i].item(), "score": raw_scores[i].item(),
                    "gold_score": None if gold is None else gold[i].item(), "kl": seq_kl[i].item(),
                    "rlhf_reward": (scores[i] + non_score[i]).item(),
                    "token_logps": logprobs[i][m].tolist(), "reference_token_logps": ref_logprobs[i][m].tolist(),
                    "token_kl": kl[i][m].tolist(), "token_values": values[i][m].tolist(),
                    "token_advantages": advantages[i][m].tolist()})
            samples += distributed.gather_rows(mine)
            if rank == 0:
                log.info(f"[ppo] iter {it + 1}/{cfg.iterations} score {metrics['objective/scores']:.3f} "
                         f"kl {metrics['objective/kl']:.3f} ({t_gen:.1f}s gen, {t_score:.1f}s score, {t_train:.1f}s train)")
            if it + 1 in snapshot_at:  # the policy part-way, for the reward–KL frontier
                run.save_snapshot(model, it + 1)
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                self._save_checkpoint(it + 1, optimizer, kl_ctl, generator, losses, samples)
        run.write_records("rollouts", samples)
        return PPOResult(cfg.iterations, sum(losses) / len(losses), {"train_runtime": round(time.time() - t_loop, 1)})
