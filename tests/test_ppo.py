"""Our PPO: the pure pieces against hand values and plain loops, the LM plumbing against transformers' own
generation, and a few iterations on a tiny 4-bit model (reward rises, the run folder is complete)."""

import json
import math

import pytest
import torch

from workbench.modeling import data, logprobs, models, rewards, sampling, sources
from workbench.training import ppo, train
from workbench.modeling.runs import load_run


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def _plain_gae(rewards, values, length, gamma, lam):
    """GAE for one response of ``length`` tokens, written as the textbook sum Σ_k (γλ)^k δ_{t+k}."""
    deltas = []
    for t in range(length):
        next_v = values[t + 1] if t + 1 < length else 0.0
        deltas.append(rewards[t] + gamma * next_v - values[t])
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]


def test_gae_matches_the_textbook_sum_on_ragged_responses():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    lengths = [7, 1, 4, 6, 2]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    rewards_t = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)  # garbage beyond each length: must be ignored
    adv, ret = ppo.gae(rewards_t, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        expected = _plain_gae(rewards_t[b].tolist(), values[b].tolist(), n, 0.9, 0.8)
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert adv[b, n:].abs().max().item() == 0 if n < T else True
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b, :n].tolist())], abs=1e-5)


def test_gae_with_lambda_one_and_zero_values_is_reward_to_go():
    mask = torch.ones(1, 4, dtype=torch.bool)
    r = torch.tensor([[0.0, -0.1, 0.2, 1.0]])
    adv, _ = ppo.gae(r, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([1.1, 1.1, 1.2, 1.0])


def test_clipped_policy_loss_against_hand_values():
    # ratios 1.5, 0.5, 1.1, 0.7 with advantages +1, +1, −1, −1, ε = 0.2:
    #   A>0, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)   A>0, ρ=0.5: max(−0.5, −0.8) = −0.5 (not clipped)
    #   A<0, ρ=1.1: max(1.1, 1.1) = 1.1                A<0, ρ=0.7: max(0.7, 0.8) = 0.8 (clipped)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = ppo.policy_loss(ratio.log(), torch.zeros(1, 4), adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert stats["policy/clipfrac"] == pytest.approx(0.5)
    assert stats["policy/approxkl"] == pytest.approx(0.5 * (ratio.log() ** 2).mean().item())
    # a masked token changes nothing
    loss2, _ = ppo.policy_loss(torch.cat([ratio.log(), torch.tensor([[9.0]])], 1), torch.zeros(1, 5),
                               torch.cat([adv, torch.tensor([[5.0]])], 1), torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool), 0.2)
    assert loss2.item() == pytest.approx(loss.item())


def test_clipped_value_loss_against_hand_values():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    # token 0: unclipped (1−2)² = 1, clipped (0.2−2)² = 3.24 -> 3.24; token 1: 0.01 vs 0.01 -> 0.01
    loss, stats = ppo.value_loss(new, old, ret, torch.ones(1, 2, dtype=torch.bool), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert stats["val/clipfrac"] == pytest.approx(0.5)


def test_per_token_rewards_sum_to_score_minus_beta_kl():
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 1])[:, None]
    kl = torch.randn(3, 6, generator=g) * mask
    scores = torch.tensor([1.0, -2.0, 0.5])
    r = ppo.per_token_rewards(scores, kl, mask, kl_coef=0.1)
    assert r.sum(1).tolist() == pytest.approx((scores - 0.1 * kl.sum(1)).tolist(), abs=1e-6)
    assert r[1, 2].item() == pytest.approx(-2.0 - 0.1 * kl[1, 2].item())  # the score sits on the last real token
    assert (r[~mask] == 0).all()


