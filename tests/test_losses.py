"""Loss formulas: values computed by hand, agreement with TRL 1.16's own trainers on a tiny model (every loss type
we expose), and the errors a wrong argument gets."""

import math
import re

import pytest
import torch

from workbench.training import losses
from workbench.modeling.data import to_dataset, unpaired_view
from workbench.training.losses import PAIRED_LOSSES, PairLogps, preference_loss
from workbench.modeling.logprobs import token_logps

TOL = 1e-5  # absolute, float32
NEG_LOG_SIGMOID_1 = math.log1p(math.exp(-1))  # −log σ(1) = log(1 + e^−1) = 0.3132617


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, tol=TOL):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def _pairs(pc, pr, rc, rr, lc=None, lr=None):
    return PairLogps(t(*pc), t(*pr), t(*rc), t(*rr),
                     None if lc is None else t(*lc), None if lr is None else t(*lr))


# ---------------------------------------------------------------------------------------------------------
# Hand-computed values


def test_dpo_with_zero_logratios_is_log2_and_rewards_are_beta_logratios():
    # policy = reference: Δ = 0, −log σ(0) = log 2 for every pair; rewards β·0 = 0
    losses_, chosen_r, rejected_r = losses.dpo_loss(t(-3, -7), t(-5, -2), t(-3, -7), t(-5, -2), beta=0.1)
    assert close(losses_, [math.log(2)] * 2) and close(chosen_r, [0, 0]) and close(rejected_r, [0, 0])
    # chosen log-ratio −10 − (−11) = +1, rejected −12 − (−11) = −1: Δ = 2, β·Δ = 0.5·2 = 1
    # -> −log σ(1); rewards β·(±1) = ±0.5
    losses_, chosen_r, rejected_r = losses.dpo_loss(t(-10), t(-12), t(-11), t(-11), beta=0.5)
    assert close(losses_, [NEG_LOG_SIGMOID_1]) and close(chosen_r, [0.5]) and close(rejected_r, [-0.5])


def test_ipo_is_zero_at_its_optimum_and_normalises_by_length():
    # β = 0.5: target 1/(2β) = 1. Chosen log-ratio 2 over 2 tokens = 1/token, rejected 0 -> (1 − 0 − 1)² = 0
    p = _pairs([-8], [-9], [-10], [-9], lc=[2], lr=[4])
    assert close(preference_loss("ipo", p, beta=0.5)[0], 0.0)
    # rejected log-ratio +4 over 4 tokens = 1/token: (1 − 1 − 1)² = 1
    p = _pairs([-8], [-5], [-10], [-9], lc=[2], lr=[4])
    assert close(preference_loss("ipo", p, beta=0.5)[0], 1.0)


def test_hinge_is_zero_beyond_margin_one_over_beta():
    # β = 0.5, margin 1/β = 2. Δ = 3 -> max(0, 1 − 1.5) = 0; Δ = 1 -> 1 − 0.5 = 0.5; Δ = −2 -> 1 + 1 = 2
    losses_, _, _ = losses.hinge_loss(t(0, 0, 0), t(-3, -1, 2), t(0, 0, 0), t(0, 0, 0), beta=0.5)
    assert close(losses_, [0.0, 0.5, 2.0])


def test_robust_with_no_flips_is_dpo_and_can_go_negative():
    args = (t(-10, -4), t(-12, -3), t(-11, -4), t(-11, -5))
    assert close(losses.robust_loss(*args, beta=0.5, label_smoothing=0.0)[0], losses.dpo_loss(*args, beta=0.5)[0])
    # β·Δ = 1, ε = 0.25: ((1−ε)·(−log σ(1)) − ε·(−log σ(−1))) / (1 − 2ε)
    #   = (0.75·0.3132617 − 0.25·1.3132617) / 0.5 = (0.2349463 − 0.3283154) / 0.5 = −0.1867383
    losses_, _, _ = losses.robust_loss(t(-10), t(-12), t(-11), t(-11), beta=0.5, label_smoothing=0.25)
    assert close(losses_, [-0.1867383])


