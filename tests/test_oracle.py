"""The bandit oracle (workbench/training/bandit.py): each preference objective of workbench/training/losses.py, trained on sampled
Bradley–Terry pairs in a tabular bandit, reaches the policy that theory says it should: π* for DPO and rDPO,
its own optimum for IPO, closed-form margins for hinge and EXO on two arms, and the right direction for the rest.
A deliberately wrong formula fails the same checks. The RL arms are checked on the same bandit: our own PPO and
RLOO loops, and TRL's own RLOOTrainer and GRPOTrainer as the study configures them (section 7). Every seed is fixed;
section 7 takes about a minute on 2 CPU cores, the rest about 20 s."""

import math

import pytest
import torch

from workbench.training import losses
from workbench.training.bandit import OBJECTIVES, REFERENCE_FREE, Bandit, example_bandit, total_variation, train_tabular

BETA = 0.5
TV_TOL = 0.05
# Full-batch Adam from π_ref: 150 steps at lr 0.1 reach the optimum to ~1e-3 in TV (checked against 600 steps),
# so what remains is the sampling error of the pairs.
EXACT = dict(steps=150, lr=0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny; extra threads only add overhead (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bandit():
    return example_bandit()


@pytest.fixture(scope="module")
def pairs(bandit):
    return bandit.sample_pairs(40_000, seed=0)  # μ uniform


def expected_reward(bandit: Bandit, policy):
    return (policy * bandit.rewards).sum(-1)  # (P,)


def population_gradient(bandit: Bandit, loss_type: str, policy, beta: float, mu=None, label_noise=0.0, **options):
    """∇_θ of the *expected* loss over the pair distribution (every ordered pair weighted by its probability),
    at θ = log policy. Zero at a stationary point of the population objective. Use a float64 bandit."""
    n_prompts, k = bandit.rewards.shape
    r = bandit.rewards
    mu = torch.full_like(r, 1 / k) if mu is None else mu
    p_win = torch.sigmoid(r[:, :, None] - r[:, None, :])  # (P, K, K): P(a ≻ b)
    p_win = (1 - label_noise) * p_win + label_noise * (1 - p_win)
    # (chosen, rejected) = (a, b) when y1 = a, y2 = b and a wins, or y1 = b, y2 = a and a wins: 2·μ(a)μ(b)·P(a ≻ b)
    weight = 2 * mu[:, :, None] * mu[:, None, :] * p_win / n_prompts  # (P, K, K); a = b pairs have no gradient
    x, a, b = torch.meshgrid(torch.arange(n_prompts), torch.arange(k), torch.arange(k), indexing="ij")
    x, a, b, weight = x.flatten(), a.flatten(), b.flatten(), weight.flatten()
    theta = policy.log().requires_grad_(True)
    logp, ref = torch.log_softmax(theta, -1), bandit.reference_probs.log()
    ones = torch.ones_like(weight)
    kwargs = {"chosen_lengths": ones, "rejected_lengths": ones} if loss_type == "ipo" else {}
    out, _, _ = losses.PAIRED_LOSSES[loss_type](logp[x, a], logp[x, b], ref[x, a], ref[x, b], beta, **kwargs, **options)
    (out * weight).sum().backward()
    return theta.grad


# ---------------------------------------------------------------------------------------------------------
# 1. The closed forms themselves


def test_optimal_policy_by_hand():
    # π_ref = (½, ¼, ¼), r = (0, log 2, log 4), β = 1: π* ∝ (½·1, ¼·2, ¼·4) = (½, ½, 1) -> (¼, ¼, ½)
    bandit = Bandit(torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.0, math.log(2), math.log(4)]]))
    assert torch.allclose(bandit.optimal_policy(1.0), torch.tensor([[0.25, 0.25, 0.5]]), atol=1e-6)
    # β = 2 halves the exponent: (½·1, ¼·√2, ¼·2) normalised
    unnormalised = torch.tensor([0.5, 0.25 * math.sqrt(2), 0.5])
    assert torch.allclose(bandit.optimal_policy(2.0)[0], unnormalised / unnormalised.sum(), atol=1e-6)


