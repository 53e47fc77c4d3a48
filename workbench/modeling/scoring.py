"""Per-sample scoring of preference pairs under a policy and its reference (the adapter disabled).

For each pair: sequence log-probs of chosen and rejected under both models, the DPO implicit rewards
r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, arXiv:2305.18290, Eq. 5), their margin,
and per token the log-ratio log π − log π_ref, which shows where in a response the reward and the KL drift
come from. TRL logs only batch means of these; here every pair keeps its own.

Beside them, the length-only baseline: a ``stats.LengthRule`` fitted on training pairs (``fit_length_rule``),
with every length counted in tokens of one tokenizer (``response_lengths``), and applied to the scored pairs.
"""

from __future__ import annotations

import torch

from ..core import stats
from .logprobs import in_length_buckets, pad_right, shared_prompt_logps
from .models import encode_many


def score_pairs(model, tokenizer, examples: list[dict], *, beta: float = 0.1, batch_size: int | None = None,
                max_length: int | None = None, cache: dict | None = None, policy_key: str | None = None,
                reference_key: str | None = None) -> list[dict]:
    """One record per pair (``examples`` in the data layer's format: id, prompt, chosen, rejected).

    One length-bucketed pass per model (policy, then reference); each prompt is computed once and shared by its
    chosen and rejected response (``logprobs.shared_prompt_logps``).

    ``cache`` (a dict the caller keeps) with ``policy_key`` / ``reference_key`` (strings that name the weights,
    e.g. base model and adapter folder) reuses a model's per-token log-probs on the same pairs at the same
    ``max_length`` instead of recomputing them: an evaluation of several arms trained from one SFT run computes
    that reference once, and the SFT run's own policy pass is the same numbers.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (got {beta}): it scales the implicit reward β·log(π/π_ref).")
    prompts, pair_completions = [], []
    for ex in examples:
        p, (c, r) = encode_many(tokenizer, ex["prompt"], [ex["chosen"], ex["rejected"]], max_length=max_length)
        prompts.append(p)
        pair_completions.append([c, r])
    kw = dict(pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    ids = tuple(ex["id"] for ex in examples)

    def logps(key, reference):  # each prompt runs once per model, shared by its chosen and rejected response
        if cache is None or key is None:
            return shared_prompt_logps(model, prompts, pair_completions, reference=reference, **kw)
        full_key = (key, max_length, ids)
        if full_key not in cache:
            cache[full_key] = shared_prompt_logps(model, prompts, pair_completions, reference=reference, **kw)
        return cache[full_key]

    policy, reference = logps(policy_key, False), logps(reference_key, True)

    records = []
    for i, ex in enumerate(examples):
        (pol_c, pol_r), (ref_c, ref_r) = policy[i], reference[i]
        (ids_c, ids_r) = pair_completions[i]
        pc, pr, rc, rr = (t.sum().item() for t in (pol_c, pol_r, ref_c, ref_r))
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)  # DPO implicit reward, Eq. 5
        records.append({
            "id": ex["id"],
            "prompt_turns": len(ex["prompt"]),
            "prompt_tokens": len(prompts[i]),
            "chosen_tokens": len(ids_c),
            "rejected_tokens": len(ids_r),
            "policy_chosen_logp": pc,
            "policy_rejected_logp": pr,
            "reference_chosen_logp": rc,
            "reference_rejected_logp": rr,
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            "margin": chosen_reward - rejected_reward,
            "correct": ranked(chosen_reward, rejected_reward),
            # does the reference itself already prefer the chosen response? (per token, so length does not decide)
            "reference_prefers_chosen": rc / len(ids_c) > rr / len(ids_r),
            "chosen_token_ids": ids_c,
            "rejected_token_ids": ids_r,
            "chosen_token_logratio": (pol_c - ref_c).tolist(),
            "rejected_token_logratio": (pol_r - ref_r).tolist(),
            "reference_chosen_token_logps": ref_c.tolist(),
            "reference_rejected_token_logps": ref_r.tolist(),
        })
    return records


LENGTH_FIT_PAIRS = 2000  # training pairs (the first, in the data's order) a length rule is fitted on


def response_lengths(tokenizer, examples: list[dict]) -> tuple[list[int], list[int]]:
    """(chosen, rejected): per pair, the tokens of each response as ``models.encode_many`` cuts it after the
    prompt (end-of-turn tokens included: the count a policy's scoring uses), untruncated, so that a length rule
    sees whole responses. The unit of every length baseline."""
    chosen, rejected = [], []
    for ex in examples:
        _, (c, r) = encode_many(tokenizer, ex["prompt"], [ex["chosen"], ex["rejected"]])
        chosen.append(len(c))
        rejected.append(len(r))
    return chosen, rejected


def fit_length_rule(tokenizer, train_pairs: list[dict], max_pairs: int = LENGTH_FIT_PAIRS) -> stats.LengthRule:
    """``stats.fit_length_rule`` on the first ``max_pairs`` training pairs, lengths in tokens of ``tokenizer``."""
    if not train_pairs:
        raise ValueError("The length-only baseline is fitted on training pairs, and there are none.")
    return stats.fit_length_rule(*response_lengths(tokenizer, train_pairs[:max_pairs]))


def add_lengths(records: list[dict], examples: list[dict], tokenizer, rule: stats.LengthRule) -> list[dict]:
    """Add to each record (in the order of ``examples``) ``chosen_length`` and ``rejected_length`` (tokens of
    ``tokenizer``, see ``response_lengths``), ``length_rule``, the fitted rule's credit (1: it prefers the
    chosen response, 0: the rejected, 0.5: equal lengths) and ``longer_wins``, the credit of "the longer response
    wins". Returns ``records``."""
    chosen, rejected = response_lengths(tokenizer, examples)
    fitted, longer = rule.credit(chosen, rejected), stats.LengthRule("longer", "longer").credit(chosen, rejected)
    for r, c, rj, f, lw in zip(records, chosen, rejected, fitted.tolist(), longer.tolist()):
        r.update({"chosen_length": c, "rejected_length": rj, "length_rule": f, "longer_wins": lw})
    return records