def test_losses_that_score_each_response_on_its_own():
    zero = (t(-4), t(-6), t(-4), t(-6))  # both log-ratios 0
    # bco_pair: −log σ(0) − log σ(0) = 2 log 2
    assert close(losses.bco_pair_loss(*zero, beta=0.1)[0], [2 * math.log(2)])
    # nca_pair: −log σ(0) − ½ log σ(0) − ½ log σ(0) = 2 log 2
    assert close(losses.nca_pair_loss(*zero, beta=0.1)[0], [2 * math.log(2)])
    # apo_zero: (1 − σ(0)) + σ(0) = 1;  apo_down: σ(0) + (1 − σ(0)) = 1
    assert close(losses.apo_zero_loss(*zero, beta=0.1)[0], [1.0])
    assert close(losses.apo_down_loss(*zero, beta=0.1)[0], [1.0])
    # sppo_hard at its optimum: chosen log-ratio +1/(2β) = +1, rejected −1 (β = 0.5) -> 0
    assert close(losses.sppo_hard_loss(t(-3), t(-7), t(-4), t(-6), beta=0.5)[0], [0.0])
    # ... and with both log-ratios 0: (0 − 1)² + (0 + 1)² = 2
    assert close(losses.sppo_hard_loss(*zero, beta=0.5)[0], [2.0])


def test_exo_pair_and_discopop_at_zero_margin():
    zero = (t(-4), t(-6), t(-4), t(-6))
    # EXO: p_θ = (½, ½); KL to (1−ε, ε) with ε = ½ is 0; with ε = 0.1: ½·log(0.5/0.9) + ½·log(0.5/0.1)
    assert close(losses.exo_pair_loss(*zero, beta=0.1, label_smoothing=0.5)[0], [0.0])
    assert close(losses.exo_pair_loss(*zero, beta=0.1, label_smoothing=0.1)[0],
                 [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)])  # = 0.5102
    # DiscoPOP: mix σ(0/τ) = ½ -> ½·(−log σ(0)) + ½·e^0 = ½·log 2 + ½ = 0.8465736
    assert close(losses.discopop_loss(*zero, beta=0.1)[0], [0.5 * math.log(2) + 0.5])


def test_aot_sorts_margins_across_the_batch():
    # policy margins (π_w − π_l): [1, −1] -> sorted [−1, 1]; reference margins [−2, 0] -> sorted [−2, 0]
    # differences [1, 1]; β = 1, ε = 0: −log σ(1) twice. Unsorted (pair by pair) it would be [3, −1].
    losses_, chosen_r, _ = losses.aot_loss(t(-1, -3), t(-2, -2), t(-3, -2), t(-1, -2), beta=1.0)
    assert close(losses_, [NEG_LOG_SIGMOID_1] * 2)
    assert close(chosen_r, [2.0, -1.0])  # rewards stay per pair: β·(π_w − π_ref,w)
    # aot_unpaired: chosen log-ratios [2, −1] -> [−1, 2]; rejected [−1, 0] -> [−1, 0]; differences [0, 2]
    losses_, _, _ = losses.aot_unpaired_loss(t(-1, -3), t(-2, -2), t(-3, -2), t(-1, -2), beta=1.0)
    assert close(losses_, [math.log(2), math.log1p(math.exp(-2))])


def test_sigmoid_norm_and_sft_use_completion_lengths():
    # chosen log-ratio 4 over 4 tokens = 1/token, rejected 0: β = 1 -> −log σ(1)
    p = _pairs([-20, -6], [-9, -3], [-24, -6], [-9, -3], lc=[4, 3], lr=[5, 1])
    total, per_type, _, _ = preference_loss("sigmoid_norm", p, beta=1.0)
    assert close(per_type["sigmoid_norm"], [NEG_LOG_SIGMOID_1, math.log(2)])
    # sft: −(−20 − 6) / (4 + 3) = 26/7 per token, the same number for both pairs
    assert close(preference_loss("sft", p, beta=1.0)[1]["sft"], [26 / 7, 26 / 7])


