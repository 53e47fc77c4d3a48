"""The sampler (workbench/modeling/decoding.py): its samples are the model's, its log π is the policy's, a sample depends on
its own seed alone."""

import pytest
import torch

from workbench.modeling import decoding, models, sampling


def _policy(path: str, dtype: str = "float32", scale: float = 0.05):
    """A policy whose adapter moves it (B ≠ 0, drawn from a fixed generator), in eval mode."""
    model, tok = models.load_policy(models.ModelConfig(model_name_or_path=path, dtype=dtype), trainable=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _policy(str(tiny_model_dir))


@pytest.fixture(scope="module")
def embedded():
    return _policy(models.EMBEDDED_POLICY, scale=0.01)


def _greedy_equals_generate(model, tok, prompt_ids, n_new):
    got = decoding.decode(model, prompt_ids, max_new_tokens=n_new, temperature=0, seeds=list(range(len(prompt_ids))),
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for i, p in enumerate(prompt_ids):  # each prompt alone through generate: no padding, nothing shared
        out = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p):]
        ours = got.response[i][got.mask[i]].tolist()
        assert ours == out[: len(ours)].tolist(), f"prompt {i}"
        assert len(ours) == len(out) or ours[-1] == tok.eos_token_id


def test_greedy_decoding_equals_generate_on_the_tiny_model(tiny, hh_pairs):
    model, tok = tiny
    prompt_ids = sampling.encode_prompts(tok, [ex["prompt"] for ex in hh_pairs[:4]], 96)
    assert len({len(p) for p in prompt_ids}) > 1, "prompts of different lengths, so the batch is padded"
    _greedy_equals_generate(model, tok, prompt_ids, 12)


def test_greedy_decoding_equals_generate_on_the_embedded_model(embedded, hh_pairs):
    model, tok = embedded
    prompt_ids = sampling.encode_prompts(tok, [ex["prompt"] for ex in hh_pairs[:3]], 96)
    _greedy_equals_generate(model, tok, prompt_ids, 10)


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_logp_of_the_samples_is_the_training_models_in_fp32(which, request, hh_pairs):
    model, tok = request.getfixturevalue(which)
    prompts = [{"id": str(i), "prompt": ex["prompt"]} for i, ex in enumerate(hh_pairs[:3])]
    recs = sampling.sample_completions(model, tok, prompts, n_samples=2, max_new_tokens=10, max_prompt_length=96,
                                       temperature=0.7, sampler=sampling.inference_copy(model))
    prompt_ids = sampling.encode_prompts(tok, [r["prompt"] for r in recs], 96)
    with torch.no_grad():  # the 4-bit + LoRA training model scoring the same tokens in one forward
        for r, p in zip(recs, prompt_ids):
            ids = torch.tensor([p + r["completion_token_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / 0.7, -1)
            want = logp.gather(1, torch.tensor(r["completion_token_ids"])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(r["token_logps"]), want, atol=1e-4, rtol=0)


def test_logp_of_the_samples_in_bf16_within_the_stated_tolerance(hh_pairs):
    """bf16 compute rounds differently in a decoding step (one row) and in a forward over the whole sequence: the
    per-token log π differ by rounding, 0.016 nats on average on the embedded model, and their mean, which would
    bias a KL, by 2e-4 per token (docs/evaluation.md). Bounds here: 0.05 and 0.005."""
    model, tok = _policy(models.EMBEDDED_POLICY, dtype="bfloat16", scale=0.01)
    prompts = [{"id": str(i), "prompt": ex["prompt"]} for i, ex in enumerate(hh_pairs[:4])]
    recs = sampling.sample_completions(model, tok, prompts, n_samples=2, max_new_tokens=16, max_prompt_length=96,
                                       temperature=0.7, sampler=sampling.inference_copy(model))
    prompt_ids = sampling.encode_prompts(tok, [r["prompt"] for r in recs], 96)
    diffs = []
    with torch.no_grad():
        for r, p in zip(recs, prompt_ids):
            ids = torch.tensor([p + r["completion_token_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / 0.7, -1)
            diffs.append(torch.tensor(r["token_logps"]) - logp.gather(1, torch.tensor(r["completion_token_ids"])[:, None])[:, 0])
    d = torch.cat(diffs)
    assert d.abs().mean() < 0.05 and abs(d.mean()) < 0.005, (d.abs().mean(), d.mean())


def test_a_sample_depends_on_its_seed_not_on_its_batch(tiny, hh_pairs):
    model, tok = tiny
    prompts = [{"id": str(i), "prompt": ex["prompt"]} for i, ex in enumerate(hh_pairs[:5])]
    kw = dict(n_samples=3, max_new_tokens=8, max_prompt_length=96, temperature=1.0, seed=7, logprobs=False)
    one = sampling.sample_completions(model, tok, prompts, batch_size=3, **kw)
    all_ = sampling.sample_completions(model, tok, prompts, batch_size=64, **kw)
    assert [r["completion_token_ids"] for r in one] == [r["completion_token_ids"] for r in all_]
    # and the prompt's later samples, drawn alone, are the same as in the batch
    alone = sampling.sample_completions(model, tok, prompts[2:3], batch_size=64, **{**kw, "seed": 7 + 2 * 3})
    assert [r["completion_token_ids"] for r in alone] == [r["completion_token_ids"] for r in one[6:9]]
    assert len({tuple(r["completion_token_ids"]) for r in one}) > 1, "different seeds draw different samples"


def test_the_gumbel_draw_follows_the_distribution():
    logp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0]), -1)
    n = 20000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    got = decoding.draw(logp.expand(n, -1), gens)
    freq = torch.bincount(got, minlength=5).float() / n
    p = logp.exp()
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)
    again = decoding.draw(logp.expand(3, -1), [torch.Generator().manual_seed(s) for s in range(3)])
    assert again.tolist() == got[:3].tolist(), "a row's draw is its generator's alone"


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = decoding._nucleus(p.log(), 0.8)
    assert torch.isinf(kept).tolist() == [[True, False, True, False]]
    assert torch.equal(kept[~torch.isinf(kept)], p.log()[~torch.isinf(kept)])
    assert not torch.isinf(decoding._nucleus(p.log(), 1.0)).any()
    assert torch.isinf(decoding._nucleus(p.log(), 0.3)).sum() == 3  # the most likely token alone


def test_decode_refuses_a_wrong_number_of_seeds(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="one seed per sample"):
        decoding.decode(model, [[1, 2, 3]], n_samples=2, max_new_tokens=2, temperature=1.0, seeds=[0],
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)


def test_generate_shares_a_prompt_among_its_samples_and_draws_what_repeated_prompts_draw(tiny, hh_pairs):
    """``generate(n_samples=k)`` (one prefill per prompt: online DPO's k samples) gives the rows, in the same
    order and from the same seeds, that the prompts repeated k times give."""
    model, tok = tiny
    prompt_ids = sampling.encode_prompts(tok, [ex["prompt"] for ex in hh_pairs[:3]], 96)
    shared = sampling.generate(model, tok, prompt_ids, 6, 1.0, generator_seed=11, n_samples=4)
    repeated = sampling.generate(model, tok, [p for p in prompt_ids for _ in range(4)], 6, 1.0, generator_seed=11)
    assert shared[0].shape == (12, shared[0].shape[1])
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in shared[0]}) > 3  # the samples of a prompt differ
