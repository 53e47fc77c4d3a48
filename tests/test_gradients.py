"""Gradients of a 4-bit model survive being evaluated: after ``generate`` and a no-grad scoring pass, every
trainable tensor (the policy's adapter, PPO's critic adapter and its value head) gets the gradient a
never-evaluated copy gets, the forward log-probs are unchanged, and a short PPO run moves every LoRA tensor.

The bug these guard against: on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` for inference
the first time it runs in eval mode on a no-grad input, and afterwards passes no gradient to its input
(``models.keep_4bit_trainable``). The tests run on every CPU; on one without AVX512-BF16 the repack never
happens, and the structural test (every 4-bit layer has the repack gate off) still checks the fix is in place.
"""

import pytest
import torch

from workbench.modeling import data, decoding, models, rewards, sampling, scoring
from workbench.training import ppo, train


def _bnb_cpu_repack_possible() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.fixture(scope="module")
def peaked_tiny_dir(tmp_path_factory, smollm_tokenizer):
    return models.save_tiny_causal_lm(smollm_tokenizer, tmp_path_factory.mktemp("tiny-grad"), seed=0, init_std=0.3)


def _actor_critic(model_dir):
    """PPO's model (policy "default", critic "value" + value head on one 4-bit base) with every LoRA B and the
    value head set to fixed non-zero values, so that every trainable tensor has a non-zero gradient."""
    model, value_head, tok = ppo.load_actor_critic(ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=str(model_dir))))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".default." in name or ".value." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.2))
        for p in value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, value_head, tok


def _sampled_batch(hh_pairs, tok):
    prompt_ids = sampling.encode_prompts(tok, [ex["prompt"] for ex in hh_pairs[:3]], 48)
    g = torch.Generator().manual_seed(2)
    response = torch.randint(0, len(tok), (3, 6), generator=g)
    mask = torch.ones_like(response, dtype=torch.bool)
    return prompt_ids, response, mask


def _gradients(model, value_head, tok, batch):
    """Log-probs of a fixed batch and the gradient of a policy + value loss, as one PPO minibatch computes them."""
    prompt_ids, response, mask = batch
    params = ppo._trainable(model, value_head)
    for p in params:
        p.grad = None
    ac = ppo._LMActorCritic(model, value_head, prompt_ids, response, mask, tok.pad_token_id, 0.7)
    idx = torch.arange(len(prompt_ids))
    logprobs, _ = ac.logprobs(idx)
    (-(logprobs * mask).sum()).backward()
    with ac.critic():
        values = ac.values(idx)
        ((values - 1) ** 2 * mask).sum().backward()
    names = [n for n, p in model.named_parameters() if ".default." in n or ".value." in n] + ["value_head.weight", "value_head.bias"]
    return logprobs.detach(), dict(zip(names, [p.grad.clone() for p in params], strict=True))