def test_combination_is_the_weighted_sum_of_means():
    p = _pairs([-10, -4], [-12, -3], [-11, -4], [-11, -5], lc=[2, 2], lr=[3, 1])
    total, per_type, chosen_r, rejected_r = preference_loss(["sigmoid", "bco_pair", "sft"], p, beta=0.5,
                                                            loss_weights=[0.8, 0.2, 1.0])
    expected = sum(w * per_type[k].mean() for k, w in [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
    assert close(total, expected)
    assert close(per_type["sft"], [14 / 4, 14 / 4])  # −(−10 − 4) / (2 + 2)
    assert close(chosen_r, [0.5, 0.0]) and close(rejected_r, [-0.5, 1.0])


def test_simpo():
    # average log-probs −1 and −2, β = 2, γ = 1: β·(−1 + 2) − γ = 1 -> −log σ(1)
    # rewards β·ā = −2, −4
    losses_, chosen_r, rejected_r = losses.simpo_loss(t(-1), t(-2), beta=2.0, simpo_gamma=1.0)
    assert close(losses_, [NEG_LOG_SIGMOID_1]) and close(chosen_r, [-2.0]) and close(rejected_r, [-4.0])


def test_orpo():
    # P_w = 0.5 -> odds 1; P_l = 0.25 -> odds 1/3; log OR = log 3; −log σ(log 3) = −log(3/4) = 0.2876821
    # loss = NLL + λ·0.2876821 = 1 + 0.1·0.2876821 = 1.0287682; rewards λ·log P = 0.1·log 0.5, 0.1·log 0.25
    losses_, chosen_r, rejected_r = losses.orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=0.1,
                                                     chosen_nll_loss=torch.tensor(1.0))
    assert close(losses_, [1.0287682])
    assert close(chosen_r, [0.1 * math.log(0.5)]) and close(rejected_r, [0.1 * math.log(0.25)])


def test_cpo():
    # summed log-probs −3, −5, β = 0.5: β·2 = 1 -> −log σ(1), plus α·NLL = 1·2.0
    losses_, _, _ = losses.cpo_loss(t(-3), t(-5), beta=0.5, chosen_nll_loss=torch.tensor(2.0), cpo_alpha=1.0)
    assert close(losses_, [NEG_LOG_SIGMOID_1 + 2.0])
    # conservative form, ε = 0.25: 0.75·0.3132617 + 0.25·1.3132617 = 0.5632617
    losses_, _, _ = losses.cpo_loss(t(-3), t(-5), beta=0.5, label_smoothing=0.25, cpo_alpha=0.0)
    assert close(losses_, [0.5632617])


def test_kto():
    # β = 1, z0 = 0.5. Desirable log-ratio 1: 1 − σ(1 − 0.5) = 1 − 0.6224593 = 0.3775407
    # undesirable log-ratio −1, weight 1.5: 1.5·(1 − σ(0.5 + 1)) = 1.5·(1 − 0.8175745) = 0.2736382
    losses_, chosen_r, rejected_r = losses.kto_loss(t(-4), t(-9), t(-5), t(-8), beta=1.0, kl=torch.tensor(0.5),
                                                    undesirable_weight=1.5)
    assert close(losses_, [0.3775407, 0.2736382]) and close(chosen_r, [1.0]) and close(rejected_r, [-1.0])
    # z0: mean of (policy − reference) over mismatched pairs, clamped at 0 and detached
    policy = t(-3, -5).requires_grad_()
    assert close(losses.kto_kl_estimate(policy, t(-4, -5)), 0.5)
    assert not losses.kto_kl_estimate(policy, t(-4, -5)).requires_grad
    assert close(losses.kto_kl_estimate(t(-5, -5), t(-4, -5)), 0.0)


def test_apo_zero_unpaired():
    # β = 1, both log-ratios 0: desirable 1 − σ(0) = ½, undesirable σ(0) = ½ (weight 2 -> 1)
    losses_, _, _ = losses.apo_zero_unpaired_loss(t(-4), t(-9), t(-4), t(-9), beta=1.0, undesirable_weight=2.0)
    assert close(losses_, [0.5, 1.0])


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", sorted(PAIRED_LOSSES))
def test_beta_must_be_positive(name):
    p = _pairs([-1], [-2], [-1], [-2], lc=[1], lr=[1])
    with pytest.raises(ValueError, match="beta"):
        preference_loss(name, p, beta=0.0, label_smoothing=0.1)


def test_beta_must_be_positive_for_unpaired_and_reference_free_losses():
    with pytest.raises(ValueError, match="beta"):
        losses.kto_loss(t(-1), t(-2), t(-1), t(-2), beta=-0.1, kl=0.0)
    with pytest.raises(ValueError, match="beta"):
        losses.orpo_loss(t(-1), t(-2), beta=0.0, chosen_nll_loss=1.0)
    with pytest.raises(ValueError, match="beta"):
        losses.simpo_loss(t(-1), t(-2), beta=float("nan"))
    with pytest.raises(ValueError, match="beta"):
        losses.cpo_loss(t(-1), t(-2), beta=0.0, cpo_alpha=0.0)


def test_unknown_loss_type_lists_the_known_ones():
    p = _pairs([-1], [-2], [-1], [-2])
    with pytest.raises(ValueError, match="kto_pair.*known: sigmoid, hinge, ipo.*sft"):
        preference_loss("kto_pair", p, beta=0.1)
    with pytest.raises(ValueError, match="unknown option.*label_smothing"):
        preference_loss("robust", p, beta=0.1, label_smothing=0.1)
    with pytest.raises(ValueError, match="2 loss_weights for 1 loss types"):
        preference_loss("sigmoid", p, beta=0.1, loss_weights=[1.0, 1.0])


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_label_smoothing_must_lie_in_zero_half(eps):
    with pytest.raises(ValueError, match=r"label_smoothing for robust must lie in \[0.0, 0.5\)"):
        losses.robust_loss(t(-1), t(-2), t(-1), t(-2), beta=0.1, label_smoothing=eps)


def test_exo_pair_needs_label_smoothing_like_trl():
    with pytest.raises(ValueError, match="label_smoothing for exo_pair"):
        losses.exo_pair_loss(t(-1), t(-2), t(-1), t(-2), beta=0.1)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="one shape"):
        losses.dpo_loss(t(-1, -2), t(-2), t(-1, -2), t(-2, -3), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        PairLogps(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        _pairs([-1, -2], [-1, -2], [-1, -2], [-1, -2], lc=[1, 2, 3], lr=[1, 2])


def test_length_normalised_losses_need_lengths():
    p = _pairs([-1], [-2], [-1], [-2])
    for name in ("ipo", "sigmoid_norm", "sft"):
        with pytest.raises(ValueError, match=f"{name} needs chosen_lengths"):
            preference_loss(name, p, beta=0.1)


def test_cpo_needs_the_nll_term_unless_alpha_is_zero():
    with pytest.raises(ValueError, match="chosen_nll_loss"):
        losses.cpo_loss(t(-1), t(-2), beta=0.1)


# ---------------------------------------------------------------------------------------------------------
# Agreement with TRL's trainers.
#
# Each trainer is built once per module on the tiny random Llama with the real SmolLM2 tokenizer and real HH
# pairs. The policy is the tiny model with noise on its weights, the reference an unperturbed copy, so the
# log-ratios are a few nats, not 0. From the first batch of TRL's own dataloader, TRL computes its loss with its
# fused LM head; we compute the sequence log-probs of the same tensors with workbench.modeling.logprobs.token_logps (a
# plain log-softmax) and feed them to our formula.


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _perturbed(model_dir, seed=2, scale=0.02):
    """The tiny model with N(0, scale²) noise on every weight matrix: a policy that differs from the reference."""
    model = _load(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def _sequence_logps(model, input_ids, attention_mask, token_mask):
    """(B,) sums of log p(x_t | x_<t) over the positions t that token_mask (B, T) marks (t ≥ 1)."""
    with torch.no_grad():
        return (token_logps(model, input_ids, attention_mask) * token_mask[:, 1:]).sum(1)


def _replay_forward(model):
    """Memoise ``model``'s forward (TRL's patched one, where TRL patched it), keyed by its inputs.

    TRL's fused LM head costs ~1 s per call on CPU. With the cache, switching loss types re-runs all of TRL's
    loss code but not the network. A replayed output equals a fresh one: the models are frozen, in eval mode,
    run under no_grad and are deterministic on CPU.
    """
    forward, cache = model.forward, {}

    def key(value):
        return (tuple(value.shape), value.numpy().tobytes()) if isinstance(value, torch.Tensor) else value

    def replay(*args, **kwargs):
        k = (tuple(key(a) for a in args), tuple((name, key(v)) for name, v in sorted(kwargs.items())))
        if k not in cache:
            cache[k] = forward(*args, **kwargs)
        return cache[k]

    model.forward = replay


def _config_kwargs(tmp_path_factory, name):
    return dict(output_dir=str(tmp_path_factory.mktemp(name)), per_device_train_batch_size=4, max_length=256,
                seed=0, use_cpu=True, bf16=False, report_to=[])


def _trl_loss_types(config_class):
    """The loss types a TRL config offers: its ``loss_type`` choices, else those its help text lists."""
    metadata = config_class.__dataclass_fields__["loss_type"].metadata
    return metadata.get("choices") or re.findall(r"`'(\w+)'`", metadata["help"])


def test_every_trl_dpo_loss_type_has_a_formula():
    from trl import DPOConfig

    assert set(_trl_loss_types(DPOConfig)) == set(PAIRED_LOSSES)


# --- DPOTrainer: every paired loss type


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, smollm_tokenizer, hh_pairs, tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    policy, reference = _perturbed(tiny_model_dir), _load(tiny_model_dir)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(**_config_kwargs(tmp_path_factory, "dpo")),
                         train_dataset=to_dataset(hh_pairs), processing_class=smollm_tokenizer)
    trainer.model.eval()  # dropout is off anyway (disable_dropout); in eval TRL files its metrics under "eval"
    batch = next(iter(trainer.get_train_dataloader()))
    # input_ids, attention_mask, completion_mask: (2B, T), the B chosen sequences first, then the B rejected
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy_chosen, policy_rejected = _sequence_logps(policy, ids, attention, completion).chunk(2)
    reference_chosen, reference_rejected = _sequence_logps(reference, ids, attention, completion).chunk(2)
    chosen_lengths, rejected_lengths = completion[:, 1:].sum(1).chunk(2)
    pairs = PairLogps(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                      chosen_lengths, rejected_lengths)
    _replay_forward(trainer.model)
    _replay_forward(trainer.ref_model)
    return trainer, batch, pairs


def _trl_dpo(trainer, batch, loss_type, beta, loss_weights=None, label_smoothing=0.0, discopop_tau=0.05):
    """TRL's loss and logged metrics for one configuration, applied the way DPOTrainer.__init__ reads DPOConfig."""
    args = trainer.args
    args.loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    args.loss_weights, args.beta = loss_weights, beta
    args.label_smoothing, args.discopop_tau = label_smoothing, discopop_tau
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(trainer.loss_types)
    trainer.beta, trainer.label_smoothing = args.beta, args.label_smoothing
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def test_the_batch_is_a_real_test(dpo_run):
    """Policy and reference differ (log-ratios of ~1 nat) and completions have different lengths."""
    _, _, p = dpo_run
    chosen = p.policy_chosen_logps - p.reference_chosen_logps
    rejected = p.policy_rejected_logps - p.reference_rejected_logps
    assert torch.cat([chosen, rejected]).abs().max() > 0.5
    assert (chosen - rejected).abs().min() > 1e-2
    assert len(set(torch.cat([p.chosen_lengths, p.rejected_lengths]).tolist())) > 4


# (loss type, beta, options): β is chosen so that β·(log-ratio) is of order 1 on this batch, away from saturation
DPO_CASES = [
    ("sigmoid", 0.5, {}),
    ("hinge", 0.5, {}),
    ("ipo", 0.1, {}),
    ("exo_pair", 0.5, {"label_smoothing": 1e-3}),
    ("nca_pair", 0.5, {}),
    ("robust", 0.5, {"label_smoothing": 0.1}),
    ("bco_pair", 0.5, {}),
    ("sppo_hard", 1.0, {}),
    ("aot", 0.5, {"label_smoothing": 0.1}),
    ("aot_unpaired", 0.5, {"label_smoothing": 0.1}),
    ("apo_zero", 0.5, {}),
    ("apo_down", 0.5, {}),
    ("discopop", 0.5, {"discopop_tau": 0.05}),
    ("sigmoid_norm", 4.0, {}),
    ("sft", 0.1, {}),
]


def test_the_cases_cover_every_loss_type():
    assert {name for name, _, _ in DPO_CASES} == set(PAIRED_LOSSES)


@pytest.mark.parametrize("loss_type, beta, options", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_paired_loss_matches_trl_dpo_trainer(dpo_run, loss_type, beta, options):
    trainer, batch, p = dpo_run
    trl_loss, metrics = _trl_dpo(trainer, batch, loss_type, beta, **options)
    total, _, chosen_rewards, rejected_rewards = preference_loss(loss_type, p, beta, **options)
    assert abs(total.item() - trl_loss) <= TOL, (loss_type, total.item(), trl_loss)
    # TRL's logged batch means of our per-pair quantities
    assert abs(metrics["rewards/chosen"] - chosen_rewards.mean().item()) <= TOL
    assert abs(metrics["rewards/rejected"] - rejected_rewards.mean().item()) <= TOL
    assert abs(metrics["rewards/margins"] - (chosen_rewards - rejected_rewards).mean().item()) <= TOL
    assert metrics["rewards/accuracies"] == (chosen_rewards > rejected_rewards).float().mean().item()
    # sequence log-probs of a few hundred nats: equal to float32 precision
    assert abs(metrics["logps/chosen"] - p.policy_chosen_logps.mean().item()) <= 1e-3
    assert abs(metrics["logps/rejected"] - p.policy_rejected_logps.mean().item()) <= 1e-3
    # the batch discriminates: a formula that mixed up chosen and rejected would be off by far more than TOL
    swapped = PairLogps(p.policy_rejected_logps, p.policy_chosen_logps, p.reference_rejected_logps,
                        p.reference_chosen_logps, p.rejected_lengths, p.chosen_lengths)
    assert abs(preference_loss(loss_type, swapped, beta, **options)[0].item() - trl_loss) > 1e-3


COMBINATIONS = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.5, {}),  # MPO, arXiv:2411.10442
    (["ipo", "robust", "discopop", "aot"], None, 0.5, {"label_smoothing": 0.2, "discopop_tau": 0.1}),
]


@pytest.mark.parametrize("loss_types, weights, beta, options", COMBINATIONS, ids=["mpo", "ipo+robust+discopop+aot"])
def test_combined_losses_match_trl_dpo_trainer(dpo_run, loss_types, weights, beta, options):
    trainer, batch, p = dpo_run
    trl_loss, _ = _trl_dpo(trainer, batch, loss_types, beta, loss_weights=weights, **options)
    total, per_type, _, _ = preference_loss(loss_types, p, beta, loss_weights=weights, **options)
    assert abs(total.item() - trl_loss) <= TOL
    assert set(per_type) == set(loss_types)


# --- KTOTrainer


@pytest.fixture(scope="module")
def kto_run(tiny_model_dir, smollm_tokenizer, hh_pairs, tmp_path_factory):
    from trl import KTOConfig, KTOTrainer

    policy, reference = _perturbed(tiny_model_dir), _load(tiny_model_dir)
    args = KTOConfig(**_config_kwargs(tmp_path_factory, "kto"), beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    # rows alternate desirable / undesirable, so a batch of 4 holds both kinds
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=to_dataset(unpaired_view(hh_pairs)), processing_class=smollm_tokenizer)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    # input_ids etc.: (B, T) prompt + own completion; KL_input_ids etc.: prompt + the previous row's completion
    logps = {}
    for name, model in (("policy", policy), ("reference", reference)):
        logps[name] = _sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        logps[name + "_kl"] = _sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                              batch["KL_completion_mask"])
    _replay_forward(trainer.model)
    _replay_forward(trainer.ref_model)
    return trainer, batch, logps


