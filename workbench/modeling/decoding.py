"""The sampler: one decoding loop for every place that generates (the gold-labelled dataset, PPO and online-DPO
rollouts, best-of-n, the evaluation, the inspector).

What it does differently from ``model.generate``, each measured in ``benchmarks/bench_sampling.py``:

- **one prefill per prompt**, shared by its k samples (the prompt's keys and values are copied k times);
- prompts are prefilled in **chunks of similar length** (little padding), then placed, right-aligned, into one
  **static key/value cache** for the whole batch, so a decoding step writes one column instead of re-concatenating
  the cache (``DynamicCache`` copies all of it at every step);
- **log π of each sampled token** is read off the logits the step already computed (at the sampling temperature,
  untruncated by top-p), so a sampler that is the policy's function needs no second pass for it;
- **one random stream per sample** (seeded by the sample's own seed), drawn by the Gumbel-max trick: a sample's
  tokens depend on its seed, prompt and model alone, not on which other samples share its batch.

The loop is plain PyTorch around the model's own forward (any causal LM of ``transformers`` with a static cache,
4-bit + LoRA or not), so its samples are the model's: under greedy decoding they equal ``model.generate``'s
(tests/test_decoding.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .logprobs import pad_left


@dataclass
class Decoded:
    """Rows in prompt-major order (prompt i's sample j is row i·k + j). ``response`` (N, T) is cut after each row's
    first EOS (kept; later tokens are ``pad_id``), ``mask`` marks the kept tokens, ``ended`` whether a row has an EOS,
    ``logps`` (N, T) each kept token's log π at the sampling temperature (0 where masked), ``logps_t1`` at
    temperature 1, the model's own distribution (when asked for; else, and when sampling at T = 1 or greedily, the
    same tensor as ``logps``). ``seconds``: wall time of the prefill and of the decoding steps (for the benchmark's
    profile)."""

    response: Tensor
    mask: Tensor
    ended: Tensor
    logps: Tensor
    logps_t1: Tensor
    seconds: dict = field(default_factory=dict)


def row_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``n`` samples drawn under ``seed``: sample r gets ``seed + r``."""
    return [seed + r for r in range(n)]


