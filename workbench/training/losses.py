"""Preference losses as pure functions of sequence log-probabilities: DPO and every paired variant of TRL's
DPOTrainer, KTO, ORPO, CPO and SimPO. Reference formulas for scoring and checking; training runs in TRL.

Each loss function mirrors one ``loss_type`` of TRL 1.16, including where TRL departs from the paper (noted in the
docstring); ``tests/test_losses.py`` checks every one against the real trainer on a tiny model.

Conventions
    * ``policy_chosen_logps`` etc. have shape (batch,). Each is the log-probability of a completion, summed over
      its tokens: log π(y|x) = Σ_t log π(y_t | x, y_<t). ORPO and SimPO are the exception: they take the
      *average* over completion tokens, because TRL computes theirs that way.
    * ``chosen_lengths`` / ``rejected_lengths`` count completion tokens, shape (batch,).
    * Every loss returns ``(losses, chosen_rewards, rejected_rewards)``. The mean of ``losses`` is the batch loss
      TRL optimises. The rewards are the per-example values whose batch means TRL logs as ``rewards/chosen`` and
      ``rewards/rejected``; they are detached. For losses with a reference model, the reward is the DPO implicit
      reward β·(log π − log π_ref) (arXiv:2305.18290, Eq. 5, without β·log Z(x), which cancels within a pair).

TRL options not covered: ``f_divergence_type`` other than the default "reverse_kl" (f-DPO), ``ld_alpha`` (LD-DPO),
``use_weighting`` (WPO), the MoE router auxiliary loss, CPO's ``alpha`` (AlphaPO) and its "hinge" / "ipo" variants,
and the unpaired BCOTrainer (its reward shift δ is absent from DPOTrainer's "bco_pair").
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]  # (losses, chosen_rewards, rejected_rewards)


@dataclass
class PairLogps:
    """Log-probabilities of a batch of preference pairs, each a (batch,) tensor summed over completion tokens."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor
    reference_rejected_logps: Tensor
    # completion token counts; "ipo", "sigmoid_norm" and "sft" need them
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None

    def __post_init__(self):
        _check_shapes(**vars(self))


# ---------------------------------------------------------------------------------------------------------
# Checks and shared pieces


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0 (got {beta}): it scales the log-ratios (the inverse KL-penalty strength).")


def _check_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(s)}" for name, s in shapes.items())
        raise ValueError(f"expected 1-D tensors of one shape (batch,), got {listed}")


def _check_smoothing(name: str, eps: float, low: float, high: float, closed_high: bool = False) -> None:
    ok = low <= eps <= high if closed_high else low <= eps < high
    if not ok:
        interval = f"[{low}, {high}]" if closed_high else f"[{low}, {high})"
        raise ValueError(f"label_smoothing for {name} must lie in {interval}, got {eps}")