def _trl_kto(trainer, batch, loss_type):
    trainer.args.loss_type = trainer.loss_type = loss_type
    trainer.calculate_KL = loss_type != "apo_zero_unpaired"  # as KTOTrainer.__init__ decides
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _by_label(logps, batch):
    desirable = batch["label"].bool()
    assert 0 < desirable.sum() < len(desirable), "the batch should hold desirable and undesirable rows"
    return (logps["policy"][desirable], logps["policy"][~desirable],
            logps["reference"][desirable], logps["reference"][~desirable])


def test_trl_kto_loss_types_are_covered():
    from trl import KTOConfig

    assert set(_trl_loss_types(KTOConfig)) == {"kto", "apo_zero_unpaired"}


def test_kto_matches_trl_kto_trainer(kto_run):
    trainer, batch, logps = kto_run
    trl_loss, metrics = _trl_kto(trainer, batch, "kto")
    kl = losses.kto_kl_estimate(logps["policy_kl"], logps["reference_kl"])
    assert kl > 0.05, "want a positive KL estimate, so that the clamp at 0 does not hide the term"
    ours, chosen_rewards, rejected_rewards = losses.kto_loss(*_by_label(logps, batch), beta=0.5, kl=kl,
                                                             desirable_weight=1.0, undesirable_weight=1.5)
    assert abs(ours.mean().item() - trl_loss) <= TOL
    assert abs(metrics["kl"] - kl.item()) <= TOL
    assert abs(metrics["rewards/chosen"] - chosen_rewards.mean().item()) <= TOL
    assert abs(metrics["rewards/rejected"] - rejected_rewards.mean().item()) <= TOL