def length_summary(records: list[dict], rule: stats.LengthRule, prefix: str = "") -> dict:
    """The length-only baseline on records with ``add_lengths``' fields: ``<prefix>length_rule``, the fitted
    rule's accuracy (equal lengths count half); ``<prefix>longer_wins``, the raw rate at which the longer response
    is the chosen one (same counting); and the fit: ``<prefix>length_rule_fit`` (the rule in words),
    ``<prefix>length_rule_train_accuracy``, ``<prefix>length_rule_n_train``."""
    n = len(records)
    return {f"{prefix}length_rule": sum(r["length_rule"] for r in records) / n,
            f"{prefix}longer_wins": sum(r["longer_wins"] for r in records) / n,
            f"{prefix}length_rule_fit": rule.describe(),
            f"{prefix}length_rule_train_accuracy": rule.train_accuracy,
            f"{prefix}length_rule_n_train": rule.n_train}


def ranked(chosen: float, rejected: float) -> float:
    """1 where the chosen response is ranked above the rejected one, ½ on a tie, 0 below: ties count half in every
    accuracy, as in the length rule and the win rates."""
    return float(chosen > rejected) + 0.5 * float(chosen == rejected)


def pair_clusters(records: list[dict]) -> list[str]:
    """The bootstrap clusters of pair records: their prompt. A gold-labelled dataset's pair id is "<prompt id>#i-j"
    (its held-out prompts give several pairs each, which share the prompt); an HH pair is its own prompt's id."""
    return [r["id"].split("#")[0] for r in records]