def _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    """Checked inputs -> (chosen_logratios, rejected_logratios), log π − log π_ref per response, each (batch,)."""
    _check_beta(beta)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _rewards(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()  # arXiv:2305.18290 Eq. 5


def _per_token(logratios: Tensor, lengths: Tensor | None, loss_type: str, side: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{loss_type} needs {side}_lengths (completion token counts): TRL divides by them.")
    _check_shapes(logratios=logratios, **{f"{side}_lengths": lengths})
    return logratios / lengths.to(logratios.dtype).clamp(min=1.0)


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with a fraction ε of flipped labels (conservative DPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """β·(log π(y|x) − log π_ref(y|x)), (batch,), detached: the DPO reward of each response."""
    _check_beta(beta)
    return beta * (policy_logps - reference_logps).detach()  # arXiv:2305.18290 Eq. 5


def token_mean_nll(sequence_logps: Tensor, lengths: Tensor) -> Tensor:
    """Negative log-likelihood per token over a whole batch, −Σ log-probs / Σ tokens, a 0-dim tensor.

    This is how TRL averages its SFT / NLL terms: over all tokens in the batch, so long responses weigh more.
    sequence_logps, lengths: (batch,), summed log-probs and the token counts they were summed over.
    """
    _check_shapes(sequence_logps=sequence_logps, lengths=lengths)
    return -sequence_logps.sum() / lengths.to(sequence_logps.dtype).sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------
# Paired losses of TRL's DPOTrainer. Each takes four (batch,) summed log-probs and beta > 0, and returns
# (losses, chosen_rewards, rejected_rewards), each (batch,). Δ below is the difference of the log-ratios
# (log π − log π_ref) of the chosen and the rejected response.


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float) -> LossOutput:
    """DPO, TRL ``loss_type="sigmoid"`` (Rafailov et al. 2023): −log σ(β·Δ).

    TRL 1.16 applies no label smoothing to "sigmoid" (the conservative-DPO ε of older TRL and of the DPO
    reference code is gone); for noisy labels TRL offers ``robust``.
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = -F.logsigmoid(beta * (chosen - rejected))  # arXiv:2305.18290 Eq. 7
    return losses, *_rewards(chosen, rejected, beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta: float) -> LossOutput:
    """SLiC's hinge on reference-normalised likelihoods, TRL ``"hinge"``: max(0, 1 − β·Δ), margin 1/β."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = torch.relu(1 - beta * (chosen - rejected))  # SLiC-HF arXiv:2305.10425 §2, π_ref-normalised as in RSO
    return losses, *_rewards(chosen, rejected, beta)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, *, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> LossOutput:
    """IPO, TRL ``"ipo"``: (Δ_per_token − 1/(2β))², with β playing the role of the paper's τ.

    TRL divides each log-ratio by its completion's token count before taking Δ (the paper writes sequence
    log-ratios; TRL says the IPO authors confirmed the per-token form), so ``*_lengths`` are required.
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    delta = (_per_token(chosen, chosen_lengths, "ipo", "chosen")
             - _per_token(rejected, rejected_lengths, "ipo", "rejected"))
    losses = (delta - 1 / (2 * beta)) ** 2  # arXiv:2310.12036 Eq. 17
    return losses, *_rewards(chosen, rejected, beta)


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float, *, label_smoothing: float = 0.0) -> LossOutput:
    """EXO with two responses, TRL ``"exo_pair"``: KL(p_θ ‖ p_ε), p_θ = softmax of β·log-ratios over the pair,
    p_ε = (1−ε, ε). ε = ``label_smoothing`` must lie in (0, 1), so the default 0 raises, as in TRL; the paper
    suggests 1e-3."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing for exo_pair must lie in (0, 1), got {label_smoothing} "
                         "(the paper uses 1e-3)")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    z = beta * (chosen - rejected)
    log_p_chosen, log_p_rejected = F.logsigmoid(z), F.logsigmoid(-z)  # p_θ over {chosen, rejected}
    losses = (log_p_chosen.exp() * (log_p_chosen - math.log1p(-label_smoothing))
              + log_p_rejected.exp() * (log_p_rejected - math.log(label_smoothing)))  # arXiv:2402.00856 Eq. 16
    return losses, *_rewards(chosen, rejected, beta)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float) -> LossOutput:
    """NCA for a pair, TRL ``"nca_pair"``: scores each response's own reward, not only their difference."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    r_chosen, r_rejected = beta * chosen, beta * rejected
    losses = -F.logsigmoid(r_chosen) - (F.logsigmoid(-r_chosen) + F.logsigmoid(-r_rejected)) / 2  # arXiv:2402.05369 §4
    return losses, *_rewards(chosen, rejected, beta)


def robust_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta: float, *, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (rDPO), TRL ``"robust"``: unbiased DPO loss when labels flip with probability ε.

    ε = ``label_smoothing`` must lie in [0, 0.5) (TRL only warns). ε = 0 gives DPO. The loss can be negative.
    """
    _check_smoothing("robust", label_smoothing, 0.0, 0.5)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    z = beta * (chosen - rejected)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)  # arXiv:2403.00409 §3
    return losses, *_rewards(chosen, rejected, beta)


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float) -> LossOutput:
    """BCO on pairs, TRL ``"bco_pair"``: binary cross-entropy with chosen → 1, rejected → 0, logit = β·log-ratio.
    Unlike the BCO paper and BCOTrainer, there is no reward shift δ."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)  # arXiv:2404.04656 §4, δ = 0
    return losses, *_rewards(chosen, rejected, beta)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   beta: float) -> LossOutput:
    """SPPO with hard win probabilities, TRL ``"sppo_hard"``: pushes the chosen log-ratio to +1/(2β) and the
    rejected one to −1/(2β), each on its own (P(win) = 1 for the chosen, 0 for the rejected response)."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2  # arXiv:2405.00675 Algorithm 1, hard P
    return losses, *_rewards(chosen, rejected, beta)


