"""The exact inference copy (workbench/modeling/inference.py): one copy is the policy and its reference, as the 4-bit + LoRA
model is under each adapter, and the reference's log-probs of the samples read through it are the training model's."""

import pytest
import torch

from workbench.modeling import inference, models, sampling
from workbench.modeling.logprobs import reference_adapter


def _two_adapters(path: str):
    """A policy with a "default" and a "ref" adapter, both moved off zero (as an SFT-started arm's are), eval mode."""
    model, tok = models.load_policy(models.ModelConfig(model_name_or_path=path, dtype="float32"), trainable=False)
    model.add_adapter("ref", model.peft_config["default"])
    model.set_adapter("default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny2(tiny_model_dir):
    return _two_adapters(str(tiny_model_dir))


def test_the_copy_holds_every_adapter_and_switches_as_the_model_does(tiny2):
    model, tok = tiny2
    copy = inference.inference_copy(model)
    assert copy.inference_adapters == ("default", "ref") and copy.active_adapter_name == "default"
    x = torch.tensor([tok.encode("Is it safe to swim after eating?")])
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=0)
        with reference_adapter(copy), reference_adapter(model):
            assert copy.active_adapter_name == "ref"
            torch.testing.assert_close(copy(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=0)
        assert copy.active_adapter_name == "default", "the context restores the adapter"
        with inference.use_adapter(copy, None), model.disable_adapter():
            torch.testing.assert_close(copy(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=0)
        policy, ref = copy(input_ids=x).logits, None
        with inference.use_adapter(copy, "ref"):
            ref = copy(input_ids=x).logits
        assert (policy - ref).abs().max() > 1e-3, "the two adapters compute different functions"
    with pytest.raises(ValueError, match="not 'other'"):
        with inference.use_adapter(copy, "other"):
            pass
    with pytest.raises(ValueError, match="not 'other'"):
        inference.inference_copy(model, adapter="other")


def test_the_reference_logps_read_through_the_copy_are_the_training_models(tiny2, hh_pairs):
    model, tok = tiny2
    prompts = [{"id": str(i), "prompt": ex["prompt"]} for i, ex in enumerate(hh_pairs[:3])]
    copy = inference.inference_copy(model)
    recs = sampling.sample_completions(model, tok, prompts, n_samples=2, max_new_tokens=10, max_prompt_length=96,
                                       temperature=0.7, sampler=copy)
    fallback = sampling.sample_completions(model, tok, prompts, n_samples=2, max_new_tokens=10, max_prompt_length=96,
                                           temperature=0.7, sampler=inference.inference_copy(model, dtype=torch.float32))
    prompt_ids = sampling.encode_prompts(tok, [r["prompt"] for r in recs], 96)
    with torch.no_grad(), reference_adapter(model):  # the 4-bit + LoRA model under its reference adapter, one forward
        for r, p in zip(recs, prompt_ids):
            ids = torch.tensor([p + r["completion_token_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / 0.7, -1)
            want = logp.gather(1, torch.tensor(r["completion_token_ids"])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(r["reference_token_logps"]), want, atol=1e-4, rtol=0)
    assert any(abs(r["kl"]) > 1e-3 for r in recs), "policy and reference differ, so the KL is not trivially 0"
    # a merged copy holds one adapter: the reference is then read through the training model, as before
    assert not inference.is_copy(inference.inference_copy(model, dtype=torch.float32))
    for a, b in zip(recs, fallback):
        if a["completion_token_ids"] == b["completion_token_ids"]:
            torch.testing.assert_close(torch.tensor(a["reference_token_logps"]),
                                       torch.tensor(b["reference_token_logps"]), atol=1e-4, rtol=0)


def test_the_copy_leaves_no_weight_uninitialised(tiny2):
    """Its weights are allocated without initialisation (faster); every one must then be loaded from the policy."""
    model, _ = tiny2
    copy = inference.inference_copy(model)
    src = dict(model.get_base_model().named_parameters())
    for name, p in copy.named_parameters():
        if "lora_" in name or not any(k in name for k in ("norm", "embed")):
            continue
        torch.testing.assert_close(p, src[name].float(), atol=0, rtol=0)
    assert not [m for m in copy.modules() if type(m).__module__.startswith(("peft", "bitsandbytes"))]


def test_for_sampling_copies_a_4bit_policy_with_the_adapter_it_has_active(tiny2, tiny_model_dir):
    model, tok = tiny2
    x = torch.tensor([tok.encode("What is a good name for a cat?")])
    with torch.no_grad():
        for active in ("ref", "default"):
            model.set_adapter(active)
            copy = inference.for_sampling(model)
            assert inference.is_copy(copy) and copy.active_adapter_name == active
            torch.testing.assert_close(copy(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4, rtol=0)
        with model.disable_adapter():
            assert inference.for_sampling(model).active_adapter_name is None
    plain, _ = models.load_policy(models.ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False,
                                                     dtype="float32"), trainable=False)
    assert inference.for_sampling(plain) is plain, "nothing to dequantize: the model samples itself"
