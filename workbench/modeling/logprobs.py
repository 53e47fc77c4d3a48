"""Log-probabilities of completions under a policy and its reference: the primitive that DPO scoring, KL drift
and the widgets reuse. Batched, length-bucketed, prompt and padding masked, the LM head run on completion tokens
only; each prompt computed once for all of its completions (chosen and rejected, or the samples the evaluation
draws from it). Also the per-token forward over sampled responses that PPO and online DPO share
(``response_hidden``, ``response_logprobs``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def default_batch_size() -> int:
    """Sequences (or pairs) per forward when scoring: 8 on a GPU, where batching pays; 2 on a CPU, where a
    forward is compute-bound and padding in a bigger batch costs more than it saves (benchmarks/bench_scoring.py)."""
    return 8 if torch.cuda.is_available() else 2



def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_t | x_<t) for the positions t >= 1 of a right-padded batch.

    input_ids, attention_mask: (B, T). Returns (B, T-1): entry [b, t-1] is the log-prob of token t.
    With ``target_mask`` (B, T-1, bool), only those entries are computed (the rest are 0): the LM head then runs
    on the completion tokens alone, not on every prompt position, which saves most of its (B, T, V) work.
    Differentiable; callers that only score wrap it in ``torch.no_grad()``.
    """
    targets = input_ids[:, 1:]
    if target_mask is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
        # log_softmax(z)[y] = z_y - logsumexp(z), without materialising a second (B, T-1, V) tensor
        return torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]  # (B, T-1, H)
    logits = head(hidden[target_mask]).float()  # (N, V), N = number of target tokens
    picked = logits.gather(1, targets[target_mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(target_mask, picked)


def pad_left(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask (B, T) with every sequence ending in the last column (left padding): what
    generation continues from, and where a next-token reading is taken."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):], attention_mask[i, T - len(x):] = torch.tensor(x), 1
    return input_ids, attention_mask


def pad_right(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Concatenate prompt and completion ids and right-pad them.

    Returns input_ids, attention_mask, completion_mask, each (B, T); completion_mask marks completion tokens.
    Right padding keeps every real token at the position it would have alone, so no position ids are needed.
    """
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = True
    return input_ids, attention_mask, completion_mask


def reference_adapter(model):
    """Context in which ``model`` is the reference: the frozen adapter named "ref" when there is one (the SFT
    adapter a preference arm started from), else the base with adapters disabled. TRL's trainers choose the
    reference the same way, through the same helper. An exact inference copy (``inference.inference_copy``) is switched
    likewise."""
    from . import inference

    if inference.is_copy(model):  # an exact inference copy holds the same adapters and switches the same way
        return inference.use_adapter(model, "ref" if "ref" in model.inference_adapters else None)
    from trl.trainer.utils import use_adapter

    return use_adapter(model, "ref" if "ref" in getattr(model, "peft_config", {}) else None)


@dataclass
class CompletionLogps:
    """Log-probabilities of n completions: ``per_token[i]`` has one entry per completion token of item i."""

    per_token: list[torch.Tensor]
    sum: torch.Tensor = field(init=False)  # (n,) sequence log-prob: sum over completion tokens
    n_tokens: torch.Tensor = field(init=False)  # (n,)

    def __post_init__(self):
        self.sum = torch.stack([t.sum() for t in self.per_token]) if self.per_token else torch.zeros(0)
        self.n_tokens = torch.tensor([len(t) for t in self.per_token], dtype=torch.long)


def _backbone_and_head(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft, LoRA layers stay live
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()


# configs whose models change the logits after the output layer (Gemma 2's soft cap, Cohere's and Granite's scales)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """(B, len(token_ids)) float32 logits of ``token_ids`` at the last position (left-padded rows): the last hidden
    state times the output layer's rows of those tokens, in float32. A bf16 model's own logits are bf16, 8
    significant bits (logits near 20 lie 0.125 apart), so two nearby readings (the AI judge's two orders of a pair)
    often come out exactly equal, ties the model did not make; and no logits over the whole vocabulary are made.
    Models that transform their logits after the output layer, or lack the usual layout, are read through their own
    logits."""
    config = getattr(model, "config", None)
    try:
        backbone, head = _backbone_and_head(model)
    except AttributeError:
        backbone = head = None
    if head is None or any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, token_ids].float()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # each row from 0, however much it is padded
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state[:, -1].float()
    logits = hidden @ head.weight[token_ids].float().T
    return logits + head.bias[token_ids].float() if getattr(head, "bias", None) is not None else logits


def _shared_prompt_logps(model, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int,
                         temperature: float | tuple[float, ...] = 1.0) -> list[list[torch.Tensor]]:
    """Per-token log-probs of several completions per prompt, running each prompt through the model once.

    prompts: B token lists; completions: for each prompt, its own number of token lists (2 for a preference
    pair's chosen and rejected, n for n samples of one prompt). ``temperature``: the logits are divided by it (a
    tuple of temperatures: the log-probs at each from one pass, as (tokens, temperatures) tensors).
    1. The prompts, right-padded, go through the backbone once and leave their KV cache.
    2. Every completion continues from its prompt's rows of that cache, at the positions following its own
       prompt (explicit position_ids; the padding gap is masked out).
    3. Completion token j is predicted from the hidden state before it: the prompt's last one for j = 0, the
       completion's own (j − 1)-th after that; the LM head runs only on the completion tokens' states.
    """
    backbone, head = _backbone_and_head(model)
    dev = next(model.parameters()).device
    B = len(prompts)
    owner = torch.tensor([b for b, cs in enumerate(completions) for _ in cs], device=dev)  # prompt of each completion
    p_len = torch.tensor([len(p) for p in prompts], device=dev)
    p_ids, p_mask, _ = (t.to(dev) for t in pad_right(prompts, [[] for _ in prompts], pad_id))  # (B, Lp)
    out = backbone(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
    last = out.last_hidden_state[torch.arange(B, device=dev), p_len - 1]  # (B, H): predicts completion token 0
    cache = out.past_key_values
    cache.batch_select_indices(owner)  # row k continues prompt owner[k]

    flat = [c for cs in completions for c in cs]  # prompt-major
    c_len = torch.tensor([len(c) for c in flat], device=dev)
    c_ids, c_mask, _ = (t.to(dev) for t in pad_right(flat, [[] for _ in flat], pad_id))  # (K, Lc)
    Lc, c_mask = c_ids.shape[1], c_mask.bool()
    hidden = backbone(input_ids=c_ids, attention_mask=torch.cat([p_mask[owner], c_mask.long()], 1),
                      position_ids=p_len[owner][:, None] + torch.arange(Lc, device=dev)[None],
                      past_key_values=cache, use_cache=False).last_hidden_state  # (K, Lc, H)
    predictors = torch.cat([last[owner][:, None], hidden[:, :-1]], dim=1)  # (K, Lc, H)
    logits = head(predictors[c_mask]).float()  # (N, V), N = all completion tokens
    token = c_ids[c_mask].unsqueeze(-1)
    at = lambda t: (logits / t).gather(1, token).squeeze(-1) - torch.logsumexp(logits / t, dim=-1)  # noqa: E731
    picked = torch.stack([at(t) for t in temperature], -1) if isinstance(temperature, tuple) else at(temperature)
    per_row = iter(picked.cpu().split(c_len.tolist()))
    return [[next(per_row) for _ in cs] for cs in completions]


def in_length_buckets(model, lengths: list[int], batch_size: int | None, score, reference: bool = False) -> list:
    """Run ``score(indices) -> one result per index`` over items sorted by length, ``batch_size`` at a time (so
    each batch pads little), in eval mode (no dropout), under the reference adapter if asked; results come back
    in input order. The one batching loop of every scoring function here and in ``scoring``."""
    if reference and not hasattr(model, "disable_adapter"):
        raise ValueError("reference=True needs a model with a LoRA adapter (the reference is the adapter disabled).")
    batch_size = batch_size or default_batch_size()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out: list = [None] * len(order)
    was_training = model.training
    model.eval()
    try:
        with reference_adapter(model) if reference else contextlib.nullcontext():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                for i, result in zip(idx, score(idx)):
                    out[i] = result
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def shared_prompt_logps(model, prompts: list[list[int]], completions: list[list[list[int]]], *, pad_id: int,
                        batch_size: int | None = None, reference: bool = False,
                        temperature: float | tuple[float, ...] = 1.0) -> list[list[torch.Tensor]]:
    """``completion_logps`` for several completions of each prompt (a preference pair: chosen and rejected; n
    samples of one prompt), with each prompt computed once instead of once per completion. Batched over prompts,
    length-bucketed, returned in input order: result[i][c] has the per-token log-probs of completions[i][c], at
    ``temperature`` (the logits divided by it, as where the completions were sampled; a tuple: at each of them, on
    the last axis).

    Needs a decoder with a KV cache (every causal LM in transformers); the numbers equal ``completion_logps``'.
    """
    if any(len(c) == 0 for cs in completions for c in cs) or any(len(p) == 0 for p in prompts):
        raise ValueError("An empty prompt or completion cannot be scored; filter empty ones first.")
    lengths = [len(p) + max(map(len, cs)) for p, cs in zip(prompts, completions)]
    return in_length_buckets(model, lengths, batch_size, reference=reference, score=lambda idx: _shared_prompt_logps(
        model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id, temperature))


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                     batch_size: int | None = None, reference: bool = False) -> CompletionLogps:
    """Per-token log-probs of each completion given its prompt, batched and length-bucketed.

    Prompt and padding tokens are masked out. With ``reference=True`` the scores are the reference model's
    (see ``reference_adapter``), from the same weights in memory.
    """
    if any(len(c) == 0 for c in completion_ids):
        raise ValueError("An empty completion has no tokens to score; filter empty responses first.")
    dev = next(model.parameters()).device

    def score(idx):
        ids, attn, cmask = pad_right([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id)
        mask = cmask[:, 1:].to(dev)  # (B, T-1): which next-token predictions are completion tokens
        lp = token_logps(model, ids.to(dev), attn.to(dev), mask)
        return [lp[row][mask[row]].cpu() for row in range(len(idx))]

    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    return CompletionLogps(per_token=in_length_buckets(model, lengths, batch_size, score, reference=reference))


def response_hidden(model, prompt_ids: list[list[int]], response_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T, H) hidden states that predict each response token: the state before token t of the response.
    Sequences are right-padded, so every token sits at the position it would have alone."""
    backbone, _ = _backbone_and_head(model)
    dev = next(model.parameters()).device
    responses = [row[m].tolist() for row, m in zip(response_ids, mask)]
    ids, attn, _ = pad_right(prompt_ids, responses, pad_id)
    hidden = backbone(input_ids=ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state  # (B, L, H)
    p_len = torch.tensor([len(p) for p in prompt_ids], device=dev)
    pos = (p_len[:, None] - 1 + torch.arange(response_ids.shape[1], device=dev)[None]).clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))


def response_logprobs(model, prompt_ids, response_ids: torch.Tensor, mask: torch.Tensor, pad_id: int,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy), each (B, T): log π(y_t | x, y_<t) of the sampled tokens and the entropy of π at each
    step, from logits divided by the sampling temperature; 0 on padded positions."""
    _, head = _backbone_and_head(model)
    dev = next(model.parameters()).device
    logits = head(response_hidden(model, prompt_ids, response_ids, mask, pad_id)).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    logprobs = logp_all.gather(-1, response_ids.to(dev)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    m = mask.to(dev)
    return logprobs * m, entropy * m