def test_apo_zero_unpaired_matches_trl_kto_trainer(kto_run):
    trainer, batch, logps = kto_run
    trl_loss, _ = _trl_kto(trainer, batch, "apo_zero_unpaired")
    ours, _, _ = losses.apo_zero_unpaired_loss(*_by_label(logps, batch), beta=0.5, desirable_weight=1.0,
                                               undesirable_weight=1.5)
    assert abs(ours.mean().item() - trl_loss) <= TOL


# --- ORPO and CPO / SimPO (trl.experimental): reference-free, on the policy alone


def _without_ids(pairs):
    return [{k: v for k, v in ex.items() if k != "id"} for ex in pairs]


def _completion_logps(model, batch, side):
    """(summed, average, count) of the log-probs of the completion tokens (labels != −100) of one side."""
    ids, attention, labels = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"]
    mask = (labels != -100).long()
    summed = _sequence_logps(model, ids, attention, mask)
    count = mask[:, 1:].sum(1)
    return summed, summed / count, count


@pytest.fixture(scope="module")
def orpo_run(tiny_model_dir, smollm_tokenizer, hh_pairs, tmp_path_factory):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = _perturbed(tiny_model_dir)
    args = ORPOConfig(**_config_kwargs(tmp_path_factory, "orpo"), beta=0.5, gradient_checkpointing=False,
                      remove_unused_columns=False)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=to_dataset(_without_ids(hh_pairs)),
                          processing_class=smollm_tokenizer)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def test_orpo_matches_trl_orpo_trainer(orpo_run):
    trainer, batch = orpo_run
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    policy = trainer.model
    with torch.no_grad():
        chosen_token_logps = token_logps(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    # completion tokens: labels != −100; TRL's SFT term covers the whole chosen sequence, prompt included
    completion = (batch["chosen_labels"][:, 1:] != -100).long()
    attended = batch["chosen_attention_mask"][:, 1:]
    chosen_avg = (chosen_token_logps * completion).sum(1) / completion.sum(1)
    nll = losses.token_mean_nll((chosen_token_logps * attended).sum(1), attended.sum(1))
    _, rejected_avg, _ = _completion_logps(policy, batch, "rejected")
    ours, chosen_rewards, rejected_rewards = losses.orpo_loss(chosen_avg, rejected_avg, beta=0.5, chosen_nll_loss=nll)
    assert abs(ours.mean().item() - trl_loss) <= TOL
    assert abs(metrics["nll_loss"] - nll.item()) <= TOL
    assert abs(metrics["rewards/chosen"] - chosen_rewards.mean().item()) <= TOL
    assert abs(metrics["rewards/rejected"] - rejected_rewards.mean().item()) <= TOL


@pytest.fixture(scope="module")
def cpo_run(tiny_model_dir, smollm_tokenizer, hh_pairs, tmp_path_factory):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = _perturbed(tiny_model_dir)
    # built as SimPO so that the trainer has simpo_gamma; the tests set each configuration explicitly
    args = CPOConfig(**_config_kwargs(tmp_path_factory, "cpo"), loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5,
                     beta=2.0, gradient_checkpointing=False, remove_unused_columns=False)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=to_dataset(_without_ids(hh_pairs)),
                         processing_class=smollm_tokenizer)
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    logps = {side: _completion_logps(policy, batch, side) for side in ("chosen", "rejected")}
    _replay_forward(trainer.model)
    return trainer, batch, logps