def aot_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, *, label_smoothing: float = 0.0) -> LossOutput:
    """AOT for paired data, TRL ``"aot"``: the smoothed logistic loss on the *sorted* policy margins minus the
    sorted reference margins (margin = log π(y_w) − log π(y_l)), which enforces stochastic dominance.

    ``losses[i]`` belongs to the i-th quantile of the batch, not to pair i; rewards are per pair.
    """
    _check_smoothing("aot", label_smoothing, 0.0, 0.5, closed_high=True)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    policy_margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
    reference_margins, _ = torch.sort(reference_chosen_logps - reference_rejected_logps)
    losses = _smoothed_logistic(beta * (policy_margins - reference_margins), label_smoothing)  # arXiv:2406.05882 §3
    return losses, *_rewards(chosen, rejected, beta)


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                      beta: float, *, label_smoothing: float = 0.0) -> LossOutput:
    """AOT for unpaired data, TRL ``"aot_unpaired"``: the sorted chosen log-ratios must dominate the sorted
    rejected ones. ``losses[i]`` belongs to the i-th quantile, not to pair i."""
    _check_smoothing("aot_unpaired", label_smoothing, 0.0, 0.5, closed_high=True)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    chosen_sorted, _ = torch.sort(chosen)
    rejected_sorted, _ = torch.sort(rejected)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)  # arXiv:2406.05882 §3
    return losses, *_rewards(chosen, rejected, beta)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float) -> LossOutput:
    """APO-zero, TRL ``"apo_zero"``: raise the chosen likelihood and lower the rejected one, each anchored at
    the reference. Use when the chosen responses are better than the model's own."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)  # arXiv:2408.06266 Eq. 7
    return losses, *_rewards(chosen, rejected, beta)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float) -> LossOutput:
    """APO-down, TRL ``"apo_down"``: lower both likelihoods, the rejected one more. Use when the model's own
    responses are already better than the chosen ones."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))  # arXiv:2408.06266 Eq. 8
    return losses, *_rewards(chosen, rejected, beta)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta: float, *, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP, TRL ``"discopop"``: a log-ratio-modulated blend of the logistic loss and the exponential loss
    exp(−β·Δ), mixed by σ(β·Δ/τ). τ = ``discopop_tau`` (paper and TRL default 0.05)."""
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    z = beta * (chosen - rejected)
    mix = torch.sigmoid(z / discopop_tau)
    losses = (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)  # arXiv:2406.08414 Eq. 5
    return losses, *_rewards(chosen, rejected, beta)


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                      beta: float, *, chosen_lengths: Tensor | None = None,
                      rejected_lengths: Tensor | None = None) -> LossOutput:
    """Length-normalised DPO (Tülu 3), TRL ``"sigmoid_norm"``: −log σ(β·Δ_per_token), DPO on per-token log-ratios.
    Rewards stay the unnormalised β·log-ratios, as TRL logs them."""
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    delta = (_per_token(chosen, chosen_lengths, "sigmoid_norm", "chosen")
             - _per_token(rejected, rejected_lengths, "sigmoid_norm", "rejected"))
    losses = -F.logsigmoid(beta * delta)  # arXiv:2411.15124 Eq. 6 (length normalisation as in arXiv:2405.14734 Eq. 4)
    return losses, *_rewards(chosen, rejected, beta)


def sft_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, *, chosen_lengths: Tensor | None = None) -> LossOutput:
    """SFT on the chosen responses, TRL ``"sft"``: the per-token NLL over all chosen tokens of the batch.

    It is one number for the batch, repeated for each example so that its mean is TRL's value. beta only scales
    the rewards (β·log-ratios, logged by TRL whatever the loss).
    """
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps, beta)
    if chosen_lengths is None:
        raise ValueError("sft needs chosen_lengths (completion token counts): TRL averages over chosen tokens.")
    losses = token_mean_nll(policy_chosen_logps, chosen_lengths).expand_as(policy_chosen_logps)  # −(1/N)·Σ_t log π
    return losses, *_rewards(chosen, rejected, beta)


# TRL DPOConfig.loss_type -> formula
PAIRED_LOSSES = {
    "sigmoid": dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "sft": sft_loss,
}


@functools.cache  # signature inspection is slow enough to dominate small batches (the bandit oracle)
def _options_of(fn) -> frozenset[str]:
    return frozenset(name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


def preference_loss(loss_type: str | list[str], batch: PairLogps, beta: float, loss_weights: list[float] | None = None,
                    **options) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """One loss type of TRL's DPOTrainer, or a weighted combination of several, as
    ``DPOConfig(loss_type=[...], loss_weights=[...])`` combines them.

    Args:
        loss_type: a key of ``PAIRED_LOSSES``, or a list of them.
        batch: the pair log-probs (and completion lengths, needed by "ipo", "sigmoid_norm" and "sft").
        beta: > 0, as ``DPOConfig.beta``.
        loss_weights: one weight per loss type; default 1.0 each.
        **options: ``label_smoothing`` (robust, exo_pair, aot, aot_unpaired), ``discopop_tau`` (discopop). Each
            loss takes the options it uses. As in TRL, "sigmoid" ignores ``label_smoothing``.

    Returns:
        total: 0-dim, Σ_i w_i · mean(losses_i), the scalar TRL optimises.
        losses: {loss type: (batch,) unweighted per-example losses}.
        chosen_rewards, rejected_rewards: (batch,), β·(log π − log π_ref), detached.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [t for t in loss_types if t not in PAIRED_LOSSES]
    if unknown or not loss_types:
        raise ValueError(f"unknown loss type(s) {unknown or loss_types}; known: {', '.join(PAIRED_LOSSES)}")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"a loss type is listed twice in {loss_types}; add up its weights instead")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(weights)} loss_weights for {len(loss_types)} loss types {loss_types}")
    known_options = set().union(*map(_options_of, PAIRED_LOSSES.values())) - {"chosen_lengths", "rejected_lengths"}
    if set(options) - known_options:
        raise ValueError(f"unknown option(s) {sorted(set(options) - known_options)}; known: {sorted(known_options)}")

    available = {"chosen_lengths": batch.chosen_lengths, "rejected_lengths": batch.rejected_lengths, **options}
    logps = (batch.policy_chosen_logps, batch.policy_rejected_logps,
             batch.reference_chosen_logps, batch.reference_rejected_logps)
    total, per_type = 0.0, {}
    for name, weight in zip(loss_types, weights):
        fn = PAIRED_LOSSES[name]
        kwargs = {k: v for k, v in available.items() if k in _options_of(fn)}
        per_type[name], _, _ = fn(*logps, beta, **kwargs)
        total = total + weight * per_type[name].mean()
    chosen_rewards = implicit_rewards(batch.policy_chosen_logps, batch.reference_chosen_logps, beta)
    rejected_rewards = implicit_rewards(batch.policy_rejected_logps, batch.reference_rejected_logps, beta)
    return total, per_type, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------------------
