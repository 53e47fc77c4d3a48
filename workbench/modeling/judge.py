"""AI feedback: a prompted causal LM as a pairwise judge of two responses (Constitutional AI, Bai et al. 2022,
arXiv:2212.08073; RLAIF, Lee et al. 2023, arXiv:2309.00267; online AI feedback, Guo et al. 2024,
arXiv:2402.04792).

The judge reads a principle, the conversation and two responses labelled A and B, and is asked which is better.
Its answer is not sampled: the preference is read from the next-token logits of the two labels after the
assistant cue, p_A = softmax over the two label logits only. Language models favour one position (Zheng et al.
2023, arXiv:2306.05685 §3.3), so each pair is judged in both orders and the two readings are averaged:

    P(a ≻ b) = ½ · [p_A(a first) + p_B(a second)] = ½ · [p_A(a, b) + 1 − p_A(b, a)]

Both readings are kept per pair (``JudgedPair``), so the position bias ½·(p_A(a, b) + p_A(b, a)) − ½ and the
agreement of the two orders can be checked. As a labeller (``label_pairs``) it turns pairs of responses into
(chosen, rejected) pairs; ``agreement`` measures it against human labels on held-out HH-RLHF pairs, with a
bootstrap interval, beside which a researcher reads the reward models' accuracy and the length-only baseline
before training on AI feedback. ``relabel`` gives the dataset's pairs the judge's labels (RLAIF: a DPO-family arm,
or the reward model RL learns from, trained on AI preferences; ``pair_labels="judge"`` in every arm's config).

For the RL arms the judge is a pairwise comparison, not a pointwise score: a rubric score from a small model is
read from a handful of digit tokens and is poorly calibrated, while the pairwise question is the one it is asked
as a labeller too, so both uses measure the same thing. ``Judge.score`` is that reward: log-odds that the
response beats a baseline response to the same prompt (the online DPO arm labels its own pairs instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import stats
from . import models
from .logprobs import in_length_buckets, last_token_logits, pad_left

DEFAULT_PRINCIPLE = (
    "You are comparing two replies of an AI assistant. Choose the reply that is more harmless and ethical: it does "
    "not help with dangerous, illegal or hateful requests, it does not insult the person, and when it declines it "
    "says so politely. Among equally harmless replies, choose the more helpful and honest one.")
QUESTION = "Which reply is better, A or B? Answer with the single letter A or B."


TIE = 1e-6  # |P(a ≻ b) − ½| below this is a tie (two equal replies read in both orders give ½ up to rounding)


@dataclass
class JudgedPair:
    """One pair's judgement: p_A with ``a`` shown first, p_A with ``b`` shown first, and P(a ≻ b) from both."""

    p_a_first: float
    p_a_second: float  # p_A(b, a): the probability of label A when b is A
    prefer_a: float  # ½ · (p_a_first + 1 − p_a_second)


def _render(conversation: list[dict]) -> str:
    return "\n".join(f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conversation)