def test_optimal_policy_limits(bandit):
    for beta in (0.1, 0.5, 2.0):
        assert torch.allclose(bandit.optimal_policy(beta).sum(-1), torch.ones(2), atol=1e-6)
    assert total_variation(bandit.optimal_policy(1e6), bandit.reference_probs) < 1e-5  # β → ∞: stay at π_ref
    greedy = torch.nn.functional.one_hot(bandit.rewards.argmax(-1), 6).float()
    assert total_variation(bandit.optimal_policy(1e-3), greedy) < 1e-5  # β → 0: the best response


def test_ipo_optimum_by_hand():
    # two arms, r = (0, 1), μ uniform: p(y ≻ μ) = ½·(σ(r_y − 0) + σ(r_y − 1)), so the log-ratio margin is
    # (p(1 ≻ μ) − p(0 ≻ μ))/τ = (σ(1) − ½)/τ
    bandit = Bandit(torch.tensor([[0.8, 0.2]]), torch.tensor([[0.0, 1.0]]))
    s = torch.sigmoid(torch.tensor(1.0)).item()
    assert torch.allclose(bandit.win_rate(), torch.tensor([[0.5 * (0.5 + 1 - s), 0.5 * (s + 0.5)]]), atol=1e-6)
    policy = bandit.ipo_optimal_policy(tau=0.25)
    margin = (policy.log() - bandit.reference_probs.log()) @ torch.tensor([-1.0, 1.0])
    assert abs(margin.item() - (s - 0.5) / 0.25) < 1e-5


@pytest.mark.parametrize("loss_type, optimum, options", [
    ("sigmoid", lambda b: b.optimal_policy(BETA), {}),
    ("robust", lambda b: b.optimal_policy(BETA), dict(label_smoothing=0.2)),
    ("ipo", lambda b: b.ipo_optimal_policy(BETA), {}),
    ("ipo, mu = pi_ref", lambda b: b.ipo_optimal_policy(BETA, b.reference_probs), {}),
])
def test_closed_forms_are_stationary_points_of_the_population_losses(bandit, loss_type, optimum, options):
    """No sampling, no training: the expected loss has zero gradient at the claimed optimum (and not at π_ref).
    The DPO and rDPO losses are convex in θ and IPO's is quadratic, so a stationary point is the minimum."""
    reference = bandit.reference_probs.double()
    bandit = Bandit(reference / reference.sum(-1, keepdim=True), bandit.rewards.double())  # rows sum to 1 in float64
    name, mu = loss_type.split(",")[0], bandit.reference_probs if "pi_ref" in loss_type else None
    noise = options.get("label_smoothing", 0.0)  # rDPO is told the true flip rate
    at_optimum = population_gradient(bandit, name, optimum(bandit), BETA, mu, noise, **options)
    at_reference = population_gradient(bandit, name, bandit.reference_probs, BETA, mu, noise, **options)
    assert at_optimum.abs().max() < 1e-9
    assert at_reference.abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# 2.-4. Trained on sampled pairs, the exact optima are reached


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_dpo_reaches_the_kl_regularised_optimum(bandit, pairs, beta):
    target = bandit.optimal_policy(beta)
    assert total_variation(bandit.reference_probs, target) > 0.25  # the start is far from the answer
    assert total_variation(train_tabular("sigmoid", bandit, pairs, beta, **EXACT), target) <= TV_TOL


def test_sigmoid_norm_is_dpo_at_length_one(bandit, pairs):
    assert total_variation(train_tabular("sigmoid_norm", bandit, pairs, BETA, **EXACT),
                           bandit.optimal_policy(BETA)) <= TV_TOL


