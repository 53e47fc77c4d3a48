"""Reward functions for the RLHF arms: a trained reward model (a ``train("reward")`` run folder, or any
sequence-classification model by hub name or path) wrapped as one callable that PPO, TRL's RLOO/GRPO and the
evaluation all use; the AI judge as a pairwise reward (``JudgeReward``); and a synthetic reward for tests.

Every caller hands a reward function the prompts, the completions and ``baseline``: the dataset's chosen reply to
each prompt (``data.prompt_view``), as TRL hands reward functions the prompt dataset's columns. A reward model
ignores it; the judge compares each completion with it.

The proxy reward is what an RL arm optimises; a *gold* reward is one it never sees (another backbone, a disjoint
half of the training prompts, or a hub reward model), so over-optimisation of the proxy can be measured
(Gao et al. 2022, arXiv:2210.10760). A reward is named by a *spec* everywhere (``load_reward``, ``SPECS``): a reward
run folder, a sequence classifier by hub name or local path, "judge", or a built-in gold, "vader" (``VaderReward``:
the sentiment of the reply, a gold that is known exactly and costs nothing, the embedded default of the known-gold
study; see docs/gold.md for what it measures and how it is hacked).

Every score a reward returns is checked (``check_scores``): a NaN or an infinity names the sample that gave it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import models
from .judge import Judge
from .scoring import reward_scores

JUDGE = "judge"  # reward_model="judge": the AI judge (the config's judge_model) is the reward
VADER = {"vader": "compound", "vader:compound": "compound", "vader:posneg": "posneg"}  # built-in golds: spec -> variant
SPECS = (*VADER, JUDGE, "a reward run folder", "a sequence classifier: a hub name (org/model) or a local directory")


def _texts(completions: list) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def _as_messages(prompt, completion) -> list[dict]:
    """TRL hands reward functions either conversations (lists of messages) or plain strings."""
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return prompt + completion


class RewardFunction:
    """A scalar reward r(x, y) from a sequence classifier, batched and length-bucketed.

    ``score(prompts, completions) -> (n,) tensor`` for our own code; calling it with TRL's keyword arguments
    (``prompts=..., completions=..., **columns``) returns a list of floats, so it is also a TRL reward function.
    """

    def __init__(self, model, tokenizer, name: str = "reward", max_length: int = 512, batch_size: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.__name__ = name  # TRL names the logged metric rewards/<__name__>
        self.max_length, self.batch_size = max_length, batch_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    def score(self, prompts: list, completions: list, baselines: list[str] | None = None) -> torch.Tensor:
        convs = [_as_messages(p, c) for p, c in zip(prompts, completions, strict=True)]
        return reward_scores(self.model, self.tokenizer, convs, max_length=self.max_length, batch_size=self.batch_size)

    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        return self.score(prompts, completions).tolist()


class JudgeReward:
    """The AI judge as a reward (RLAIF, Lee et al. 2023, arXiv:2309.00267; ``judge.Judge``):

        r(x, y) = log P(y ≻ y_b | x) − log P(y_b ≻ y | x),

    the log-odds, both orders averaged, that the completion y beats y_b, the dataset's human-chosen reply to the
    prompt x. Pairwise rather than a pointwise rubric score: the question is the one the judge answers as a labeller,
    and a small model's digit scores are poorly calibrated (see ``judge``'s docstring). The chosen reply against
    itself scores 0, so the reward reads as "better or worse than the human-preferred answer". Clamped to
    ±9.2 (P in [1e-4, 1 − 1e-4])."""

    def __init__(self, judge: Judge, name: str = JUDGE):
        self.judge, self.model, self.tokenizer, self.__name__ = judge, judge.model, judge.tokenizer, name

    def score(self, prompts: list, completions: list, baselines: list[str] | None = None) -> torch.Tensor:
        if baselines is None or any(b is None for b in baselines):
            raise ValueError("The judge's reward compares each completion with the dataset's chosen reply to its prompt; "
                             "call it with baseline=[...] (the prompt rows of data.prompt_view carry it).")
        prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return self.judge.score(prompts, _texts(completions), _texts(baselines))

    def __call__(self, prompts: list, completions: list, baseline: list[str] | None = None, **_) -> list[float]:
        return self.score(prompts, completions, baseline).tolist()


class VaderReward:
    """VADER sentiment of the reply as a reward (Hutto & Gilbert 2014, ICWSM; the ``vaderSentiment`` package, MIT):
    a lexicon of ~7,500 rated words and five rules (negation, intensifiers, "but", capitals, punctuation), so it
    is deterministic, needs no model and scores a reply in ~0.1 ms. The embedded default gold of the known-gold
    study, in the role the sentiment classifier plays in the DPO paper's controlled-sentiment experiment
    (Rafailov et al. 2023, arXiv:2305.18290 §6.1).

    ``variant="compound"`` (spec "vader"): VADER's normalised compound score in [−1, 1]. ``variant="posneg"``
    ("vader:posneg"): the share of positive minus the share of negative words, pos − neg, in [−1, 1]; it saturates
    less than the compound on long, mildly positive replies. The prompt is not read: this gold measures the
    *sentiment of the reply*, not whether it is harmless or helpful (docs/gold.md). Scores are cached per text."""

    def __init__(self, variant: str = "compound", name: str = "gold"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if variant not in ("compound", "posneg"):
            raise ValueError(f"VADER variant must be 'compound' or 'posneg' (got {variant!r}).")
        self.variant, self.__name__, self.model = variant, name, None  # no model: nothing to count in compute.json
        self._analyzer, self._cache = SentimentIntensityAnalyzer(), {}

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            if t not in self._cache:
                s = self._analyzer.polarity_scores(t)
                self._cache[t] = s["compound"] if self.variant == "compound" else s["pos"] - s["neg"]
            out.append(self._cache[t])
        return torch.tensor(out, dtype=torch.float32)

    def score(self, prompts: list, completions: list, baselines: list[str] | None = None) -> torch.Tensor:
        return self.score_texts(_texts(completions))

    def __call__(self, prompts: list | None = None, completions: list | None = None, **_) -> list[float]:
        return self.score(prompts, completions).tolist()


def check_scores(scores: torch.Tensor, texts: list, name: str) -> torch.Tensor:
    """``scores`` if every one is finite; else a ValueError naming the reward and the first sample that gave a NaN or
    an infinity, so a broken reward never trains or measures anything silently."""
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        text = texts[i] if i < len(texts) else None
        text = text[-1]["content"] if isinstance(text, list) else text
        raise ValueError(f"reward '{name}' returned {scores[i].item()} for sample {i} of {len(scores)} "
                         f"({len(bad)} non-finite in all): {str(text)[:200]!r}. Check the reward function on this text.")
    return scores


def is_builtin(spec: str | None) -> bool:
    """Is ``spec`` a reward that needs no model files: a built-in gold ("vader", ...)?"""
    return isinstance(spec, str) and spec in VADER


def load_reward(spec: str, name: str | None = None, max_length: int = 512, batch_size: int | None = None,
                judge_model: str | None = None, judge_principle: str | None = None):
    """A reward function from ``spec``: a built-in gold ("vader", "vader:posneg": ``VaderReward``), a reward-model run
    folder (``train("reward", ...)``; its ``model/`` or ``adapter/`` on the recorded backbone), a sequence-classification
    model by hub name or local path, or "judge": ``JudgeReward`` asking ``judge_model`` (None: the embedded policy) with
    ``judge_principle``. A spec that is none of these (no such folder, no "org/" of a hub name) is an error listing
    the choices (``SPECS``)."""
    if spec in VADER:
        return VaderReward(VADER[spec], name or "gold")
    if spec == JUDGE:
        judge = Judge.load(judge_model, principle=judge_principle, batch_size=batch_size)
        return JudgeReward(judge, name or JUDGE)
    path = Path(spec)
    if (path / "config.json").exists() and ((path / "model").is_dir() or (path / "adapter").is_dir()):
        saved = json.loads((path / "config.json").read_text())
        if (path / "model").is_dir():  # a fully fine-tuned backbone (the small encoder)
            cfg = models.ModelConfig(model_name_or_path=str(path / "model"), load_in_4bit=False, use_peft=False)
            model, tok = models.load_reward_model(cfg)
        else:  # LoRA adapter + score head on the recorded (possibly 4-bit) backbone
            model, tok = models.load_reward_model(models.ModelConfig.from_saved(saved["model"]), adapter=str(path / "adapter"),
                                                  trainable=False)
        return RewardFunction(model, tok, name or path.name.split("__")[0], max_length, batch_size)
    if path.exists() and not (path / "config.json").exists():
        raise FileNotFoundError(f"'{spec}' is neither a reward-model run folder (config.json + model/ or adapter/) "
                                "nor a model directory.")
    if not path.exists() and "/" not in spec and not spec.startswith("embedded:"):
        import difflib

        near = difflib.get_close_matches(spec, [*VADER, JUDGE], n=1)
        raise ValueError(f"Unknown reward '{spec}'" + (f" (did you mean '{near[0]}'?)" if near else "") +
                         f". A reward is one of: {', '.join(SPECS)}.")
    cfg = models.ModelConfig(model_name_or_path=spec, load_in_4bit=False, use_peft=False)
    model, tok = models.load_reward_model(cfg)
    return RewardFunction(model, tok, name or "reward", max_length, batch_size)


def score_replies(fn, prompts: list, replies: list, baselines: list[str]) -> torch.Tensor:
    """``fn.score`` of the replies, handing each prompt's baseline reply to reward objects that take one
    (``baselines``: ``RewardFunction``, ``JudgeReward``), and not to one of your own whose ``score(prompts,
    completions)`` takes none."""
    import inspect

    params = inspect.signature(fn.score).parameters
    if "baselines" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        scores = fn.score(prompts, replies, baselines=baselines)
    else:
        scores = fn.score(prompts, replies)
    return check_scores(torch.as_tensor(scores, dtype=torch.float32), replies, getattr(fn, "__name__", "reward"))


class TokenSetReward:
    """Synthetic reward for tests: the fraction of response tokens in ``token_ids``. Scores token ids, not text,
    so it is exact and needs no model; as a TRL reward function it reads ``completion_ids``."""

    def __init__(self, token_ids, name: str = "token_set"):
        self.token_ids = torch.as_tensor(sorted(set(int(t) for t in token_ids)))
        self.__name__ = name

    def score_ids(self, completion_ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor([torch.isin(torch.tensor(c, dtype=torch.long), self.token_ids).float().mean().item()
                             if len(c) else 0.0 for c in completion_ids])

    def __call__(self, prompts=None, completions=None, completion_ids=None, **_) -> list[float]:
        return self.score_ids(completion_ids).tolist()