def _trl_cpo(trainer, batch, loss_type, beta, cpo_alpha, label_smoothing=0.0, simpo_gamma=0.5):
    """TRL's CPO loss for one configuration, applied the way CPOTrainer.__init__ reads CPOConfig."""
    trainer.loss_type, trainer.beta, trainer.cpo_alpha = loss_type, beta, cpo_alpha
    trainer.label_smoothing, trainer.simpo_gamma = label_smoothing, simpo_gamma
    trainer._stored_metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}


def test_simpo_matches_trl_cpo_trainer(cpo_run):
    trainer, batch, logps = cpo_run
    trl_loss, metrics = _trl_cpo(trainer, batch, "simpo", beta=2.0, cpo_alpha=0.0, simpo_gamma=0.5)
    (_, chosen_avg, _), (_, rejected_avg, _) = logps["chosen"], logps["rejected"]
    ours, chosen_rewards, rejected_rewards = losses.simpo_loss(chosen_avg, rejected_avg, beta=2.0, simpo_gamma=0.5)
    assert abs(ours.mean().item() - trl_loss) <= TOL
    assert abs(metrics["rewards/chosen"] - chosen_rewards.mean().item()) <= TOL
    assert abs(metrics["rewards/rejected"] - rejected_rewards.mean().item()) <= TOL