@pytest.mark.parametrize("cpo_or_simpo, options", [("cpo", dict(cpo_alpha=0.0)), ("simpo", dict(simpo_gamma=0.0))])
def test_reference_free_dpo_reaches_softmax_of_rewards(bandit, pairs, cpo_or_simpo, options):
    """Without the NLL term (CPO) or the margin γ (SimPO), −log σ(β(log π_w − log π_l)) is DPO with a uniform
    reference: the BT fit gives β·log π = r + const, i.e. π = softmax(r/β)."""
    target = torch.softmax(bandit.rewards / BETA, dim=-1)
    assert total_variation(bandit.reference_probs, target) > 0.25
    assert total_variation(train_tabular(cpo_or_simpo, bandit, pairs, BETA, **EXACT, **options), target) <= TV_TOL


@pytest.mark.parametrize("mu_is_reference", [False, True])
def test_ipo_reaches_its_own_optimum_not_pi_star(bandit, mu_is_reference):
    tau = 0.1  # TRL's IPO at length 1 is the paper's with τ = β
    mu = bandit.reference_probs if mu_is_reference else None
    pairs = bandit.sample_pairs(40_000, seed=1, mu=mu)
    target = bandit.ipo_optimal_policy(tau, mu)
    policy = train_tabular("ipo", bandit, pairs, tau, **EXACT)
    assert total_variation(bandit.reference_probs, target) > 0.25
    assert total_variation(policy, target) <= TV_TOL
    assert total_variation(policy, bandit.optimal_policy(tau)) > 0.5  # IPO's answer is not DPO's


def test_robust_dpo_undoes_label_noise_and_plain_dpo_does_not(bandit):
    eps = 0.1
    noisy = bandit.sample_pairs(80_000, seed=2, label_noise=eps)
    target = bandit.optimal_policy(BETA)
    robust = total_variation(train_tabular("robust", bandit, noisy, BETA, **EXACT, label_smoothing=eps), target)
    plain = total_variation(train_tabular("sigmoid", bandit, noisy, BETA, **EXACT), target)
    assert robust <= TV_TOL
    assert plain > robust + 0.08  # DPO fits the flattened preferences: π is pulled back toward π_ref


# ---------------------------------------------------------------------------------------------------------
# Two arms: one pair type, so the optimum of the loss averaged over the sampled pairs is that of one pair with the
# empirical win rate P̂, and more losses have a closed form. Δ = log-ratio of the better arm − that of the worse.


@pytest.fixture(scope="module")
def two_arms():
    bandit = Bandit(torch.tensor([[0.8, 0.2]]), torch.tensor([[0.0, 1.5]]))
    return bandit, bandit.sample_pairs(20_000, seed=3)


@pytest.mark.parametrize("loss_type, options, expected, tol", [
    ("sigmoid", {}, lambda p: math.log(p / (1 - p)), 0.01),  # β·Δ = logit(P̂), the empirical BT reward gap
    # P·(1 − βΔ)₊ + (1 − P)·(1 + βΔ)₊: slope −Pβ + (1−P)β < 0 below 1/β, +(1−P)β above -> β·Δ = 1. Adam
    # oscillates around a kink by about its step size, hence the looser tolerance.
    ("hinge", {}, lambda p: 1.0, 0.1),
    # P·KL(q ‖ (1−ε, ε)) + (1−P)·KL(q ‖ (ε, 1−ε)) = KL(q ‖ geometric mix) + c -> β·Δ = (2P − 1)·log((1 − ε)/ε)
    ("exo_pair", dict(label_smoothing=1e-3), lambda p: (2 * p - 1) * math.log((1 - 1e-3) / 1e-3), 0.01),
])
def test_two_arm_closed_forms(two_arms, loss_type, options, expected, tol):
    bandit, pairs = two_arms
    beta = 1.0
    _, chosen, rejected = pairs
    p_hat = (chosen[chosen != rejected] == 1).float().mean().item()  # how often the better arm won, ~σ(1.5)
    policy = train_tabular(loss_type, bandit, pairs, beta, steps=300, lr=0.1, **options)
    logratios = policy.log() - bandit.reference_probs.log()  # (1, 2)
    margin = (logratios[0, 1] - logratios[0, 0]).item()
    assert abs(beta * margin - expected(p_hat)) <= tol
    assert abs(expected(p_hat) - expected(torch.sigmoid(torch.tensor(1.5)).item())) < 0.15  # P̂ is near P


