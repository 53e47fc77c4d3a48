"""Sampling: prompts in, completions out, each with its reward and per-token log π and log π_ref.

Used by PPO's rollouts, by every RL arm's held-out look at the end of training (``heldout_look``) and by the
evaluation (``evaluate.py``), the gold-labelled dataset (``gold_pairs.py``); every one of them draws through
``decoding.decode``. A response is cut after its first EOS (kept, so a policy learns to stop) and the tokens after it
are masked.

Log-probs of samples are taken at the sampling temperature for policy and reference alike, so the KL (``kl``) is the
one between the distributions that were sampled. Beside it ``kl_t1``: the same samples' Σ_t log π − log π_ref at
T = 1, the models' own distributions, whose KL DPO's β constrains (an unbiased estimate of it only when sampling at
T = 1; at T < 1 it is the untempered log-ratio averaged over tempered samples). With top_p < 1 the log-probs are
those of the untruncated tempered models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import stats
from . import data, inference, scoring
from .decoding import decode, row_seeds
from .inference import InferenceLinear, inference_copy  # noqa: F401  (the sampler's copy, re-exported)
from .logprobs import reference_adapter, shared_prompt_logps
from .rewards import check_scores


def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int) -> list[list[int]]:
    """Token ids of each prompt with the assistant cue; a long prompt keeps its last ``max_length`` tokens."""
    out = []
    for p in prompts:
        ids = list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        out.append(ids[-max_length:])
    return out


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
             generator_seed: int | None = None, top_p: float = 1.0, n_samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``n_samples`` responses per prompt at ``temperature`` (no top-k; nucleus ``top_p``) with the
    workbench's sampler (``decoding.decode``: static KV cache, one prefill per prompt shared by its samples, one random
    stream per sample), from ``inference.for_sampling(model)`` (a 4-bit policy on a CPU: its exact copy). Returns
    response_ids (B·n, T), mask (B·n, T) and ended (B·n,), the samples of a prompt in
    consecutive rows: each response is cut after its first EOS (kept, so a policy learns to stop); the tokens after it
    are masked. The first token is never EOS: an empty response has nothing to score. Row r is drawn with seed
    ``generator_seed + r``; without ``generator_seed``, one is drawn from torch's global generator (so a run seeded
    once samples the same)."""
    if generator_seed is None:
        generator_seed = int(torch.randint(0, 2**62, (1,)).item())
    got = decode(inference.for_sampling(model), prompt_ids, n_samples=n_samples, max_new_tokens=max_new_tokens,
                 temperature=temperature,
                 top_p=top_p, seeds=row_seeds(generator_seed, len(prompt_ids) * n_samples),
                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, min_new_tokens=1)
    return got.response, got.mask, got.ended