def pair_metrics(records: list[dict], length_rule: stats.LengthRule | None = None, *, reference_free: bool = False,
                 n_bootstrap: int = 0, seed: int = 0, prefix: str = "") -> dict:
    """What a model's ranking of held-out preference pairs measures: one function and one set of names for the
    training-time look (``eval/<name>`` in a run's summary) and the evaluation (``pairs/<name>``).

    ``records``: a policy's (``score_pairs``: its implicit reward) or a reward model's (``score_pairs_with_reward``).
      accuracy            how often the model's own reward ranks the chosen reply above the rejected one (ties ½):
                          a policy's implicit reward β·log π/π_ref (DPO, Eq. 5 of arXiv:2305.18290), or with
                          ``reference_free`` the length-normalised log-likelihood (SimPO's reward, arXiv:2405.14734
                          Eq. 4; ORPO's log-odds is increasing in it, so it ranks the same); a reward model's score
      rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies   TRL's names: the mean reward of each
                          side (a policy's β·log π/π_ref), their difference, the share ranked right
      policies only       avg_logp_accuracy; logps/chosen, logps/rejected (TRL's); logratio/chosen, logratio/rejected
                          (log π/π_ref on the dataset's replies: how far the policy moved there);
                          reference/prefers_chosen_per_token; lengths/chosen_tokens, lengths/rejected_tokens
      with ``length_rule`` (records through ``add_lengths``)   the length-only baseline on the same pairs:
                          length_rule, longer_wins and the fit (``length_summary``)
      with ``n_bootstrap``   95 % intervals over the pairs' prompts (``pair_clusters``): accuracy, length_rule and
                          longer_wins ``_lo`` / ``_hi``, and accuracy_vs_length_rule (paired), with its interval
    A policy's records gain ``avg_logp_correct`` (its pair ranked by the length-normalised log-likelihood)."""
    if not records:
        return {}
    n, policy = len(records), "policy_chosen_logp" in records[0]
    mean = lambda key: sum(float(r[key]) for r in records) / n  # noqa: E731
    if policy:
        for r in records:
            r["avg_logp_correct"] = ranked(r["policy_chosen_logp"] / r["chosen_tokens"],
                                           r["policy_rejected_logp"] / r["rejected_tokens"])
    own = "avg_logp_correct" if policy and reference_free else "correct"
    chosen, rejected = ("chosen_reward", "rejected_reward") if policy else ("chosen_score", "rejected_score")
    out = {"n_pairs": n, "accuracy": mean(own), "rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
           "rewards/margins": mean("margin"), "rewards/accuracies": mean("correct")}
    if policy:
        out.update({"avg_logp_accuracy": mean("avg_logp_correct"),
                    "logps/chosen": mean("policy_chosen_logp"), "logps/rejected": mean("policy_rejected_logp"),
                    "logratio/chosen": sum(r["policy_chosen_logp"] - r["reference_chosen_logp"] for r in records) / n,
                    "logratio/rejected": sum(r["policy_rejected_logp"] - r["reference_rejected_logp"]
                                             for r in records) / n,
                    "reference/prefers_chosen_per_token": mean("reference_prefers_chosen"),
                    "lengths/chosen_tokens": mean("chosen_tokens"), "lengths/rejected_tokens": mean("rejected_tokens")})
    if length_rule is not None:
        out.update(length_summary(records, length_rule))
    if n_bootstrap:
        ids = pair_clusters(records)
        series = [("accuracy", [float(r[own]) for r in records])]
        if length_rule is not None:
            series += [(k, [float(r[k]) for r in records]) for k in ("length_rule", "longer_wins")]
        for key, values in series:
            out[key], out[f"{key}_lo"], out[f"{key}_hi"] = stats.bootstrap_mean(values, ids, n_bootstrap, seed)
        if length_rule is not None:
            est, lo, hi = stats.paired_difference([float(r[own]) for r in records], [r["length_rule"] for r in records],
                                                  ids, n_bootstrap, seed)
            out.update({"accuracy_vs_length_rule": est, "accuracy_vs_length_rule_lo": lo,
                        "accuracy_vs_length_rule_hi": hi})
    return {f"{prefix}{k}": v for k, v in out.items()}


@torch.no_grad()
def reward_scores(model, tokenizer, conversations: list[list[dict]], *, max_length: int = 512,
                  batch_size: int | None = None) -> torch.Tensor:
    """(n,) scalar rewards of whole conversations (prompt + response), tokenised through the chat template as
    TRL's RewardTrainer does. A conversation longer than ``max_length`` keeps its first token (an encoder's [CLS])
    and its end, where the response is."""
    ids = []
    for conv in conversations:
        x = list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
        ids.append(x if len(x) <= max_length else x[:1] + x[len(x) - max_length + 1 :])
    dev = next(model.parameters()).device

    def score(idx):
        input_ids, attention_mask, _ = pad_right([ids[i] for i in idx], [[] for _ in idx], tokenizer.pad_token_id)
        return model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)).logits[:, 0].float().cpu()

    return torch.stack(in_length_buckets(model, [len(x) for x in ids], batch_size, score)) if ids else torch.empty(0)


def score_pairs_with_reward(model, tokenizer, examples: list[dict], *, max_length: int = 512,
                            batch_size: int | None = None) -> list[dict]:
    """One record per pair: the reward model's score of chosen and rejected, margin, whether it ranks them right."""
    convs = [ex["prompt"] + ex[side] for ex in examples for side in ("chosen", "rejected")]
    scores = reward_scores(model, tokenizer, convs, max_length=max_length, batch_size=batch_size)
    records = []
    for i, ex in enumerate(examples):
        c, r = scores[2 * i].item(), scores[2 * i + 1].item()
        records.append({"id": ex["id"], "chosen_score": c, "rejected_score": r, "margin": c - r, "correct": ranked(c, r)})
    return records