# ---------------------------------------------------------------------------------------------------------
# 5. Every method: the direction


DIRECTION_BETA = {"orpo": 0.1, "cpo": 0.1, "simpo": 2.0}  # TRL's ORPO/CPO default; SimPO's paper range (2-10)
DIRECTION_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3), "discopop": dict(discopop_tau=0.2)}
# Objectives that, trained from π_ref on these pairs, do NOT move toward better responses; each is explained and
# checked in its own test below.
MOVES_AWAY = {"apo_down"}


@pytest.fixture(scope="module")
def direction_pairs(bandit):
    return bandit.sample_pairs(20_000, seed=4)


def misordered_pairs(scores, rewards, tol=0.1):
    """Pairs of responses to one prompt where the better one scores lower by more than ``tol``; scores (P, K)."""
    better = rewards[:, :, None] > rewards[:, None, :]
    lower = scores[:, :, None] < scores[:, None, :] - tol
    return int((better & lower).sum())


@pytest.mark.parametrize("loss_type", sorted(set(OBJECTIVES) - MOVES_AWAY))
def test_every_objective_moves_toward_better_responses(bandit, direction_pairs, loss_type):
    policy = train_tabular(loss_type, bandit, direction_pairs, DIRECTION_BETA.get(loss_type, BETA), steps=200,
                           lr=0.05, **DIRECTION_OPTIONS.get(loss_type, {}))
    best = bandit.rewards.argmax(-1, keepdim=True)
    assert (expected_reward(bandit, policy) > expected_reward(bandit, bandit.reference_probs) + 0.1).all()
    assert (policy.gather(1, best) > bandit.reference_probs.gather(1, best)).all()
    # the learned log-ratios (reference-free methods: log-probs) are ordered as the rewards, up to ties: losses
    # that saturate (KTO, APO-zero, hinge) leave the worst responses at equal, very negative log-ratios
    scores = policy.log() if loss_type in REFERENCE_FREE else policy.log() - bandit.reference_probs.log()
    assert misordered_pairs(scores, bandit.rewards) == 0


def test_discopop_at_its_default_tau_moves_against_the_preferences(bandit, direction_pairs):
    """DiscoPOP's loss f(z) = (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^(−z) has slope f'(0) = (1 − log 2)/(4τ) − 3/4 at
    zero margin, positive for τ < (1 − log 2)/3 ≈ 0.102. Training starts at π = π_ref, where every margin is 0,
    so at the default τ = 0.05 gradient descent first lowers the chosen margins and settles in the local minimum
    at a small negative margin: the policy ends *worse* than π_ref. (With τ = 0.2 it passes the direction test.)"""
    for tau in (0.05, 0.2):
        z = torch.zeros(1, requires_grad=True)
        losses.discopop_loss(z, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0, discopop_tau=tau)[0].backward()
        assert abs(z.grad.item() - ((1 - math.log(2)) / (4 * tau) - 0.75)) < 1e-6
    policy = train_tabular("discopop", bandit, direction_pairs, BETA, steps=200, lr=0.05)  # TRL default τ = 0.05
    assert (expected_reward(bandit, policy) < expected_reward(bandit, bandit.reference_probs) - 0.05).all()