def test_kl_estimators_are_unbiased_and_k3_is_nonnegative():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[y], q.log()[y]
    k1, k3 = ppo.kl_per_token(lp, lq, "k1"), ppo.kl_per_token(lp, lq, "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_whiten_and_critic_free_advantages():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    w = ppo.whiten(x, mask)
    assert ppo.masked_mean(w, mask).item() == pytest.approx(0, abs=1e-6)
    assert ppo.masked_mean(w**2, mask).item() == pytest.approx(1, abs=1e-4)
    assert w[0, 2] == 0
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert ppo.rloo_advantages(r).tolist() == [[1 - 4.0, 2 - 3.5, 6 - 1.5]]


def test_explained_variance_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])  # the masked-out 9 must not count
    assert ppo.explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0, abs=1e-6)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    v = torch.tensor([1.5, 1.5, 3.5, 3.5, 5.0])  # Var(r) = 2, Var(r − v) = 0.2 over the five real tokens
    assert ppo.explained_variance(torch.cat([v[:2], torch.zeros(1), v[2:]]).view(2, 3),
                                  torch.cat([r[:2], torch.zeros(1), r[2:]]).view(2, 3), mask) == pytest.approx(0.9)
    assert math.isnan(ppo.explained_variance(torch.zeros(2, 3), torch.ones(2, 3), mask))  # returns all equal


def test_adaptive_kl_controller_follows_ziegler():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(kl=12.0, n_samples=10)  # error clipped to +0.2: β·(1 + 0.2·10/100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(kl=5.4, n_samples=10)  # error −0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = ppo.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_cut_after_eos_keeps_the_eos_and_masks_the_rest():
    resp = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    out, mask, ended = sampling.cut_after_eos(resp, eos_id=2, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.PPOArgs(kl_estimator="k2")
    with pytest.raises(ValueError, match="divisible"):
        ppo.PPOArgs(rollout_batch_size=6, num_minibatches=4)
    with pytest.raises(ValueError, match="reward"):
        train.train("ppo", ppo.PPOArgs())


# ---------------------------------------------------------------------------------------------------------
# The language model


@pytest.fixture(scope="module")
def peaked_tiny_dir(tmp_path_factory, smollm_tokenizer):
    """A tiny random Llama whose next-token distribution is peaked (logit std ≈ 2.5) so RL can move it."""
    return models.save_tiny_causal_lm(smollm_tokenizer, tmp_path_factory.mktemp("tiny-peaked"), seed=0, init_std=0.3)


@pytest.fixture(scope="module")
def actor_critic(peaked_tiny_dir):
    return ppo.load_actor_critic(ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=str(peaked_tiny_dir))))


def _prompts(hh_pairs, tokenizer, n=4):
    return sampling.encode_prompts(tokenizer, [ex["prompt"] for ex in hh_pairs[:n]], 64)


def test_response_logprobs_equal_the_sampling_distribution(actor_critic, hh_pairs):
    model, _, tok = actor_critic
    prompt_ids = _prompts(hh_pairs, tok)
    P = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), P), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                         max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id, output_logits=True,
                         return_dict_in_generate=True)
    resp = out.sequences[:, P:]
    sampled = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1).gather(-1, resp[..., None]).squeeze(-1)
    mask = torch.ones_like(resp, dtype=torch.bool)
    with torch.no_grad():
        ours, entropy = logprobs.response_logprobs(model, prompt_ids, resp, mask, tok.pad_token_id, 0.7)
    assert torch.allclose(ours, sampled, atol=1e-4)
    assert (entropy > 0).all()