def test_simpo_with_nll_and_smoothing_matches_trl_cpo_trainer(cpo_run):
    trainer, batch, logps = cpo_run
    trl_loss, metrics = _trl_cpo(trainer, batch, "simpo", beta=2.0, cpo_alpha=0.5, label_smoothing=0.1, simpo_gamma=0.3)
    (chosen_sum, chosen_avg, chosen_count), (_, rejected_avg, _) = logps["chosen"], logps["rejected"]
    nll = losses.token_mean_nll(chosen_sum, chosen_count)  # CPO's NLL: chosen completion tokens only
    ours, _, _ = losses.simpo_loss(chosen_avg, rejected_avg, beta=2.0, simpo_gamma=0.3, label_smoothing=0.1,
                                   chosen_nll_loss=nll, cpo_alpha=0.5)
    assert abs(ours.mean().item() - trl_loss) <= TOL
    assert abs(metrics["nll_loss"] - nll.item()) <= TOL


def test_cpo_matches_trl_cpo_trainer(cpo_run):
    trainer, batch, logps = cpo_run
    trl_loss, metrics = _trl_cpo(trainer, batch, "sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.1)
    (chosen_sum, _, chosen_count), (rejected_sum, _, _) = logps["chosen"], logps["rejected"]
    nll = losses.token_mean_nll(chosen_sum, chosen_count)
    ours, chosen_rewards, _ = losses.cpo_loss(chosen_sum, rejected_sum, beta=0.1, label_smoothing=0.1,
                                              chosen_nll_loss=nll, cpo_alpha=1.0)
    assert abs(ours.mean().item() - trl_loss) <= TOL
    assert abs(metrics["rewards/chosen"] - chosen_rewards.mean().item()) <= 1e-4  # β·(sum of ~100 token log-probs)