def test_apo_down_lowers_the_chosen_likelihood_and_so_the_reward_here(bandit, direction_pairs):
    """APO-down (arXiv:2408.06266 Eq. 8) pushes the chosen log-ratios *down* (σ(β·r_w)) while separating them from
    the rejected ones; it is meant for data whose chosen answers are worse than the policy's own. Here the chosen
    responses are draws from μ like everything else, and the objective is lowest when π puts its mass on a
    response that is rarely chosen: here it ends on the worst response of each prompt (E_π[r] = 0)."""
    policy = train_tabular("apo_down", bandit, direction_pairs, BETA, steps=200, lr=0.05)
    x, chosen, _ = direction_pairs
    chosen_logratios = policy.log()[x, chosen] - bandit.reference_probs.log()[x, chosen]
    assert chosen_logratios.mean() < -1.0
    assert (expected_reward(bandit, policy) < expected_reward(bandit, bandit.reference_probs) - 0.3).all()
    worst = bandit.rewards.argmin(-1, keepdim=True)
    assert (policy.gather(1, worst) > 0.9).all()


# ---------------------------------------------------------------------------------------------------------
# 6. The oracle catches a wrong formula


def test_a_wrong_formula_fails_the_oracle(bandit, pairs):
    target = bandit.optimal_policy(BETA)

    def dpo_with_swapped_arguments(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
        return losses.dpo_loss(policy_rejected, policy_chosen, reference_rejected, reference_chosen, beta)

    wrong = train_tabular(dpo_with_swapped_arguments, bandit, pairs, BETA, **EXACT)
    assert total_variation(wrong, target) > 0.5
    # the same bug seen as flipped labels: the fit is exactly π_ref·exp(−r/β), the optimum of the negated reward
    x, chosen, rejected = pairs
    flipped = train_tabular("sigmoid", bandit, (x, rejected, chosen), BETA, **EXACT)
    assert total_variation(flipped, wrong) < 1e-4
    assert total_variation(flipped, bandit.tilted(-bandit.rewards / BETA)) <= TV_TOL


# ---------------------------------------------------------------------------------------------------------
# RL arms on the same bandit: PPO and RLOO maximise E_π[r] − β·KL(π ‖ π_ref) with the KL as a penalty in the
# reward, so they should reach the same π* as DPO — run through workbench.training.ppo's own functions.


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_ppo_reaches_the_kl_regularised_optimum(bandit, beta):
    from workbench.training.bandit import train_tabular_ppo

    start = total_variation(bandit.reference_probs, bandit.optimal_policy(beta))
    pi = train_tabular_ppo(bandit, beta, seed=1)
    tv = total_variation(pi, bandit.optimal_policy(beta))
    assert start > 0.25 and tv < 0.05, (start, tv)


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_rloo_reaches_the_kl_regularised_optimum(bandit, beta):
    from workbench.training.bandit import train_tabular_rloo

    pi = train_tabular_rloo(bandit, beta, seed=1)
    assert total_variation(pi, bandit.optimal_policy(beta)) < 0.05
    # and with another β it lands somewhere else: the test can tell β apart
    assert total_variation(train_tabular_rloo(bandit, 2 * beta, seed=1), bandit.optimal_policy(beta)) > 0.1


def test_k3_as_a_reward_penalty_misses_the_optimum(bandit):
    """k3 is an unbiased estimate of the KL's value but, used as a reward, not of its gradient: the policy gradient
    of E_π[k3] is not ∇KL, so PPO with kl_estimator="k3" settles away from π*. This is why k1 is the default."""
    from workbench.training.bandit import train_tabular_ppo

    pi = train_tabular_ppo(bandit, 0.25, seed=1, kl_estimator="k3")
    assert total_variation(pi, bandit.optimal_policy(0.25)) > 0.15


# ---------------------------------------------------------------------------------------------------------
# 7. TRL's own RLOO and GRPO trainers, as the study configures them (train.RLOOArgs / train.GRPOArgs: k = 4
# completions per prompt, temperature 0.7), on the bandit as a tabular causal LM. The loops above test our code;
# these test the estimators the study actually trains with.

TRL_BETA = 0.5
TRL_K = 4  # the study's num_generations
# 128 prompts × 4 completions per step, lr 0.2 decayed linearly to 0 (the table is tiny): what remains after these
# steps is Adam's noise (seeds 0-3 land within 0.009 of π* for RLOO and 0.022 of the GRPO variants' targets).
# GRPO's std-scaled advantages are noisier: at these settings seeds 0-3 ended 0.016-0.047 from its fixed point,
# so the study's GRPO runs 300 steps at lr 0.1 (0.008-0.019).
TRL_RUN = dict(n_prompts=128, k=TRL_K, lr=0.2)
BETA_GRID = torch.logspace(-2, 2, 400).tolist()  # "π* of any β": 0.01 … 100


def test_tabular_lm_is_pi_ref_as_trl_sees_it(bandit, tmp_path):
    """The wiring every TRL test below relies on: TRL's policy and the reference it builds from disk are π_ref, its
    fused log-prob head returns log π_ref(y|x) at the sampling temperature, its generate path samples π_ref, and
    the reward function reads r(x, y) back from the text."""
    from workbench.training.bandit_trl import (bandit_reward_func, bandit_vocabulary, small_lm_head_tiles, tabular_policy,
                                      trl_trainer)

    trainer = trl_trainer("rloo", bandit, TRL_BETA, tmp_path, steps=1, **TRL_RUN)
    temperature = trainer.args.temperature
    assert temperature == 0.7  # the study's, so the table holds 0.7·log π_ref
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    for model in (trainer.model, trainer.ref_model):
        assert torch.allclose(tabular_policy(model, bandit, temperature), bandit.reference_probs, atol=1e-6)

    vocab = bandit_vocabulary(bandit)
    n_prompts, k = bandit.rewards.shape
    x, y = torch.meshgrid(torch.arange(n_prompts), torch.arange(k), indexing="ij")
    x, y = x.flatten(), y.flatten()
    input_ids = torch.stack([x + vocab["prompt0"], y + vocab["response0"]], 1)  # (P·K, 2): prompt, response
    logps = lambda: trainer._get_per_token_logps_and_entropies(  # noqa: E731
        trainer.model, input_ids, torch.ones_like(input_ids), 1, compute_entropy=True)
    with torch.no_grad():
        wide = logps()
        with small_lm_head_tiles(len(vocab)):  # what training runs under: the same numbers, faster
            narrow = logps()
    assert torch.allclose(wide[0][:, 0], bandit.reference_probs.log()[x, y], atol=1e-5)
    assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1])

    n = 4096
    prompts = [f"prompt{p}" for p in range(n_prompts) for _ in range(n)]
    _, completion_ids, completions = trainer._generate(prompts)
    responses = torch.tensor([ids[0] for ids in completion_ids]).view(n_prompts, n) - vocab["response0"]
    frequencies = torch.nn.functional.one_hot(responses, k).float().mean(1)  # (P, K)
    assert total_variation(frequencies, bandit.reference_probs) < 0.03  # sampling error ~0.01 at n = 4096
    rewards = bandit_reward_func(bandit)(prompts, completions, completion_ids)
    assert rewards == bandit.rewards[torch.arange(n_prompts).repeat_interleave(n), responses.flatten()].tolist()


