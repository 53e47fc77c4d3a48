"""A tabular bandit language model where the best policy is known in closed form: a correctness oracle for the
preference objectives of ``workbench/training/losses.py``.

The world: P prompts, K single-token responses per prompt, a fixed non-uniform reference π_ref (P, K) and a true
reward r (P, K). Preference pairs follow the Bradley–Terry model of r: draw y1, y2 i.i.d. from a sampling
distribution μ (uniform by default), and y1 is preferred with probability σ(r(y1) − r(y2)). The policy is a table
of logits θ (P, K), π_θ = softmax(θ), started at θ = log π_ref. A response is one token, so its sequence
log-prob is log π_θ(y|x), its average per-token log-prob is the same number, and every length is 1.

``train_tabular`` minimises the mean loss of the real formulas over the sampled pairs by full-batch Adam from
π_ref, and ``tests/test_oracle.py`` compares the result with what each objective should reach:

================  ==============================  ================================================================
method            checked against                 why
================  ==============================  ================================================================
sigmoid (DPO)     π* (exact)                      BT maximum likelihood in the log-ratio: π* ∝ π_ref·exp(r/β)
sigmoid_norm      π* (exact)                      DPO on per-token log-ratios: DPO itself at length 1
robust (rDPO)     π* from ε-flipped labels        unbiased for the clean DPO loss; plain DPO on them is not
ipo               ``ipo_optimal_policy`` (exact)  π ∝ π_ref·exp(p(y ≻ μ)/τ), τ = β: not π*
cpo (α = 0),      softmax(r/β) (exact)            DPO without π_ref: the BT fit of β·log π itself
simpo (γ = 0)
hinge, 2 arms     β·Δ = 1 (exact)                 the subgradient of P·(1 − βΔ)₊ + (1 − P)·(1 + βΔ)₊ is 0 only there
exo_pair, 2 arms  β·Δ = (2P − 1)·log((1 − ε)/ε)   the expected KL is a KL to the geometric mix of the two targets
all but apo_down  direction                       E_π[r] and π(best) rise from π_ref; the learned log-ratios
                                                  (reference-free: log-probs) are ordered as the rewards, up to ties
discopop          direction at τ = 0.2; against   its slope at zero margin is (1 − log 2)/(4τ) − 3/4 > 0 for
                  it at the default τ = 0.05      τ < 0.102, so from π_ref it first lowers the chosen margins
apo_down          moves away (documented)         it lowers the chosen likelihood; with chosen responses no better
                                                  than the policy's own it ends on a rarely chosen (bad) response
================  ==============================  ================================================================

Iterative (online) DPO (``train_tabular_iterative_dpo``: each round, pairs sampled from the current policy and
labelled by the BT model of r, DPO from the current policy) is checked against π* with the reference fixed (DPO's
optimum does not depend on the pairs' μ), and, with the reference refreshed to the current policy every round,
against π ∝ π_ref·exp(t·r/β): past π* after round 1, towards the argmax.

Δ is the log-ratio of the better of two arms minus that of the worse, P = σ(r_better − r_worse). The closed forms
of DPO, rDPO and IPO are also checked without sampling, as zero gradients of the expected loss. No closed form is
claimed for the other losses (bco_pair, nca_pair, sppo_hard, apo_zero, aot, aot_unpaired, kto, orpo, cpo and simpo
with their defaults, sft): most score each response's own log-ratio or log-prob against a fixed target, which ties
their optimum to the normalisation of π, and AOT couples all pairs by sorting. Only their direction is checked.

The RL arms are checked on the same bandit, where π* is also the optimum of E_π[r] − β·KL(π ‖ π_ref). Two kinds of
test: fast loops that run our own code on a tabular policy, and TRL's own trainers (the ones the study trains
with) driven end to end on the bandit written as a causal LM (``bandit_trl.py``: the vocabulary is the prompts
and responses, a completion is one token, the model is a logit table started at π_ref, the reward function reads
r(x, y) from the text; configured by the study's ``train.RLOOArgs``/``train.GRPOArgs``, k = 4, temperature 0.7):

==================================  ===============================  ==============================================
trainer                             checked against                  why
==================================  ===============================  ==============================================
``train_tabular_ppo`` (our PPO)     π* (β = 0.5, 0.25)               k1 KL in the reward: ∇(E_π[r] − β·KL)
  with ``kl_estimator="k3"``        > 0.15 from π*                   k3 as a reward has the wrong score gradient
``train_tabular_rloo`` (our RLOO)   π* (β = 0.5, 0.25)               as TRL's RLOO, on ``ppo.rloo_advantages``
``bandit_trl.train_trl_rloo``       π* (β = 0.5, 0.25), > 0.1 from   the same estimator, TRL's code: generation,
  (TRL's ``RLOOTrainer``)           the other β's                    fused log-probs, reference copy, LOO, clip
``bandit_trl.train_trl_grpo``       ``grpo_fixed_point`` (β = 0.5),  advantages (r − mean)/std per group: the fixed
  (TRL's ``GRPOTrainer``, study)    > 0.08 from π* of every β;       point tilts π_ref by E[A | y]/β, not by r/β
                                    direction (as above)
  ``scale_rewards="none"``          π* at β·k/(k − 1)                E[A | y] = (1 − 1/k)·(r(y) − E_π[r])
  ``use_bias_correction_kl=False``  the forward-KL fixed point       β·∇k3 is ∇KL(π_ref ‖ π); TRL's default
                                                                     β·∇(ratio·k3) is ∇KL(π ‖ π_ref)
==================================  ===============================  ==============================================

Each target is checked to TV 0.05 (measured for TRL's trainers over seeds 0–3: ≤ 0.009 for RLOO, ≤ 0.022 for the
GRPO variants). A first test checks the wiring: TRL's policy, the reference it loads, its fused log-probs and its
sampler are all π_ref.

``grpo_fixed_point`` derives the GRPO fixed points and computes them exactly (no sampling): the expected
advantages of a group are summed over all K^(k−1) draws of the other completions.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses


class Pairs(NamedTuple):
    """Sampled preference pairs, each (n,) long: prompt index, preferred response, dispreferred response."""

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor


@dataclass
class Bandit:
    """A tabular preference problem. reference_probs: (P, K) π_ref(y|x), rows sum to 1; rewards: (P, K) r(x, y),
    in Bradley–Terry units (a reward gap of 1 means the better response wins with probability σ(1) = 0.73)."""

    reference_probs: Tensor
    rewards: Tensor

    def tilted(self, scores: Tensor) -> Tensor:
        """π(y|x) ∝ π_ref(y|x)·exp(scores(x, y)), (P, K): the policy whose log-ratio is ``scores`` + const."""
        return torch.softmax(self.reference_probs.log() + scores, dim=-1)

    def optimal_policy(self, beta: float) -> Tensor:
        """π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β), (P, K): the optimum of E_π[r] − β·KL(π ‖ π_ref)."""
        return self.tilted(self.rewards / beta)  # arXiv:2305.18290 Eq. 4

    def win_rate(self, mu: Tensor | None = None) -> Tensor:
        """p(y ≻ μ) = E_{y'~μ}[σ(r(y) − r(y'))], (P, K); μ (P, K) defaults to uniform."""
        mu = torch.full_like(self.rewards, 1 / self.rewards.shape[-1]) if mu is None else mu
        gaps = self.rewards[:, :, None] - self.rewards[:, None, :]  # (P, K, K): r(y) − r(y')
        return (torch.sigmoid(gaps) * mu[:, None, :]).sum(-1)

    def ipo_optimal_policy(self, tau: float, mu: Tensor | None = None) -> Tensor:
        """The IPO optimum for pairs drawn from μ: log π(y)/π_ref(y) = p(y ≻ μ)/τ + const, (P, K).

        Derivation (arXiv:2310.12036 §5, for one prompt). The loss on an ordered pair is (h(y_w, y_l) − 1/(2τ))²
        with h(a, b) = g(a) − g(b), g = log π/π_ref. For the unordered pair {a, b}, (a, b) is the order with
        probability P(a ≻ b) and (b, a) otherwise, so the expected loss is minimised at
            h(a, b) = P(a ≻ b)/(2τ) − P(b ≻ a)/(2τ) = (2P(a ≻ b) − 1)/(2τ) =: c(a, b).
        A tabular policy can only realise differences h = g(a) − g(b), so it minimises the μ⊗μ-weighted least
        squares Σ_{a,b} μ(a)μ(b)·(g(a) − g(b) − c(a, b))². Setting the derivative in g(a) to 0 (c is antisymmetric):
            g(a) − E_μ[g] = Σ_b μ(b)·c(a, b) = (2p(a ≻ μ) − 1)/(2τ),
        i.e. g(a) = p(a ≻ μ)/τ + const. TRL's target is 1/(2β) per token; at length 1 this is the paper's with τ = β.
        """
        return self.tilted(self.win_rate(mu) / tau)  # arXiv:2310.12036 §5: π ∝ π_ref·exp(τ⁻¹·p(y ≻ μ))

    def sample_pairs(self, n: int, seed: int, mu: Tensor | None = None, label_noise: float = 0.0) -> Pairs:
        """n Bradley–Terry pairs: x uniform over prompts, y1, y2 i.i.d. from μ(·|x) (uniform if None), y1 preferred
        with probability σ(r(y1) − r(y2)); then each label is flipped with probability ``label_noise``."""
        generator = torch.Generator().manual_seed(seed)
        n_prompts, k = self.rewards.shape
        mu = torch.full((n_prompts, k), 1 / k) if mu is None else mu
        prompts = torch.randint(n_prompts, (n,), generator=generator)  # (n,)
        y1, y2 = torch.multinomial(mu[prompts], 2, replacement=True, generator=generator).T  # (n,) each, i.i.d.
        p_y1 = torch.sigmoid(self.rewards[prompts, y1] - self.rewards[prompts, y2])  # Bradley–Terry
        p_y1 = (1 - label_noise) * p_y1 + label_noise * (1 - p_y1)  # a flipped label with probability ε
        y1_wins = torch.rand(n, generator=generator) < p_y1
        return Pairs(prompts, torch.where(y1_wins, y1, y2), torch.where(y1_wins, y2, y1))


def example_bandit() -> Bandit:
    """Two prompts, six responses each; π_ref prefers the worse responses, so π* lies far from π_ref."""
    rewards = torch.tensor([[0.0, 0.4, 0.8, 1.2, 1.6, 2.0],
                            [1.0, 2.0, 0.0, 1.5, 0.5, 0.25]])
    reference_probs = torch.tensor([[0.30, 0.25, 0.18, 0.12, 0.10, 0.05],
                                    [0.10, 0.05, 0.30, 0.10, 0.20, 0.25]])
    return Bandit(reference_probs, rewards)


def total_variation(p: Tensor, q: Tensor) -> float:
    """½·Σ_y |p(y|x) − q(y|x)|, the worst over prompts (max, not mean); p, q: (P, K)."""
    return 0.5 * (p - q).abs().sum(-1).max().item()


# ---------------------------------------------------------------------------------------------------------
# Objectives: (policy_logps (P, K), reference_logps (P, K), pairs, beta, **options) -> the 0-dim mean loss.
# Each gathers the (n,) log-probs of the pairs and hands them, unchanged, to the formula of workbench.training.losses.


def _paired_objective(loss_fn: Callable[..., losses.LossOutput]) -> Callable[..., Tensor]:
    # "ipo", "sigmoid_norm" and "sft" divide by completion lengths; they are all 1 here.
    length_names = {"chosen_lengths", "rejected_lengths"} & set(inspect.signature(loss_fn).parameters)

    def objective(policy, reference, pairs, beta, **options):
        x, c, r = pairs
        lengths = {name: torch.ones(len(x)) for name in length_names}
        out, _, _ = loss_fn(policy[x, c], policy[x, r], reference[x, c], reference[x, r], beta, **lengths, **options)
        return out.mean()
    return objective


def _kto_objective(policy, reference, pairs, beta, **options):
    # The unpaired view: each pair gives a desirable row (its chosen) and an undesirable row (its rejected),
    # desirable rows first as kto_loss concatenates them. TRL's KL rows pair the prompt of row i with the
    # completion of row i − 1 of the batch (cyclically); in this order row i − 1 always belongs to another pair.
    x, c, r = pairs
    prompts, completions = torch.cat([x, x]), torch.cat([c, r])  # (2n,)
    kl_completions = completions.roll(1)
    kl = losses.kto_kl_estimate(policy[prompts, kl_completions], reference[prompts, kl_completions])
    out, _, _ = losses.kto_loss(policy[x, c], policy[x, r], reference[x, c], reference[x, r], beta, kl=kl, **options)
    return out.mean()


def _reference_free_objective(loss_fn: Callable[..., losses.LossOutput]) -> Callable[..., Tensor]:
    def objective(policy, reference, pairs, beta, **options):
        x, c, r = pairs
        # At length 1 the summed (CPO) and average (ORPO, SimPO) log-probs coincide. The bandit's prompt is only
        # conditioned on, so ORPO's NLL over "prompt + completion" tokens is the completion's NLL here.
        nll = losses.token_mean_nll(policy[x, c], torch.ones(len(x)))
        return loss_fn(policy[x, c], policy[x, r], beta, chosen_nll_loss=nll, **options)[0].mean()
    return objective


OBJECTIVES = {
    **{name: _paired_objective(fn) for name, fn in losses.PAIRED_LOSSES.items()},
    "kto": _kto_objective,
    "orpo": _reference_free_objective(losses.orpo_loss),
    "cpo": _reference_free_objective(losses.cpo_loss),
    "simpo": _reference_free_objective(losses.simpo_loss),
}
REFERENCE_FREE = {"orpo", "cpo", "simpo"}


def train_tabular(loss: str | Callable[..., losses.LossOutput], bandit: Bandit, pairs: Pairs, beta: float,
                  steps: int = 300, lr: float = 0.1, **options) -> Tensor:
    """Minimise the mean loss over ``pairs`` in the logits θ (P, K), from θ = log π_ref, by full-batch Adam.

    Args:
        loss: a key of ``OBJECTIVES`` (TRL's DPO loss types, "kto", "orpo", "cpo", "simpo"), or a paired loss
            function with the signature of ``losses.dpo_loss`` (to test a formula that is not in the table).
        beta: the β of the loss (ORPO's λ; SimPO's β).
        **options: passed to the formula, e.g. ``label_smoothing``, ``simpo_gamma``, ``cpo_alpha``.

    Returns the final policy π_θ, (P, K). There is no seed: the run is deterministic given the pairs (all the
    randomness is in ``Bandit.sample_pairs``). With the defaults DPO on ``example_bandit`` has converged: more
    steps move it by < 1e-3 in TV.
    """
    objective = OBJECTIVES[loss] if isinstance(loss, str) else _paired_objective(loss)
    reference = bandit.reference_probs.log()  # (P, K) log π_ref
    theta = _minimise(objective, reference, reference, pairs, beta, steps, lr, **options)  # from π_θ = π_ref
    return torch.softmax(theta, dim=-1)


def _minimise(objective, start: Tensor, reference: Tensor, pairs: Pairs, beta: float, steps: int, lr: float,
              **options) -> Tensor:
    """The logits θ (P, K) after ``steps`` of full-batch Adam on the mean loss over ``pairs``, from θ = ``start``,
    against the reference log-probs ``reference``."""
    theta = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(F.log_softmax(theta, dim=-1), reference, pairs, beta, **options).backward()
        optimizer.step()
    return theta.detach()


def train_tabular_iterative_dpo(bandit: Bandit, beta: float, rounds: int = 4, pairs_per_round: int = 32768,
                                refresh_reference_every: int | None = None, steps: int = 150, lr: float = 0.1,
                                loss: str = "sigmoid", seed: int = 0) -> list[Tensor]:
    """Iterative (online) DPO: each round samples two responses per prompt from the current policy, labels them by
    the Bradley–Terry model of the true reward, and trains the DPO loss on that round's pairs from the current
    policy (``steps`` of full-batch Adam); with ``refresh_reference_every = R`` the reference becomes the current
    policy every R rounds (Xu et al. 2024, arXiv:2404.10719; Xiong et al. 2024, arXiv:2312.11456). Returns the
    policy after each round, [(P, K)] * rounds.

    What to expect. With the reference fixed, every round's pairs come from another μ (the current policy), but the
    DPO loss's optimum does not depend on μ where μ covers the responses (the BT fit in the log-ratio): each round
    pulls the policy to π* ∝ π_ref·exp(r/β). With the reference refreshed every round, round t's optimum is
    π_t ∝ π_{t−1}·exp(r/β) = π_ref·exp(t·r/β): the policy keeps moving towards the reward's argmax."""
    objective = OBJECTIVES[loss]
    reference = bandit.reference_probs.log()
    theta = reference.clone()
    policies = []
    for t in range(rounds):
        if refresh_reference_every and t > 0 and t % refresh_reference_every == 0:
            reference = F.log_softmax(theta, dim=-1)  # the current policy becomes the reference
        pairs = bandit.sample_pairs(pairs_per_round, seed=seed * 1000 + t, mu=torch.softmax(theta, dim=-1))
        theta = _minimise(objective, theta, reference, pairs, beta, steps, lr)  # from the current policy
        policies.append(torch.softmax(theta, dim=-1))
    return policies


# ---------------------------------------------------------------------------------------------------------
# RL on the bandit: the same π* is the optimum of E_π[r] − β·KL(π ‖ π_ref), which PPO and RLOO maximise with the
# KL as a per-sample penalty in the reward. These loops run workbench.training.ppo's own functions (reward shaping, GAE,
# whitening, the clipped losses, the minibatch loop; RLOO's leave-one-out baseline) on a tabular policy, so the
# test of convergence to π* is a test of that code (our PPO is the study's PPO arm; our RLOO is a re-implementation,
# the study's RLOO arm is TRL's, tested by ``bandit_trl.train_trl_rloo``).


class _TabularActorCritic:
    """A tabular policy θ (P, K) and value table v (P,) in the interface of ``ppo.ppo_update``: one "token" per
    response, so every (mb, T) tensor has T = 1."""

    def __init__(self, theta: Tensor, v: Tensor, prompts: Tensor, responses: Tensor):
        self.theta, self.v, self.x, self.y = theta, v, prompts, responses

    def logprobs(self, idx):
        logp = F.log_softmax(self.theta, dim=-1)[self.x[idx]]  # (mb, K)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
        return logp.gather(1, self.y[idx, None]), entropy  # (mb, 1) each

    def values(self, idx):
        return self.v[self.x[idx]][:, None]  # (mb, 1)

    def critic(self):
        return contextlib.nullcontext()


def train_tabular_ppo(bandit: Bandit, beta: float, iterations: int = 150, batch_size: int = 2048, lr: float = 0.05,
                      seed: int = 0, **ppo_options) -> Tensor:
    """PPO with reward r(x, y) − β·(log π_old(y|x) − log π_ref(y|x)) from θ = log π_ref; returns π_θ (P, K).

    Each iteration samples ``batch_size`` prompts uniformly and one response each from π_θ, then runs
    ``ppo.ppo_update`` (4 epochs × 4 minibatches by default; any ``PPOArgs`` field can be passed), with the
    learning rate annealed linearly to 0 as ``train_ppo`` does."""
    from . import ppo

    cfg = ppo.PPOArgs(**{"ppo_epochs": 4, "num_minibatches": 4, "rollout_batch_size": batch_size, **ppo_options})
    generator = torch.Generator().manual_seed(seed)
    n_prompts, _ = bandit.rewards.shape
    reference = bandit.reference_probs.log()
    theta = reference.clone().requires_grad_(True)
    v = torch.zeros(n_prompts, requires_grad=True)
    optimizer = torch.optim.Adam([theta, v], lr=lr, eps=1e-5)
    mask = torch.ones(batch_size, 1, dtype=torch.bool)
    for it in range(iterations):
        optimizer.param_groups[0]["lr"] = lr * (1 - it / iterations)
        with torch.no_grad():
            x = torch.randint(n_prompts, (batch_size,), generator=generator)
            y = torch.multinomial(torch.softmax(theta, -1)[x], 1, generator=generator).squeeze(1)
            logprobs = F.log_softmax(theta, -1)[x, y][:, None]  # (N, 1) log π_old
            kl = ppo.kl_per_token(logprobs, reference[x, y][:, None], cfg.kl_estimator)
            rewards = ppo.per_token_rewards(bandit.rewards[x, y], kl, mask, beta)
            advantages, returns = ppo.gae(rewards, v[x][:, None], mask, cfg.gamma, cfg.lam)
            batch = ppo.Batch(mask, logprobs, v[x][:, None].clone(), ppo.whiten(advantages, mask), returns)
        ac = _TabularActorCritic(theta, v, x, y)
        ppo.ppo_update(ac, batch, optimizer, cfg, [theta, v], generator)
    return torch.softmax(theta.detach(), dim=-1)


def train_tabular_rloo(bandit: Bandit, beta: float, iterations: int = 300, n_prompts: int = 512, k: int = 4,
                       lr: float = 0.05, seed: int = 0, cliprange: float = 0.2) -> Tensor:
    """RLOO as TRL's RLOOTrainer runs it by default: k samples per prompt, sequence reward r − β·k1-KL, the
    leave-one-out baseline (``ppo.rloo_advantages``), one clipped-ratio gradient step per batch. Returns π_θ."""
    from . import ppo

    generator = torch.Generator().manual_seed(seed)
    P, _ = bandit.rewards.shape
    reference = bandit.reference_probs.log()
    theta = reference.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr, eps=1e-5)
    mask = torch.ones(n_prompts * k, 1, dtype=torch.bool)
    for it in range(iterations):
        optimizer.param_groups[0]["lr"] = lr * (1 - it / iterations)
        with torch.no_grad():
            x = torch.randint(P, (n_prompts,), generator=generator).repeat_interleave(k)  # k samples per prompt
            y = torch.multinomial(torch.softmax(theta, -1)[x], 1, generator=generator).squeeze(1)
            old = F.log_softmax(theta, -1)[x, y]
            reward = bandit.rewards[x, y] - beta * (old - reference[x, y])  # TRL: score − β·Σ_t k1
            advantages = ppo.rloo_advantages(reward.view(n_prompts, k)).view(-1, 1)
        optimizer.zero_grad()
        logprobs = F.log_softmax(theta, -1)[x, y][:, None]
        loss, _ = ppo.policy_loss(logprobs, old[:, None], advantages, mask, cliprange)
        loss.backward()
        optimizer.step()
    return torch.softmax(theta.detach(), dim=-1)