def test_an_update_moves_logprobs_with_the_sign_of_the_advantage(actor_critic, hh_pairs):
    model, value_head, tok = actor_critic
    prompt_ids = _prompts(hh_pairs, tok)
    resp, mask, _ = sampling.generate(model, tok, prompt_ids, 5, 0.7, generator_seed=0)
    ac = ppo._LMActorCritic(model, value_head, prompt_ids, resp, mask, tok.pad_token_id, 0.7)
    with torch.no_grad():
        before, _ = ac.logprobs(torch.arange(4))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * mask
    cfg = ppo.PPOArgs(ppo_epochs=2, rollout_batch_size=4)
    params = ppo._trainable(model, value_head)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".value." in n}
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = ppo.Batch(mask, before, torch.zeros_like(before), adv, torch.ones_like(before) * mask)
    ppo.ppo_update(ac, batch, opt, cfg, params, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after, _ = ac.logprobs(torch.arange(4))
    change = ((after - before) * mask).sum(1)
    assert (change[[0, 2]] > 0).all() and (change[[1, 3]] < 0).all(), change
    # the critic learned too (its own adapter moved), and the value head moved toward the returns
    assert any(not torch.equal(lora_before[n], p) for n, p in model.named_parameters() if ".value." in n)
    assert value_head.bias.item() > 0


def test_the_rollout_forward_as_the_first_epoch_gives_the_update_of_a_second_forward(actor_critic, hh_pairs):
    """With one minibatch, ``PPOTrainer.train`` keeps the graph of its θ_old scoring pass and ``ppo_update`` takes the
    first epoch's loss over it (``first_pass``) instead of forwarding the same rows again: the parameters after two
    epochs and the metrics equal those of the update that forwards again."""
    model, value_head, tok = actor_critic
    prompt_ids = _prompts(hh_pairs, tok)
    resp, mask, _ = sampling.generate(model, tok, prompt_ids, 5, 0.7, generator_seed=1)
    ac = ppo._LMActorCritic(model, value_head, prompt_ids, resp, mask, tok.pad_token_id, 0.7)
    cfg = ppo.PPOArgs(ppo_epochs=2, num_minibatches=1, rollout_batch_size=4)
    params = ppo._trainable(model, value_head)
    start = [p.detach().clone() for p in params]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * mask
    after, metrics, forwards = [], [], []
    forward = ac.logprobs
    ac.logprobs = lambda idx: (forwards.append(len(idx)), forward(idx))[1]  # counts the policy's forwards
    for fused in (False, True):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        with torch.set_grad_enabled(fused):
            lp, ent = ac.logprobs(torch.arange(4))
            with ac.critic():
                v = ac.values(torch.arange(4))
        for p in params:
            p.requires_grad_(True)
        batch = ppo.Batch(mask, lp.detach(), v.detach(), adv, (v.detach() + 1.0) * mask)
        opt = torch.optim.Adam(params, lr=1e-3)
        metrics.append(ppo.ppo_update(ac, batch, opt, cfg, params, torch.Generator().manual_seed(0),
                                      (lp, ent, v) if fused else None))
        after.append([p.detach().clone() for p in params])
    assert forwards == [4, 4, 4, 4, 4]  # a forward before each update; then two epochs, then one (the first is reused)
    assert any(not torch.equal(a, b) for a, b in zip(after[0], start))  # the update moved the parameters
    for a, b in zip(*after):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)
    with pytest.raises(ValueError, match="one minibatch"):
        ppo.ppo_update(ac, batch, opt, ppo.PPOArgs(num_minibatches=2, rollout_batch_size=4), params,
                       torch.Generator().manual_seed(0), (lp, ent, v))


@pytest.fixture(scope="module")
def token_half(peaked_tiny_dir):
    """Half the vocabulary: the tokens whose embedding points along a fixed random direction u."""
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(peaked_tiny_dir).get_input_embeddings().weight.detach()
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    return (emb @ u > 0).nonzero().squeeze(1)


def _expected_first_token_reward(model, tok, prompt_ids, token_set, temperature):
    """Exact E_π[reward] of a one-token response: Σ_{t ∈ set} π(t | prompt) at the sampling temperature, averaged."""
    _, head = logprobs._backbone_and_head(model)
    probs = []
    with torch.no_grad():
        for p in prompt_ids:
            h = logprobs.response_hidden(model, [p], torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                                    tok.pad_token_id)
            probs.append(torch.softmax(head(h[0, 0]).float() / temperature, -1)[token_set].sum())
    return torch.stack(probs).mean().item()