@torch.no_grad()
def decode(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, seeds: list[int],
           eos_id: int, pad_id: int, n_samples: int = 1, top_p: float = 1.0, min_new_tokens: int = 0,
           prefill_batch: int = 8, untempered: bool = False) -> Decoded:
    """``n_samples`` responses of at most ``max_new_tokens`` to each prompt (token ids), one per seed in ``seeds``
    (``len(prompt_ids) · n_samples`` of them, prompt-major). ``temperature`` 0 decodes greedily (log π then at T = 1).
    The first ``min_new_tokens`` tokens are never EOS; the log-probs are the model's all the same, so with
    ``min_new_tokens`` > 0 they are not those of the distribution sampled. The default 0 samples the model as it is:
    a reply may be the EOS alone (one token, kept, so it is scored like any other).
    ``prefill_batch``: prompts per prefill forward (sorted by length, so they pad little). ``untempered``: also
    read each token's log π at T = 1 (``Decoded.logps_t1``; else it is ``logps``), one more softmax per step."""
    from transformers import StaticCache

    k, n_prompts = n_samples, len(prompt_ids)
    N = n_prompts * k
    if len(seeds) != N:
        raise ValueError(f"decode: {len(seeds)} seeds for {n_prompts} prompts x {k} samples; give one seed per sample")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    P = max(len(p) for p in prompt_ids)
    cache = StaticCache(config=_text_config(model), max_cache_len=P + max_new_tokens)
    attn = torch.zeros((N, P + max_new_tokens), dtype=torch.long, device=dev)
    logits = None
    t_start = time.perf_counter()
    order = sorted(range(n_prompts), key=lambda i: len(prompt_ids[i]))
    for start in range(0, n_prompts, prefill_batch):
        idx = order[start : start + prefill_batch]
        ids, mask = pad_left([prompt_ids[i] for i in idx], pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                    logits_to_keep=1)
        last = out.logits[:, -1].float()
        if logits is None:
            logits = torch.empty((N, last.shape[-1]), dtype=torch.float32, device=dev)
        rows = torch.tensor([i * k + j for i in idx for j in range(k)], device=dev)
        logits[rows] = last.repeat_interleave(k, 0)
        attn[rows, P - ids.shape[1] : P] = mask.repeat_interleave(k, 0)
        _place(cache, out.past_key_values, rows, N, P, k)
    for layer in cache.layers:
        layer.cumulative_length.fill_(P)
    t_prefilled = time.perf_counter()
    position = attn[:, :P].sum(-1, keepdim=True)  # each row's next position (its prompt's length)
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long)
    logps = torch.zeros((N, max_new_tokens))
    logps_t1 = torch.zeros((N, max_new_tokens)) if untempered and temperature not in (0, 1) else logps
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    t = -1
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)
        choose = _nucleus(logp, top_p) if temperature > 0 and top_p < 1 else logp
        if t < min_new_tokens:
            choose = choose.clone()
            choose[:, eos_id] = -float("inf")
        token = draw(choose, gens) if temperature > 0 else choose.argmax(-1)
        picked = logp.gather(1, token[:, None])[:, 0]
        token = torch.where(done, pad_id, token)
        tokens[:, t], logps[:, t] = token.cpu(), torch.where(done, 0.0, picked).cpu()
        if logps_t1 is not logps:  # the untempered model's log-prob of the same token: KL at T = 1 beside T's
            picked_t1 = torch.log_softmax(logits, -1).gather(1, token.clamp(min=0)[:, None])[:, 0]
            logps_t1[:, t] = torch.where(done, 0.0, picked_t1).cpu()
        done = done | (token == eos_id)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attn[:, P + t] = 1
        out = model(input_ids=token[:, None], attention_mask=attn[:, : P + t + 1], position_ids=position + t,
                    past_key_values=cache, use_cache=True, cache_position=torch.tensor([P + t], device=dev))
        logits = out.logits[:, -1].float()
    model.train(was_training)
    is_eos = tokens == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.float().argmax(1), torch.full((N,), max_new_tokens))
    mask = torch.arange(max_new_tokens)[None] <= first[:, None]
    return Decoded(torch.where(mask, tokens, pad_id), mask, ended, torch.where(mask, logps, 0.0),
                   torch.where(mask, logps_t1, 0.0),
                   {"prefill": t_prefilled - t_start, "steps": time.perf_counter() - t_prefilled, "n_steps": t + 1})


def draw(logp: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One token per row from softmax(logp) by the Gumbel-max trick, argmax_v(logp_v + G_v) with G_v = −log(−log U_v):
    row r's uniforms U come from ``generators[r]`` alone, so a row's draw does not depend on the other rows."""
    u = torch.stack([torch.rand(logp.shape[1], generator=g, device=logp.device) for g in generators])
    return (logp - torch.log(-torch.log(u.clamp(min=1e-20)))).argmax(-1)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _place(cache, prefilled, rows: Tensor, N: int, P: int, k: int) -> None:
    """Copy a prefill's keys and values (each prompt's k times) into ``rows`` of the static cache (N rows, allocated
    on the first call), right-aligned at column P (the batch's longest prompt), where the decoding steps continue."""
    for layer, got in zip(cache.layers, prefilled.layers):
        keys, values = got.keys.repeat_interleave(k, 0), got.values.repeat_interleave(k, 0)
        if not layer.is_initialized:
            layer.lazy_initialization(keys.new_zeros((N, keys.shape[1], 0, keys.shape[3])),
                                      values.new_zeros((N, values.shape[1], 0, values.shape[3])))
        L = keys.shape[2]
        layer.keys[rows, :, P - L : P] = keys
        layer.values[rows, :, P - L : P] = values


def _nucleus(logp: Tensor, top_p: float) -> Tensor:
    """log p with the tokens outside each row's top-p nucleus set to −∞ (the smallest set of most likely tokens
    whose probability reaches ``top_p``; the most likely token always stays)."""
    sorted_logp, index = logp.sort(-1, descending=True)
    before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # probability of the tokens ranked above each one
    drop = before >= top_p
    return logp.scatter(-1, index, sorted_logp.masked_fill(drop, -float("inf")))