def cut_after_eos(response: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(response, mask, ended): tokens after each row's first EOS become ``pad_id`` and are masked out; the EOS
    itself is kept. ended (B,) says whether the row has an EOS at all."""
    is_eos = response == eos_id
    ended = is_eos.any(1)
    T = response.shape[1]
    first_eos = torch.where(ended, is_eos.float().argmax(1), torch.full((len(response),), T))
    mask = torch.arange(T)[None] <= first_eos[:, None]  # up to and including the first EOS
    return torch.where(mask, response, torch.full_like(response, pad_id)), mask, ended


def baselines(rows: list[dict]) -> list[str] | None:
    """The "baseline" reply of each prompt row (``data.prompt_view``), or None where the rows carry none."""
    found = [r.get("baseline") for r in rows]
    return None if any(b is None for b in found) else found


def call_reward(reward_fn, prompts, texts, response_ids, mask, baseline: list[str] | None = None) -> Tensor:
    """(B,) rewards from a TRL-style reward function, given the sampled ids too (synthetic rewards read them) and
    each prompt's baseline reply (a pairwise judge compares with it), as TRL passes a prompt dataset's columns."""
    ids = [row[m].tolist() for row, m in zip(response_ids, mask)]
    extra = {} if baseline is None else {"baseline": baseline}
    scores = torch.tensor(reward_fn(prompts=prompts, completions=texts, completion_ids=ids, **extra), dtype=torch.float32)
    return check_scores(scores, texts, getattr(reward_fn, "__name__", "reward"))


def sample_completions(model, tokenizer, prompts: list[dict], *, n_samples: int = 1, rewards: dict | None = None,
                       max_prompt_length: int = 256, max_new_tokens: int = 64, temperature: float = 0.7,
                       top_p: float = 1.0, seed: int = 0, batch_size: int = 64, logprobs: bool = True, sampler=None,
                       desc: str | None = None, min_new_tokens: int = 0) -> list[dict]:
    """``n_samples`` completions per prompt (rows with "id" and "prompt"), one record each: the completion, its
    length, whether it ended, the sampled KL to the reference (Σ_t log π − log π_ref) and per token log π,
    log π_ref and their ratio; ``rewards`` maps a record key ("score", "gold_score") to a reward function.

    Drawn by ``decoding.decode``: prompts in order of length, ``batch_size`` samples (all samples of a prompt
    together) per decoding batch, one prefill per prompt; sample j of the i-th prompt is drawn with seed
    ``seed + i·n_samples + j``, so it is the same whatever the batch size. Records come back in prompt order.

    ``sampler``: the model that draws the tokens instead of ``model``; by default ``inference.for_sampling(model)``:
    on a CPU a 4-bit policy's exact ``inference_copy``, the same function without 4-bit dequantization at every step. log π is read off the sampler's own decoding
    steps, so it must compute the policy's function (``inference_copy`` without ``dtype`` does, to the order of
    floating-point sums; tests/test_decoding.py); log π_ref is the reference's (under
    ``logprobs.reference_adapter``), one pass over each prompt and its samples, through the exact copy (which holds
    the reference adapter too) when ``sampler`` is one, else through ``model``. ``logprobs=False`` leaves out
    log π_ref and the KL (a gold-labelled dataset needs only the texts and their scores, and may sample from the
    inexact ``inference_copy(model, dtype=...)``). ``min_new_tokens``: the first that many tokens are never EOS; the default
    0 samples the model's own distribution, which the log-probs and the KL are of (a reply may then be the EOS
    alone: an empty text, scored as any other)."""
    from tqdm.auto import tqdm

    encoded = encode_prompts(tokenizer, [row["prompt"] for row in prompts], max_prompt_length)
    sampler = inference.for_sampling(model) if sampler is None else sampler
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n_samples)
    records: list = [None] * (len(prompts) * n_samples)
    pad = tokenizer.pad_token_id
    for start in tqdm(range(0, len(order), per_batch), desc=desc or f"sampling {len(records)} completions",
                      unit="batch", leave=False):
        idx = order[start : start + per_batch]
        prompt_ids = [encoded[i] for i in idx]
        got = decode(sampler, prompt_ids, n_samples=n_samples,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seeds=[seed + i * n_samples + j for i in idx for j in range(n_samples)],
                     eos_id=tokenizer.eos_token_id, pad_id=pad, min_new_tokens=min_new_tokens, untempered=logprobs)
        response, mask = got.response, got.mask
        rows = [(prompts[i], j) for i in idx for j in range(n_samples)]
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        messages = [row["prompt"] for row, _ in rows]
        base = baselines([row for row, _ in rows])
        scores = {key: call_reward(fn, messages, texts, response, mask, base) for key, fn in (rewards or {}).items() if fn}
        if logprobs:  # log π_ref at the sampling temperature and, beside it, at T = 1 (the untempered KL)
            groups = [list(range(g * n_samples, (g + 1) * n_samples)) for g in range(len(idx))]
            scorer = sampler if inference.is_copy(sampler) else model  # an exact copy holds the reference too
            with reference_adapter(scorer):
                both = sample_logps(scorer, [prompt_ids[g] for g in range(len(idx)) for _ in range(n_samples)],
                                    response, mask, groups, pad, (temperature or 1.0, 1.0))
            ref_logps, ref_logps_t1 = [t[:, 0] for t in both], [t[:, 1] for t in both]
        for r, (row, j) in enumerate(rows):
            m = mask[r]
            record = {"id": row["id"], "sample": j, "prompt": row["prompt"], "completion": texts[r],
                      "completion_token_ids": response[r][m].tolist(), "response_tokens": int(m.sum()),
                      "response_chars": len(texts[r]), "ended": bool(got.ended[r]),
                      **{key: s[r].item() for key, s in scores.items()}}
            if logprobs:
                logp = got.logps[r][m].to(ref_logps[r].dtype)
                logratio = logp - ref_logps[r]
                logp_t1 = got.logps_t1[r][m].to(ref_logps_t1[r].dtype)
                record.update({"kl": logratio.sum().item(), "kl_t1": (logp_t1 - ref_logps_t1[r]).sum().item(),
                               "token_logps": logp.tolist(), "reference_token_logps": ref_logps[r].tolist(),
                               "token_logratio": logratio.tolist()})
            records[idx[r // n_samples] * n_samples + j] = record
    return records


def sample_logps(model, prompt_ids: list[list[int]], response: Tensor, mask: Tensor, groups: list[list[int]],
                  pad_id: int, temperature: float | tuple[float, ...]) -> list[Tensor]:
    """Per-token log-probs (at ``temperature``; a tuple: at each, on the last axis) of each sampled response's kept
    tokens, under the model's active
    adapter; ``groups`` lists the rows that share one prompt, which then runs through the model once for all of
    them (``shared_prompt_logps``: with 2 samples per prompt, ~40 % fewer tokens on HH's long prompts), four prompts a
    forward on a CPU (bench: 8–9 s for the evaluation's 32 prompts against 10.5 s for all at once), all on a GPU."""
    got = shared_prompt_logps(model, [prompt_ids[g[0]] for g in groups],
                              [[response[k][mask[k]].tolist() for k in g] for g in groups],
                              pad_id=pad_id, batch_size=len(groups) if torch.cuda.is_available() else 4,
                              temperature=temperature)  # 4 prompts a forward on a CPU: ~15 % faster than 32 or 2
    out: list = [None] * len(response)
    for g, per_sample in zip(groups, got):
        for k, t in zip(g, per_sample):
            out[k] = t
    return out


def summarize_samples(records: list[dict]) -> dict:
    """Means over sampled completions, with TRL's names."""
    if not records:
        return {}
    n = len(records)
    out = {"n_samples": n,
           "objective/kl": sum(r["kl"] for r in records) / n,
           "lengths/response_tokens": sum(r["response_tokens"] for r in records) / n,
           "val/ended": sum(r["ended"] for r in records) / n}
    for key, name in (("score", "objective/scores"), ("gold_score", "objective/gold_scores")):
        if records[0].get(key) is not None:
            out[name] = sum(r[key] for r in records) / n
    return out


def heldout_look(model, tokenizer, heldout: list[dict], run, *, reward_fn, gold_fn=None, n: int = 16,
                 max_prompt_length: int = 256, max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0,
                 batch_size: int | None = None, beta: float = 0.1, max_length: int = 512,
                 length_rule: stats.LengthRule | None = None) -> dict:
    """The quick held-out look every RL arm (PPO, RLOO, GRPO) takes at the end of training, as summary metrics:
    ``heldout_rollouts``: one fresh sample per held-out prompt with its reward, gold reward and per-token KL;
    ``heldout_pairs``: the dataset's chosen/rejected responses scored like a DPO arm's (per-token log-ratio drift),
    beside ``length_rule`` (fitted on the run's training pairs in its tokens) when given.
    The comparison across arms is ``evaluate_run``'s."""
    rollouts = sample_completions(model, tokenizer, data.prompt_view(heldout)[:n],
                                  rewards={"score": reward_fn, "gold_score": gold_fn},
                                  max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, batch_size=batch_size or 8)
    run.write_records("heldout_rollouts", rollouts)
    pairs = scoring.score_pairs(model, tokenizer, heldout[:n], beta=beta, batch_size=batch_size, max_length=max_length)
    if length_rule is not None:
        scoring.add_lengths(pairs, heldout[:n], tokenizer, length_rule)
    run.write_records("heldout_pairs", pairs)
    return {**{f"eval/{k}": v for k, v in summarize_samples(rollouts).items()},
            **scoring.pair_metrics(pairs, length_rule, prefix="eval/")}