def test_every_4bit_layer_keeps_its_trainable_layout(tiny_model_dir):
    """The fix, checked on any CPU: bitsandbytes' CPU inference repack is switched off on every 4-bit layer that the
    workbench loads, policy and reward model alike."""
    import bitsandbytes as bnb

    policy, _ = models.load_policy(models.ModelConfig(model_name_or_path=str(tiny_model_dir)))
    rm, _ = models.load_reward_model(models.ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=True,
                                                        use_peft=True))
    for model in (policy, rm):
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 14  # 2 layers × (q, k, v, o, gate, up, down)
        assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_gradients_after_generate_and_scoring_equal_a_never_evaluated_copy(peaked_tiny_dir, hh_pairs):
    import bitsandbytes as bnb

    fresh, fresh_head, tok = _actor_critic(peaked_tiny_dir)
    used, used_head, _ = _actor_critic(peaked_tiny_dir)
    batch = _sampled_batch(hh_pairs, tok)
    logps_before, _ = _gradients(used, used_head, tok, batch)

    # --- what PPO's rollout and every held-out look do to the model: eval mode, no-grad inputs
    sampling.generate(used, tok, batch[0], 4, 0.7, generator_seed=0)
    scoring.score_pairs(used, tok, hh_pairs[:2], beta=0.1, max_length=128)
    ac = ppo._LMActorCritic(used, used_head, *batch, tok.pad_token_id, 0.7)
    with torch.no_grad(), ac.critic():
        ac.values(torch.arange(3))

    logps_fresh, grads_fresh = _gradients(fresh, fresh_head, tok, batch)
    logps_used, grads_used = _gradients(used, used_head, tok, batch)
    assert torch.equal(logps_used, logps_before)  # the eval pass changed nothing the model computes
    assert torch.allclose(logps_used, logps_fresh, atol=1e-6)
    assert len(grads_fresh) == 2 * 28 + 2  # policy and critic: 2 layers × 7 linear × (A, B); the head's W and b
    for name, g in grads_fresh.items():
        assert g.abs().sum() > 0, f"{name} gets no gradient even on a never-evaluated model"
        assert torch.allclose(grads_used[name], g, rtol=1e-4, atol=1e-7), (
            f"{name}: gradient after evaluation differs from a never-evaluated copy by "
            f"{(grads_used[name] - g).abs().max().item():.3g}")
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in used.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_ppo_of_two_iterations_moves_every_lora_tensor_of_the_policy(peaked_tiny_dir, hh_dir, tmp_path, monkeypatch):
    """One update per iteration, so two updates in all, each after a rollout: the first moves every lora_B (lora_A
    gets no gradient while its B is 0), the second every lora_A. Were the base layers to pass no gradient after
    the rollout, the first update would reach only the layers nearest the output and some lora_A would never move
    (with many Adam steps even a trickle of gradient moves every tensor, so more updates would hide it)."""
    held = {}

    def recording(cfg):  # PPO's own loader, keeping a handle on the model and its starting adapter
        model, value_head, tok = load(cfg)
        held["model"] = model
        held["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
        return model, value_head, tok

    load = ppo.load_actor_critic
    monkeypatch.setattr(ppo, "load_actor_critic", recording)
    cfg = ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=str(peaked_tiny_dir)), iterations=2,
                      rollout_batch_size=4, ppo_epochs=1, num_minibatches=1, max_new_tokens=4, learning_rate=1e-3,
                      max_prompt_length=48, runs_dir=str(tmp_path),
                      data=data.DataConfig(split="test", source=str(hh_dir), n_train=8, n_score=2, max_length=192))
    train.train("ppo", cfg, reward_fn=rewards.TokenSetReward(list(range(0, 49152, 2))))
    start = held["start"]
    after = {n: p.detach() for n, p in held["model"].named_parameters() if n in start}
    assert len(start) == 28
    unmoved = [n for n in start if torch.equal(start[n], after[n])]
    assert not unmoved, f"{len(unmoved)} of 28 LoRA tensors never changed: {unmoved[:4]} ..."


def test_the_repack_would_break_gradients_on_this_cpu(peaked_tiny_dir, hh_pairs):
    """The control: with bitsandbytes' repack switched back on, this CPU loses gradients (and the autograd warning is an
    error). Runs only where bitsandbytes can repack (AVX512-BF16); elsewhere the bug cannot happen at all."""
    import bitsandbytes as bnb

    if not _bnb_cpu_repack_possible():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, so there is no bug to reproduce")
    model, value_head, tok = _actor_critic(peaked_tiny_dir)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    batch = _sampled_batch(hh_pairs, tok)
    # sampling from the 4-bit model itself (generate samples from its inference copy on a CPU, which never repacks)
    decoding.decode(model, batch[0], max_new_tokens=2, temperature=0.7, seeds=list(range(len(batch[0]))),
                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with pytest.raises(Exception, match="autograd kernel was not registered"):
        _gradients(model, value_head, tok, batch)