def test_ppo_raises_an_easy_reward_on_a_tiny_4bit_model(peaked_tiny_dir, hh_dir, token_half, tmp_path):
    """Reward = the response token lies in a fixed half of the vocabulary; responses are one token, so the policy's
    expected reward is computed exactly (no sampling noise) before and after 10 iterations."""
    cfg = ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=str(peaked_tiny_dir)), iterations=10,
                      rollout_batch_size=32, max_new_tokens=1, learning_rate=3e-3, kl_coef=0.0, max_prompt_length=64,
                      data=data.DataConfig(split="test", source=str(hh_dir), n_train=16, n_score=4, max_length=256),
                      runs_dir=str(tmp_path), score_batch_size=4)
    reward = rewards.TokenSetReward(token_half.tolist())
    model, _, tok = ppo.load_actor_critic(cfg)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.__class__.__name__ == "Params4bit"
    train_rows, _, _, _ = sources.load_for_run(cfg.data, cfg.seed, tok)
    prompt_ids = sampling.encode_prompts(tok, [r["prompt"] for r in data.prompt_view(train_rows)], 64)
    before = _expected_first_token_reward(model, tok, prompt_ids, token_half, cfg.temperature)

    path = train.train("ppo", cfg, reward_fn=reward)
    trained, _ = models.load_policy(cfg.model, adapter=str(path / "adapter"), trainable=False)
    after = _expected_first_token_reward(trained, tok, prompt_ids, token_half, cfg.temperature)
    assert after > before + 0.2, (before, after)

    run = load_run(path)
    assert run.metrics["objective/kl"].iloc[0] == pytest.approx(0, abs=1e-5)  # π = π_ref before the first update
    assert run.metrics["objective/kl"].apply(math.isfinite).all()
    for name in ("objective/scores", "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac", "loss/policy",
                 "loss/value", "val/clipfrac", "policy/entropy", "time/generation_s", "tokens/generated_per_s",
                 "policy/approxkl_k1", "policy/approxkl_k3", "val/explained_variance"):
        assert name in run.metrics, name
    # the critic starts at V = 0: it explains none of the first rollout's returns, and learns from there
    assert run.metrics["val/explained_variance"].iloc[0] == pytest.approx(0, abs=1e-6)
    assert (run.metrics["policy/approxkl_k3"] >= 0).all()  # k3 = (r − 1) − log r ≥ 0
    assert (path / "critic" / "value_head.pt").exists() and (path / "adapter" / "adapter_config.json").exists()
    assert len(run.records("rollouts")) == 10 * 32
    assert {"eval/objective/scores", "eval/objective/kl", "eval/rewards/accuracies"} <= set(run.summary)


def test_ppo_records_add_up_on_multi_token_responses(peaked_tiny_dir, hh_dir, token_half, tmp_path):
    cfg = ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=str(peaked_tiny_dir)), iterations=2,
                      rollout_batch_size=4, num_minibatches=2, max_new_tokens=6, learning_rate=1e-3, kl_coef=0.2,
                      kl_estimator="k1", missing_eos_penalty=0.5, max_prompt_length=64,
                      data=data.DataConfig(split="test", source=str(hh_dir), n_train=8, n_score=3, max_length=256),
                      runs_dir=str(tmp_path))
    path = train.train("ppo", cfg, reward_fn=rewards.TokenSetReward(token_half.tolist()))
    run = load_run(path)
    samples = run.records("rollouts")
    for _, s in samples.iterrows():
        assert len(s["token_kl"]) == len(s["completion_token_ids"]) == s["response_tokens"] >= 1
        assert sum(s["token_kl"]) == pytest.approx(s["kl"], abs=1e-5)
        assert [a - b for a, b in zip(s["token_logps"], s["reference_token_logps"])] == pytest.approx(s["token_kl"], abs=1e-5)
        penalty = 0.0 if s["ended"] else 0.5
        assert s["rlhf_reward"] == pytest.approx(s["score"] - penalty - 0.2 * s["kl"], abs=1e-5)
    # iteration 0 sampled from π = π_ref: every per-token log-ratio is 0
    first = samples[samples["iteration"] == 0]
    assert max(abs(k) for ks in first["token_kl"] for k in ks) < 1e-5
    assert len(run.records("heldout_rollouts")) == 3
    assert json.loads((path / "config.json").read_text())["kl_coef"] == 0.2