# KTO (TRL's KTOTrainer): unpaired. "chosen" = desirable (label True), "rejected" = undesirable; the two sets
# may differ in size.


def kto_kl_estimate(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0, a 0-dim tensor: the batch mean of log π(y'|x) − log π_ref(y'|x) over
    mismatched (prompt, completion) pairs, clamped at 0 and detached (no gradient flows through it).

    TRL pairs the prompt of row i with the completion of row i−1 of the same batch (cyclically).
    policy_kl_logps, reference_kl_logps: (batch,) summed log-probs of those mismatched completions.
    """
    _check_shapes(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)  # z0 of arXiv:2402.01306 Eq. 7


def kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, *, kl: Tensor | float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO, TRL KTOTrainer ``loss_type="kto"``.

    Args:
        policy_chosen_logps, reference_chosen_logps: (n_desirable,) summed log-probs of desirable completions.
        policy_rejected_logps, reference_rejected_logps: (n_undesirable,) the same for undesirable ones.
        kl: z0 from ``kto_kl_estimate``.
        desirable_weight, undesirable_weight: λ_D, λ_U.

    Returns:
        losses: (n_desirable + n_undesirable,), desirable first as TRL concatenates them; the mean is TRL's loss.
        chosen_rewards (n_desirable,), rejected_rewards (n_undesirable,): β·log-ratios.
    """
    _check_beta(beta)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    _check_shapes(policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps)
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    # λ_y − v(x, y) with v = λ_D·σ(β(r − z0)) for desirable y and λ_U·σ(β(z0 − r)) for undesirable y
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl)))  # arXiv:2402.01306 Eq. 7
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))  # arXiv:2402.01306 Eq. 7
    return torch.cat([chosen_losses, rejected_losses]), *_rewards(chosen, rejected, beta)


def apo_zero_unpaired_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta: float, *, desirable_weight: float = 1.0,
                           undesirable_weight: float = 1.0) -> LossOutput:
    """APO-zero on unpaired data, TRL KTOTrainer ``loss_type="apo_zero_unpaired"``: KTO's layout (see
    ``kto_loss``) with APO-zero's per-response terms and no KL reference point."""
    _check_beta(beta)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    _check_shapes(policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps)
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * chosen))  # arXiv:2408.06266 Eq. 7, desirable term
    rejected_losses = undesirable_weight * torch.sigmoid(beta * rejected)  # arXiv:2408.06266 Eq. 7, undesirable term
    return torch.cat([chosen_losses, rejected_losses]), *_rewards(chosen, rejected, beta)