def grpo_expected_advantages(bandit: Bandit, policy: Tensor, k: int, scale_rewards: bool = True,
                             eps: float = 1e-4) -> Tensor:
    """a(x, y) = E[A_1 | x, y_1 = y], (P, K): the expected GRPO advantage of a completion y among k − 1 others drawn
    i.i.d. from ``policy`` (P, K), with A_1 = (r_1 − mean(r_1..r_k)) / (std(r_1..r_k) + eps) as TRL computes it
    (Bessel-corrected std; without the division if not ``scale_rewards``). Exact: all K^(k−1) draws are summed."""
    n_prompts, n_responses = policy.shape
    others = torch.cartesian_prod(*[torch.arange(n_responses)] * (k - 1)).view(-1, k - 1)  # (M, k−1)
    weight = policy[:, others].prod(-1)  # (P, M): probability of each draw of the others
    own = bandit.rewards.to(policy.dtype)[:, :, None, None].expand(-1, -1, len(others), 1)  # (P, K, M, 1)
    rest = bandit.rewards.to(policy.dtype)[:, others][:, None].expand(-1, n_responses, -1, -1)  # (P, K, M, k−1)
    group = torch.cat([own, rest], -1)  # (P, K, M, k): completion 1 is y
    advantage = group[..., 0] - group.mean(-1)
    if scale_rewards:
        advantage = advantage / (group.std(-1) + eps)
    return (weight[:, None] * advantage).sum(-1)