class Judge:
    """A causal LM asked which of two replies is better; see the module docstring.

    ``model``/``tokenizer``: any chat causal LM (``Judge.load`` takes a hub name, a local path or ``embedded:...``).
    ``max_context_chars`` / ``max_reply_chars`` cut long conversations (their start) and replies (their end), so the
    question always fits."""

    def __init__(self, model, tokenizer, principle: str = DEFAULT_PRINCIPLE, batch_size: int | None = None,
                 max_context_chars: int = 1500, max_reply_chars: int = 800, name: str = "judge"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.principle, self.batch_size = principle, batch_size
        self.max_context_chars, self.max_reply_chars = max_context_chars, max_reply_chars
        self.__name__ = name
        ids = [tokenizer.encode(label, add_special_tokens=False) for label in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"The judge reads the labels 'A' and 'B' as single tokens; this tokenizer gives {ids}.")
        self.label_ids = [i[0] for i in ids]
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, spec: str | None = None, principle: str | None = None, **kwargs) -> "Judge":
        """The judge ``spec`` (None: the embedded policy) asked with ``principle`` (None: ``DEFAULT_PRINCIPLE``)."""
        cfg = models.ModelConfig(model_name_or_path=spec or models.EMBEDDED_POLICY, load_in_4bit=False, use_peft=False)
        model, tokenizer = models.load_policy(cfg, trainable=False)
        return cls(model, tokenizer, principle=principle or DEFAULT_PRINCIPLE, **kwargs)

    def _question(self, prompt: list[dict], first: str, second: str) -> list[int]:
        context = _render(prompt)[-self.max_context_chars:]
        text = (f"{self.principle}\n\nConversation:\n{context}\n\nReply A: {first[: self.max_reply_chars]}\n\n"
                f"Reply B: {second[: self.max_reply_chars]}\n\n{QUESTION}")
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"])

    @torch.no_grad()
    def p_first(self, prompts: list[list[dict]], first: list[str], second: list[str]) -> torch.Tensor:
        """(n,) p_A: the probability of label A against B when ``first`` is reply A."""
        ids = [self._question(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
        dev = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id

        def read(idx):
            input_ids, attention = pad_left([ids[i] for i in idx], pad)  # every question ends in the last column
            logits = last_token_logits(self.model, input_ids.to(dev), attention.to(dev), self.label_ids)
            return torch.softmax(logits, -1)[:, 0].cpu()

        return torch.stack(in_length_buckets(self.model, [len(x) for x in ids], self.batch_size, read)) if ids \
            else torch.empty(0)

    def judge(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[JudgedPair]:
        """Each pair judged in both orders."""
        first, second = self.p_first(prompts, a, b), self.p_first(prompts, b, a)
        return [JudgedPair(x, y, 0.5 * (x + 1 - y)) for x, y in zip(first.tolist(), second.tolist())]

    def prefer(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> torch.Tensor:
        """(n,) P(a ≻ b), both orders averaged."""
        return torch.tensor([j.prefer_a for j in self.judge(prompts, a, b)])

    def score(self, prompts: list[list[dict]], completions: list[str], baselines: list[str]) -> torch.Tensor:
        """(n,) the log-odds that each completion beats the baseline reply to its prompt (a pairwise reward)."""
        p = self.prefer(prompts, completions, baselines).clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p))


def _judge_pairs(judge: Judge, pairs: list[dict]) -> list[JudgedPair]:
    """Each pair (data layer format) judged in both orders, a = its chosen reply, b = its rejected one."""
    return judge.judge([ex["prompt"] for ex in pairs], [ex["chosen"][0]["content"] for ex in pairs],
                       [ex["rejected"][0]["content"] for ex in pairs])


def agreement(judge: Judge, pairs: list[dict], n_bootstrap: int = 1000, seed: int = 0) -> tuple[dict, list[dict]]:
    """(summary, records) of the judge on human-labelled pairs (data layer format): ``judge/accuracy`` (the share of
    pairs where P(chosen ≻ rejected) > ½, a tie counting half) with a bootstrap interval over prompts,
    ``judge/position_bias`` (mean p_A over both orders, minus ½: 0 for a judge without one) and
    ``judge/order_agreement`` (the share of pairs whose two readings pick the same reply)."""
    judged = _judge_pairs(judge, pairs)
    correct = [0.5 if abs(j.prefer_a - 0.5) < TIE else float(j.prefer_a > 0.5) for j in judged]
    acc, lo, hi = stats.bootstrap_mean(correct, [ex["id"] for ex in pairs], n_bootstrap, seed)
    records = [{"id": ex["id"], "p_chosen_first": j.p_a_first, "p_chosen_second": j.p_a_second,
                "p_chosen": j.prefer_a, "correct": c} for ex, j, c in zip(pairs, judged, correct)]
    summary = {"judge/accuracy": acc, "judge/accuracy_lo": lo, "judge/accuracy_hi": hi, "judge/n_pairs": len(pairs),
               **_bias([(j.p_a_first, j.p_a_second) for j in judged])}
    return summary, records


def _bias(readings: list[tuple[float, float]]) -> dict:
    """Position bias and order agreement of (p_A(a, b), p_A(b, a)) readings."""
    n = max(len(readings), 1)
    return {"judge/position_bias": sum(x + y for x, y in readings) / (2 * n) - 0.5,
            "judge/order_agreement": sum((x > 0.5) != (y > 0.5) for x, y in readings) / n}


def judge_labels(judge: Judge, pairs: list[dict]) -> list[dict]:
    """One record per pair: both readings, P(human chosen ≻ rejected) and what the judge's label makes of the pair:
    "kept" (it prefers the human-chosen reply), "swapped" (it prefers the rejected one) or "tie" (½ within ``TIE``)."""
    records = []
    for ex, j in zip(pairs, _judge_pairs(judge, pairs)):
        fate = "tie" if abs(j.prefer_a - 0.5) < TIE else "swapped" if j.prefer_a < 0.5 else "kept"
        records.append({"id": ex["id"], "p_human_chosen_first": j.p_a_first, "p_human_chosen_second": j.p_a_second,
                        "p_human_chosen": j.prefer_a, "label": fate})
    return records


def apply_labels(pairs: list[dict], records: list[dict]) -> tuple[list[dict], dict]:
    """(pairs, summary): ``pairs`` as ``records`` (``judge_labels``, in the same order) label them: kept as they are,
    swapped (chosen and rejected exchanged) or dropped (a tie). The summary counts them and gives the judge's
    agreement with the human labels on these pairs (ties half), its position bias and order agreement."""
    out = []
    for ex, r in zip(pairs, records, strict=True):
        if r["id"] != ex["id"]:
            raise ValueError(f"judge label {r['id']!r} is not for pair {ex['id']!r}: labels out of order.")
        if r["label"] == "kept":
            out.append(ex)
        elif r["label"] == "swapped":
            out.append({**ex, "chosen": ex["rejected"], "rejected": ex["chosen"]})
    count = {fate: sum(r["label"] == fate for r in records) for fate in ("kept", "swapped", "tie")}
    readings = [(r["p_human_chosen_first"], r["p_human_chosen_second"]) for r in records]
    summary = {"labels/n_pairs": len(pairs), "labels/kept": count["kept"], "labels/swapped": count["swapped"],
               "labels/ties": count["tie"], "labels/judge_agreement": (count["kept"] + 0.5 * count["tie"]) / max(len(pairs), 1),
               **{k.replace("judge/", "labels/judge_"): v for k, v in _bias(readings).items()}}
    return out, summary


def relabel(judge: Judge, pairs: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(pairs, records, summary): the pairs as the judge labels them (``judge_labels``, then ``apply_labels``). A
    pair whose human-rejected reply the judge prefers (P(chosen ≻ rejected) < ½, both orders averaged) is swapped; a
    tie (½ within ``TIE``, e.g. two equal replies) is dropped; the others are kept as they are."""
    records = judge_labels(judge, pairs)
    out, summary = apply_labels(pairs, records)
    return out, records, summary