@pytest.fixture(scope="module")
def trl_rloo(bandit, tmp_path_factory):
    """TRL's RLOOTrainer trained at β = 0.5 (100 steps) and 0.25 (150: the larger log-ratios take longer)."""
    from workbench.training.bandit_trl import train_trl_rloo

    return {beta: train_trl_rloo(bandit, beta, tmp_path_factory.mktemp("rloo"), steps=steps, **TRL_RUN)
            for beta, steps in ((0.5, 100), (0.25, 150))}


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_trl_rloo_reaches_the_kl_regularised_optimum(bandit, trl_rloo, beta):
    """RLOO puts the k1 KL into the sequence reward, with no gradient through it; the score-function gradient of
    E_π[r − β·log(π/π_ref)] is ∇(E_π[r] − β·KL), and the leave-one-out baseline adds no bias, so TRL's RLOO
    should stop at π*. Each run lands near its own β's π* and far from the other's (the test can tell β apart)."""
    other = 0.25 if beta == 0.5 else 0.5
    assert total_variation(bandit.reference_probs, bandit.optimal_policy(beta)) > 0.25
    assert total_variation(trl_rloo[beta], bandit.optimal_policy(beta)) < 0.05
    assert total_variation(trl_rloo[beta], bandit.optimal_policy(other)) > 0.1


