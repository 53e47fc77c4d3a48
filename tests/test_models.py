"""Model layer: name resolution, tokenizers, 4-bit + LoRA policies and their reference, reward models, and the
per-token log-prob primitive checked against a plain one-sequence-at-a-time computation."""

import math

import pytest
import torch

from workbench.modeling import logprobs, models
from workbench.modeling.models import ModelConfig


def _cfg(path, **kw):
    return ModelConfig(model_name_or_path=str(path), **kw)


def _one_at_a_time(model, prompt_ids, completion_ids):
    """Plain reference computation: one sequence per forward, full log-softmax, explicit indices."""
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        ids = torch.tensor([p + c])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
        # token c[j] sits at position len(p) + j and is predicted from position len(p) + j - 1
        out.append(torch.stack([logprobs[len(p) + j - 1, tok] for j, tok in enumerate(c)]))
    return out


def _perturb_lora(model, seed=1, scale=0.05):
    """Give a fresh adapter non-zero B matrices so that policy and reference differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _ragged_batch(tokenizer, hh_pairs):
    prompts, completions = [], []
    for ex in hh_pairs:
        for side in ("chosen", "rejected"):
            p, c = models.encode(tokenizer, ex["prompt"], ex[side])
            prompts.append(p)
            completions.append(c)
    assert len({len(p) + len(c) for p, c in zip(prompts, completions)}) > 3, "want ragged lengths to exercise padding"
    return prompts, completions


# ---------------------------------------------------------------------------------------------------------
# Names and configuration


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct"):
        models.resolve_model_path("embedded:gpt-17")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="requirements-embedded.txt"):
        models.resolve_model_path(models.EMBEDDED_POLICY)


def test_local_path_must_exist_and_hub_names_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "no-such-model"))
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_model_config_defaults_are_qlora_and_invalid_combinations_fail():
    cfg = ModelConfig()
    assert (cfg.load_in_4bit, cfg.use_bnb_nested_quant, cfg.bnb_4bit_quant_type, cfg.use_peft) == (True, True, "nf4", True)
    assert cfg.lora_target_modules == "all-linear"
    q = models.quantization_config(cfg)
    assert q.load_in_4bit and q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.float32  # CPU
    assert models.quantization_config(ModelConfig(load_in_4bit=False)) is None
    with pytest.raises(ValueError, match="use_peft"):
        ModelConfig(load_in_4bit=True, use_peft=False)
    with pytest.raises(ValueError, match="model_name_or_path"):
        ModelConfig(model_name_or_path="")


# ---------------------------------------------------------------------------------------------------------
# Tokenizers and templates


def test_real_tokenizer_has_own_template_and_a_pad_token(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert "<|im_start|>" in tok.chat_template  # SmolLM2's own template is kept
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    completion = models.render_completion(tok, prompt, [{"role": "assistant", "content": "Because."}])
    assert completion.startswith("Because.") and "<|im_end|>" in completion  # end-of-turn is scored with the reply


def test_hh_template_is_used_when_a_tokenizer_has_none(tiny_model_dir, tmp_path):
    tok = models.load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = models.load_tokenizer(str(tmp_path))
    assert tok.chat_template == models.HH_CHAT_TEMPLATE
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text == f"\n\nHuman: Hi\n\nAssistant: Hello{tok.eos_token}\n\nHuman: Why?\n\nAssistant:"
    assert models.render_completion(tok, prompt, [{"role": "assistant", "content": "No."}]) == f" No.{tok.eos_token}"


def test_encode_truncates_prompt_from_the_left(smollm_tokenizer, hh_pairs):
    ex = max(hh_pairs, key=lambda e: sum(len(m["content"]) for m in e["prompt"]))
    p_full, c_full = models.encode(smollm_tokenizer, ex["prompt"], ex["chosen"])
    limit = len(c_full) + 10
    p, c = models.encode(smollm_tokenizer, ex["prompt"], ex["chosen"], max_length=limit)
    assert len(p) + len(c) <= limit
    assert p == p_full[-len(p):]  # the latest turns are kept
    assert c == c_full[: len(c)]


# ---------------------------------------------------------------------------------------------------------
# The log-prob primitive


def test_completion_logps_batched_equals_one_at_a_time_unquantized(tiny_model_dir, smollm_tokenizer, hh_pairs):
    model, tok = models.load_policy(_cfg(tiny_model_dir, load_in_4bit=False))
    _perturb_lora(model)
    prompts, completions = _ragged_batch(tok, hh_pairs)
    got = logprobs.completion_logps(model, prompts, completions, pad_id=tok.pad_token_id, batch_size=3)
    model.eval()
    with torch.no_grad():
        want = _one_at_a_time(model, prompts, completions)
        with model.disable_adapter():
            want_ref = _one_at_a_time(model, prompts, completions)
    ref = logprobs.completion_logps(model, prompts, completions, pad_id=tok.pad_token_id, batch_size=5, reference=True)
    for i in range(len(prompts)):
        assert got.per_token[i].shape == (len(completions[i]),)
        torch.testing.assert_close(got.per_token[i], want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.per_token[i], want_ref[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum, torch.stack([w.sum() for w in want]), atol=1e-4, rtol=1e-5)
    assert got.n_tokens.tolist() == [len(c) for c in completions]
    assert not torch.allclose(got.sum, ref.sum), "a perturbed adapter must change the policy's scores"


def test_completion_logps_batched_equals_one_at_a_time_4bit(tiny_model_dir, smollm_tokenizer, hh_pairs):
    model, tok = models.load_policy(_cfg(tiny_model_dir))
    _perturb_lora(model)
    prompts, completions = _ragged_batch(tok, hh_pairs[:3])
    got = logprobs.completion_logps(model, prompts, completions, pad_id=tok.pad_token_id, batch_size=4)
    model.eval()
    with torch.no_grad():
        want = _one_at_a_time(model, prompts, completions)
    for g, w in zip(got.per_token, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_shared_prompt_logps_equal_one_sequence_at_a_time(tiny_model_dir, hh_pairs, quantized):
    """Each prompt computed once and continued from its KV cache for chosen and rejected gives the same numbers."""
    model, tok = models.load_policy(_cfg(tiny_model_dir, load_in_4bit=quantized))
    _perturb_lora(model, seed=5)
    prompts, pairs = [], []
    for ex in hh_pairs:
        p, cs = models.encode_many(tok, ex["prompt"], [ex["chosen"], ex["rejected"]])
        prompts.append(p)
        pairs.append(cs)
    assert len({len(p) for p in prompts}) > 3, "ragged prompts exercise the padding gap"
    got = logprobs.shared_prompt_logps(model, prompts, pairs, pad_id=tok.pad_token_id, batch_size=4)
    got_ref = logprobs.shared_prompt_logps(model, prompts, pairs, pad_id=tok.pad_token_id, batch_size=4, reference=True)
    model.eval()
    with torch.no_grad():
        want = _one_at_a_time(model, [p for p in prompts for _ in range(2)], [c for cs in pairs for c in cs])
        with model.disable_adapter():
            want_ref = _one_at_a_time(model, [p for p in prompts for _ in range(2)], [c for cs in pairs for c in cs])
    for i in range(len(prompts)):
        for side in range(2):
            torch.testing.assert_close(got[i][side], want[2 * i + side], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_ref[i][side], want_ref[2 * i + side], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0][0], got_ref[0][0])


def test_shared_prompt_logps_take_any_number_of_completions_at_a_temperature(tiny_model_dir, hh_pairs):
    """n samples of a prompt (here 1, 3 and 2) each scored from one pass over the prompt, at the sampling
    temperature, equal the full forward of each prompt + completion with its logits divided by the temperature."""
    model, tok = models.load_policy(_cfg(tiny_model_dir, load_in_4bit=False))
    _perturb_lora(model, seed=7)
    prompts = [models.encode_many(tok, ex["prompt"], [ex["chosen"]])[0] for ex in hh_pairs[:3]]
    g = torch.Generator().manual_seed(0)
    completions = [[torch.randint(5, 200, (n,), generator=g).tolist() for n in lengths]
                   for lengths in ([4], [1, 6, 3], [5, 2])]
    got = logprobs.shared_prompt_logps(model, prompts, completions, pad_id=tok.pad_token_id, batch_size=3,
                                       temperature=0.7)
    model.eval()
    with torch.no_grad():
        for p, cs, gs in zip(prompts, completions, got):
            assert len(gs) == len(cs)
            for c, lp in zip(cs, gs):
                logits = model(input_ids=torch.tensor([p + c])).logits[0].float() / 0.7
                want = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
                torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)
    at_one = logprobs.shared_prompt_logps(model, prompts, completions, pad_id=tok.pad_token_id, batch_size=3)
    assert not torch.allclose(at_one[1][1], got[1][1]), "the temperature must change the log-probs"


def test_completion_logps_rejects_bad_input(tiny_model_dir):
    model, tok = models.load_policy(_cfg(tiny_model_dir, load_in_4bit=False, use_peft=False))
    with pytest.raises(ValueError, match="reference=True"):
        logprobs.completion_logps(model, [[1, 2]], [[3]], pad_id=0, reference=True)
    with pytest.raises(ValueError, match="empty completion"):
        logprobs.completion_logps(model, [[1, 2]], [[]], pad_id=0)


# ---------------------------------------------------------------------------------------------------------
# 4-bit + LoRA policy and its reference


def test_4bit_lora_policy_trains_and_its_reference_is_the_base(tiny_model_dir, smollm_tokenizer, hh_pairs):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    policy, tok = models.load_policy(_cfg(tiny_model_dir))
    assert any(isinstance(m, Linear4bit) for m in policy.modules()), "base weights should be NF4 4-bit"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # the same base, loaded on its own with the same quantization
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=models.quantization_config(ModelConfig()),
                                                dtype=torch.float32, device_map={"": "cpu"}).eval()
    models.keep_4bit_trainable(base)  # as the workbench's loaders do: the same 4-bit layout on every CPU
    prompts, completions = _ragged_batch(tok, hh_pairs[:2])
    ids, attn, cmask = logprobs.pad_right(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=attn).logits
    quantized_before = {n: b.detach().clone() for n, b in policy.named_parameters() if "lora_" not in n}

    # --- one optimisation step on the completion tokens (maximise their likelihood)
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        lp = logprobs.token_logps(policy, ids, attn)
        loss = -(lp * cmask[:, 1:]).sum() / cmask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"3 LoRA steps should lower the NLL: {losses}"
    for n, p in policy.named_parameters():
        if n in quantized_before:
            assert torch.equal(p.detach(), quantized_before[n]), f"frozen base weight {n} changed"

    policy.eval()
    with torch.no_grad():
        with policy.disable_adapter():
            ref_logits = policy(input_ids=ids, attention_mask=attn).logits
        policy_logits = policy(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-5, rtol=1e-5)
    assert (policy_logits - base_logits).abs().max() > 1e-3, "after training, the policy differs from its reference"


def test_adapter_round_trips_through_disk(tiny_model_dir, tmp_path, hh_pairs):
    policy, tok = models.load_policy(_cfg(tiny_model_dir))
    _perturb_lora(policy, seed=3)
    prompts, completions = _ragged_batch(tok, hh_pairs[:2])
    before = logprobs.completion_logps(policy, prompts, completions, pad_id=tok.pad_token_id)
    policy.save_pretrained(tmp_path / "adapter")
    again, _ = models.load_policy(_cfg(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    after = logprobs.completion_logps(again, prompts, completions, pad_id=tok.pad_token_id)
    torch.testing.assert_close(before.sum, after.sum, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Reward models


def test_embedded_reward_backbone_gives_one_score_per_text():
    model, tok = models.load_reward_model()
    batch = tok(["I can't help with that.", "Sure, here is how to pick a lock: first..."], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    assert model.config.model_type == "bert"


def test_4bit_lora_reward_model_on_a_decoder(tiny_model_dir):
    model, tok = models.load_reward_model(_cfg(tiny_model_dir))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable), trainable
    batch = tok(["Hello there", "A much longer answer than the first one"], padding=True, return_tensors="pt")
    scores = model(**batch).logits
    assert scores.shape == (2, 1)
    scores.sum().backward()  # gradients reach the head and the adapters


# ---------------------------------------------------------------------------------------------------------
# The real embedded model (tens of seconds)


@pytest.mark.slow
def test_embedded_smollm2_is_a_real_language_model(smollm_tokenizer):
    policy, tok = models.load_policy(ModelConfig())  # the default: embedded SmolLM2, 4-bit, LoRA
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    completion = [{"role": "assistant", "content": "The capital of France is Paris."}]
    p, c = models.encode(tok, prompt, completion)
    lp = logprobs.completion_logps(policy, [p], [c], pad_id=tok.pad_token_id)
    perplexity = math.exp(-lp.sum.item() / lp.n_tokens.item())
    uniform = len(tok)  # a model that knew nothing would have perplexity = vocabulary size (49,152)
    assert perplexity < 20, f"perplexity {perplexity:.1f} on an easy answer; uniform would be {uniform}"
    # and it prefers the right answer to a wrong one
    _, wrong = models.encode(tok, prompt, [{"role": "assistant", "content": "The capital of France is Berlin."}])
    lp_wrong = logprobs.completion_logps(policy, [p], [wrong], pad_id=tok.pad_token_id)
    assert lp.sum.item() > lp_wrong.sum.item() + 2.0