def grpo_fixed_point(bandit: Bandit, beta: float, k: int, scale_rewards: bool = True, kl: str = "reverse",
                     iterations: int = 300, step: float = 1.0) -> tuple[Tensor, float]:
    """The tabular policy (P, K) where GRPO's expected update is zero, and the largest remaining |∂/∂θ| (float64).

    For a softmax row θ(x, ·) (∂ log π(y)/∂θ = e_y − π) and on-policy ratios (value 1, gradient ∇log π), the
    expected gradient of TRL's GRPO loss per completion is the sum of
        policy term:  −E[A_i·(e_{y_i} − π)] = −π ⊙ a      (Σ_i A_i = 0 in a group, which removes the −π part)
        KL term, kl="reverse" (``use_bias_correction_kl=True``, TRL's default): β·∇(ratio·k3) with
            ∇(ratio·k3) = (k3 + 1 − π_ref/π)·∇log π = log(π/π_ref)(y)·∇log π, in expectation
            β·π ⊙ (log(π/π_ref) − KL(π ‖ π_ref)) = β·∇KL(π ‖ π_ref)
        KL term, kl="forward" (``use_bias_correction_kl=False``, the paper's k3 in the loss): β·∇k3 with
            ∇k3 = (1 − π_ref/π)(y)·∇log π, in expectation β·(π − π_ref) = β·∇KL(π_ref ‖ π)
    where a(x, y) = ``grpo_expected_advantages``. So the stationary points are
        reverse:  log π(y|x) = log π_ref(y|x) + a_π(x, y)/β + const   (a self-consistent tilt by a instead of r)
        forward:  π(y|x)·(β − a_π(x, y)) = β·π_ref(y|x).
    Without std scaling a(y) = (1 − 1/k)·(r(y) − E_π[r]) (the group mean includes y itself), so the reverse fixed
    point is π* at β·k/(k − 1). With it, a does not scale with r: once the best response b fills the rest of a
    group, another response x gets A ≈ −(k − 1)/√k (−1.5 at k = 4) however much worse it is. So a is in general not
    an affine function of r, and then the fixed point is not π* of any β (with two responses per prompt it always
    is, prompt by prompt; on ``example_bandit`` at β = 0.5 it is ≥ 0.13 in TV from π* of every β in 0.01–100).

    Found by iterating θ ← θ − step·g/π from θ = log π_ref, g the expected gradient above (dividing by π > 0
    rescales each coordinate and keeps the zeros; for kl="reverse" it is a damped iteration of the tilt equation).
    """
    reference = bandit.reference_probs.double()
    reference = reference / reference.sum(-1, keepdim=True)
    bandit = Bandit(reference, bandit.rewards.double())

    def gradient_over_policy(theta):  # g/π, (P, K)
        policy = torch.softmax(theta, -1)
        advantages = grpo_expected_advantages(bandit, policy, k, scale_rewards)
        if kl == "reverse":
            log_ratio = theta.log_softmax(-1) - reference.log()
            kl_term = log_ratio - (policy * log_ratio).sum(-1, keepdim=True)
        elif kl == "forward":
            kl_term = 1 - reference / policy
        else:
            raise ValueError(f"kl must be 'reverse' or 'forward', got {kl!r}")
        return -advantages + beta * kl_term, policy

    theta = reference.log()
    for _ in range(iterations):
        theta = theta - step * gradient_over_policy(theta)[0]
    scaled, policy = gradient_over_policy(theta)
    return policy, (policy * scaled).abs().max().item()