def test_grpo_fixed_point_closed_forms(bandit):
    """The numerical GRPO fixed point against what can be worked out by hand."""
    from workbench.training.bandit import grpo_expected_advantages, grpo_fixed_point

    # one group [x, b, b, b] (k = 4): mean = (x + 3b)/4, Bessel std = |x − b|/2, so A_x = −1.5 for any x < b
    two = Bandit(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]))
    almost_b = torch.tensor([[1e-12, 1 - 1e-12]], dtype=torch.float64)
    assert abs(grpo_expected_advantages(two, almost_b, 4)[0, 0].item() + 1.5 / (1 + 2e-4)) < 1e-6
    assert abs(grpo_expected_advantages(two, almost_b, 4, scale_rewards=False)[0, 0].item() + 0.75) < 1e-6
    # without std scaling a = (1 − 1/k)·(r − E_π[r]): the fixed point is π* at β·k/(k − 1), exactly
    plain, residual = grpo_fixed_point(bandit, TRL_BETA, TRL_K, scale_rewards=False)
    assert residual < 1e-12
    assert total_variation(plain, bandit.optimal_policy(TRL_BETA * TRL_K / (TRL_K - 1)).double()) < 1e-6
    # with it, the fixed point is a stationary point but not π* of any β
    scaled, residual = grpo_fixed_point(bandit, TRL_BETA, TRL_K)
    assert residual < 1e-12
    assert min(total_variation(scaled, bandit.optimal_policy(b).double()) for b in BETA_GRID) > 0.13


@pytest.fixture(scope="module")
def trl_grpo(bandit, tmp_path_factory):
    """TRL's GRPOTrainer at β = 0.5 with the study's settings (std-scaled advantages, bias-corrected k3), and with
    one setting changed at a time: {name: learned π}."""
    from workbench.training.bandit_trl import train_trl_grpo

    variants = {"study": (dict(steps=300, lr=0.1), {}),
                "scale_rewards=none": (dict(steps=100), dict(scale_rewards="none")),
                "use_bias_correction_kl=False": (dict(steps=150), dict(use_bias_correction_kl=False))}
    return {name: train_trl_grpo(bandit, TRL_BETA, tmp_path_factory.mktemp("grpo"), **{**TRL_RUN, **run}, **options)
            for name, (run, options) in variants.items()}


def test_trl_grpo_without_std_scaling_reaches_pi_star_of_a_larger_beta(bandit, trl_grpo):
    """With scale_rewards="none", E[A | y] = (1 − 1/k)·(r(y) − E_π[r]) (the group mean includes y) while the KL
    term keeps its weight β: GRPO maximises (1 − 1/k)·E_π[r] − β·KL, i.e. reaches π* at β·k/(k − 1), not at β."""
    pi = trl_grpo["scale_rewards=none"]
    assert total_variation(pi, bandit.optimal_policy(TRL_BETA * TRL_K / (TRL_K - 1))) < 0.05
    assert total_variation(pi, bandit.optimal_policy(TRL_BETA)) > 0.1