# ---------------------------------------------------------------------------------------------------------
# Reference-free losses (trl.experimental.orpo / .cpo). No π_ref: the "reward" TRL logs is β times the
# policy's own log-probability of the response (average per token for ORPO and SimPO, summed for CPO).


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends: log(−expm1(x)) near 0, log1p(−exp(x)) far below."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, beta: float, *,
              chosen_nll_loss: Tensor | float) -> LossOutput:
    """ORPO (trl.experimental.orpo): SFT NLL + λ·(−log σ(log odds ratio)), with λ = ``beta``.

    Args:
        policy_chosen_logps, policy_rejected_logps: (batch,) *average* per-token log-probs of the completions,
            so that odds(y|x) = P/(1 − P) with P = exp(average).
        chosen_nll_loss: the SFT term, 0-dim or (batch,). TRL's is the token-mean NLL of the whole chosen
            sequences, *prompt tokens included*, as in the ORPO authors' code (TRL PR #1516), not the
            completion-only NLL one might expect; see ``token_mean_nll``.

    Returns:
        losses (batch,); chosen_rewards, rejected_rewards: β·average log-prob, what TRL logs as rewards/*.
    """
    _check_beta(beta)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # log OR, arXiv:2403.07691 Eqs. 4-5
    losses = chosen_nll_loss - beta * F.logsigmoid(log_odds)  # arXiv:2403.07691 Eq. 6, L_OR of Eq. 7
    return losses, beta * chosen.detach(), beta * rejected.detach()


def cpo_loss(policy_chosen_logps, policy_rejected_logps, beta: float, *, label_smoothing: float = 0.0,
             chosen_nll_loss: Tensor | float | None = None, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO (trl.experimental.cpo, ``loss_type="sigmoid"``): DPO's logistic loss with π_ref dropped, on summed
    log-probs, plus ``cpo_alpha`` × the NLL of the chosen completions.

    Args:
        policy_chosen_logps, policy_rejected_logps: (batch,) summed log-probs.
        label_smoothing: ε of the conservative (flipped-label) form, in [0, 0.5].
        chosen_nll_loss: 0-dim or (batch,); TRL's is the token-mean NLL over chosen completion tokens
            (``token_mean_nll(policy_chosen_logps, chosen_lengths)``). Needed unless cpo_alpha == 0.

    Returns:
        losses (batch,); chosen_rewards, rejected_rewards: β·summed log-prob.
    """
    _check_beta(beta)
    _check_smoothing("cpo", label_smoothing, 0.0, 0.5, closed_high=True)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if cpo_alpha != 0 and chosen_nll_loss is None:
        raise ValueError("cpo_loss needs chosen_nll_loss when cpo_alpha != 0 (the NLL term of CPO)")
    margin = beta * (policy_chosen_logps - policy_rejected_logps)
    losses = _smoothed_logistic(margin, label_smoothing)  # L_prefer, arXiv:2401.08417 Eq. 3
    if cpo_alpha != 0:
        losses = losses + cpo_alpha * chosen_nll_loss  # + L_NLL on the chosen responses, arXiv:2401.08417 §3
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta: float, *, simpo_gamma: float = 0.5,
               label_smoothing: float = 0.0, chosen_nll_loss: Tensor | float | None = None,
               cpo_alpha: float = 0.0) -> LossOutput:
    """SimPO, −log σ(β·(ā_w − ā_l) − γ): trl.experimental.cpo with ``CPOConfig(loss_type="simpo", cpo_alpha=0)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: (batch,) *average* per-token log-probs ā.
        beta: SimPO's β (the paper uses 2 to 10); simpo_gamma: the target reward margin γ.
        label_smoothing: ε of the conservative form, in [0, 0.5]; 0 in the paper.
        chosen_nll_loss, cpo_alpha: CPO's NLL term, off (cpo_alpha = 0) for pure SimPO.

    Returns:
        losses (batch,); chosen_rewards, rejected_rewards: the SimPO reward β·ā (arXiv:2405.14734 Eq. 4).
    """
    _check_beta(beta)
    _check_smoothing("simpo", label_smoothing, 0.0, 0.5, closed_high=True)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if cpo_alpha != 0 and chosen_nll_loss is None:
        raise ValueError("simpo_loss needs chosen_nll_loss when cpo_alpha != 0")
    margin = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
    losses = _smoothed_logistic(margin, label_smoothing)  # arXiv:2405.14734 Eq. 6
    if cpo_alpha != 0:
        losses = losses + cpo_alpha * chosen_nll_loss  # CPO's NLL term, arXiv:2401.08417 §3
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