def test_trl_grpo_reaches_its_own_fixed_point_not_pi_star(bandit, trl_grpo):
    """The study's GRPO (advantages divided by the group std, KL as β·k3·ratio in the loss) stops where
    log π = log π_ref + a_π/β + const (``grpo_fixed_point``), which is not π* of any β: it improves on π_ref in
    expected reward and toward π*, but the std scaling weighs responses by rank-like advantages, not by r."""
    from workbench.training.bandit import grpo_fixed_point

    pi = trl_grpo["study"]
    target, _ = grpo_fixed_point(bandit, TRL_BETA, TRL_K)
    assert total_variation(pi, target.float()) < 0.05
    assert min(total_variation(pi, bandit.optimal_policy(b)) for b in BETA_GRID) > 0.08
    # the direction: better in expected reward and on the best response, closer to π* than π_ref was
    best = bandit.rewards.argmax(-1, keepdim=True)
    assert (expected_reward(bandit, pi) > expected_reward(bandit, bandit.reference_probs) + 0.5).all()
    assert (pi.gather(1, best) > bandit.reference_probs.gather(1, best) + 0.2).all()
    pi_star = bandit.optimal_policy(TRL_BETA)
    assert total_variation(pi, pi_star) < total_variation(bandit.reference_probs, pi_star) - 0.2


def test_trl_grpo_kl_gradient_follows_its_bias_correction_flag(bandit, trl_grpo):
    """k3 = π_ref/π − log(π_ref/π) − 1 in the loss has the gradient of the *forward* KL(π_ref ‖ π) in expectation;
    TRL multiplies it by the (value-1) ratio by default, which turns the gradient into that of the reverse
    KL(π ‖ π_ref). The two fixed points differ by TV 0.21 here, and TRL lands on the one its flag predicts."""
    from workbench.training.bandit import grpo_fixed_point

    reverse, _ = grpo_fixed_point(bandit, TRL_BETA, TRL_K, kl="reverse")
    forward, _ = grpo_fixed_point(bandit, TRL_BETA, TRL_K, kl="forward")
    assert total_variation(reverse, forward) > 0.2
    pi = trl_grpo["use_bias_correction_kl=False"]
    assert total_variation(pi, forward.float()) < 0.05
    assert total_variation(pi, reverse.float()) > 0.15


# ---------------------------------------------------------------------------------------------------------
# Iterative (online) DPO: pairs sampled from the current policy each round, labelled by the true reward's BT model


@pytest.mark.parametrize("seed", [0, 1])
def test_iterative_dpo_with_a_fixed_reference_reaches_the_kl_regularised_optimum(bandit, seed):
    """Every round's pairs come from another μ (the current policy); DPO's optimum does not depend on μ, so each
    round ends at π* ∝ π_ref·exp(r/β)."""
    from workbench.training.bandit import train_tabular_iterative_dpo

    target = bandit.optimal_policy(BETA)
    policies = train_tabular_iterative_dpo(bandit, BETA, rounds=4, seed=seed)
    assert all(total_variation(p, target) <= TV_TOL for p in policies), [total_variation(p, target) for p in policies]


def test_iterative_dpo_with_the_reference_refreshed_every_round_keeps_moving_to_the_best_response(bandit):
    """Refreshing the reference to the current policy each round compounds the tilt: after t rounds π ∝
    π_ref·exp(t·r/β), past π* and towards the reward's argmax."""
    from workbench.training.bandit import train_tabular_iterative_dpo

    best = bandit.rewards.argmax(-1)
    rows = torch.arange(len(best))
    policies = train_tabular_iterative_dpo(bandit, BETA, rounds=4, refresh_reference_every=1)
    p_best = [p[rows, best] for p in policies]
    assert all((later > earlier).all() for earlier, later in zip(p_best, p_best[1:])), p_best
    assert (p_best[-1] > 0.75).all() and (p_best[-1] > bandit.optimal_policy(BETA)[rows, best] + 0.3).all()
    assert total_variation(policies[0], bandit.optimal_policy(BETA)) <= TV_TOL  # round 1 is plain DPO from π_ref
    assert total_variation(policies[-1], bandit.optimal_policy(BETA)) > 0.25
