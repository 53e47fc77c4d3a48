"""The measurements of an evaluation, each a function over a batch of prompts or pairs: a policy's samples with their
rewards, KL and implicit reward (``sample_and_score``, summarised by ``generation_summary``), the pairs
(``pair_summary``: ``scoring.pair_metrics``, the one pair measure the training-time look uses too, under the same
names), what the reward models say of the fixed texts (``reward_readings``), and an AI judge's agreement with the
human labels (``judge_agreement``). They take what they measure (models, reward functions) as arguments and write
nothing; ``evaluate.py`` runs them over run folders.
"""

from __future__ import annotations

from ..core import console, methods, stats
from ..modeling import models, scoring
from ..modeling.sampling import sample_completions
from .plan import EvalConfig, LengthBaseline

log = console.logger(__name__)


def reward_readings(proxy, gold, prompts: list[dict], pairs: list[dict]) -> dict:
    """What the reward models (None: left out) say of the evaluation's fixed texts, the same for every run and so
    computed once by ``evaluate_runs``: "summary", their accuracy on the pairs (``pairs/proxy_rm_accuracy``,
    ``pairs/gold_rm_accuracy``: how often the chosen response scores above the rejected one), and "chosen", their
    scores of each prompt's chosen response (``chosen_score``, ``chosen_gold_score``; for win rates)."""
    from ..modeling.rewards import score_replies

    out = {"summary": {}, "chosen": {}}
    chosen = [p["chosen"] for p in prompts]
    for fn, accuracy_key, chosen_key in ((proxy, "pairs/proxy_rm_accuracy", "chosen_score"),
                                         (gold, "pairs/gold_rm_accuracy", "chosen_gold_score")):
        if fn is not None:
            out["summary"][accuracy_key] = rm_accuracy(fn, pairs)
            out["chosen"][chosen_key] = score_replies(fn, [p["prompt"] for p in prompts], chosen, chosen).tolist()
    return out


def rm_accuracy(fn, pairs: list[dict]) -> float:
    from ..modeling.rewards import score_replies

    # each reply against the chosen one (the baseline a pairwise judge's reward compares with; a reward model ignores it)
    baselines = [ex["chosen"][0]["content"] for ex in pairs]
    c = score_replies(fn, [ex["prompt"] for ex in pairs], [ex["chosen"] for ex in pairs], baselines)
    r = score_replies(fn, [ex["prompt"] for ex in pairs], [ex["rejected"] for ex in pairs], baselines)
    return float(stats.wins(c.tolist(), r.tolist()).mean())  # a tie counts ½, as in every accuracy here


def generation_summary(gens: list[dict], cfg: EvalConfig) -> dict:
    """Means with bootstrap intervals over prompts, and the win rate against the chosen responses."""
    ids = [g["id"] for g in gens]
    out = {"n_prompts": len(set(ids)), "n_samples": len(gens)}
    for key, name in (("gold_score", "gold"), ("score", "proxy"), ("kl", "kl"), ("kl_t1", "kl_t1"),
                      ("response_tokens", "response_tokens")):
        if gens and gens[0].get(key) is not None:
            est, lo, hi = stats.bootstrap_mean([float(g[key]) for g in gens], ids, cfg.n_bootstrap, cfg.seed)
            out.update({f"eval/{name}": est, f"eval/{name}_lo": lo, f"eval/{name}_hi": hi})
    out["eval/ended"] = sum(g["ended"] for g in gens) / max(len(gens), 1)
    # signs of reward hacking beside the rewards: length (above), how often a reply ends, how varied the replies are
    out["eval/distinct2"] = stats.distinct_n([g["completion_token_ids"] for g in gens], 2) if gens else float("nan")
    if gens and gens[0].get("gold_score") is not None and gens[0].get("chosen_gold_score") is not None:
        wins = stats.wins([g["gold_score"] for g in gens], [g["chosen_gold_score"] for g in gens])
        dlen = [g["response_tokens"] - g["chosen_tokens"] for g in gens]  # tokens, the unit of every length metric
        out.update(stats.win_rate_summary(wins, dlen, ids, "win/chosen", cfg.n_bootstrap, cfg.seed))
    return out


def sample_and_score(model, tokenizer, prompts: list[dict], cfg: EvalConfig, proxy, gold, chosen_scores: dict,
                      beta: float) -> list[dict]:
    """A policy's samples of the evaluation prompts (``sampling.sample_completions``: per-token log π, log π_ref, the
    sampled KL), their proxy and gold rewards and implicit reward β·Σ_t log π/π_ref, beside the dataset's chosen
    response to the same prompt as the reward models judge it (``reward_readings``; for win rates)."""
    gens = sample_completions(model, tokenizer, prompts, n_samples=cfg.n_samples,
                              rewards={"score": proxy, "gold_score": gold}, max_prompt_length=cfg.max_prompt_length,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=cfg.seed, batch_size=cfg.batch_size)  # from inference.for_sampling(model)
    chosen = {p["id"]: p for p in prompts}
    for key, values in chosen_scores.items():
        for p, v in zip(prompts, values):
            p[key] = v
    for p in prompts:  # its length in tokens, as the samples' response_tokens count them (end of turn included)
        p["chosen_tokens"] = len(models.encode(tokenizer, p["prompt"], [{"role": "assistant", "content": p["chosen"]}])[1])
    for g in gens:
        p = chosen[g["id"]]
        g.update({"implicit_reward": beta * g["kl"], "chosen": p["chosen"], "chosen_chars": len(p["chosen"]),
                  "chosen_tokens": p["chosen_tokens"], "chosen_score": p.get("chosen_score"),
                  "chosen_gold_score": p.get("chosen_gold_score")})
    return gens


def policy_pairs(model, tokenizer, pairs: list[dict], cfg: EvalConfig, beta: float, logps_cache: dict | None,
                 keys: dict) -> list[dict]:
    """A policy's implicit reward on the first ``cfg.policy_pairs`` pairs, per pair and per token
    (``scoring.score_pairs``; ``keys``: ``plan.weights_keys`` of its run, for the log-prob cache), each record with
    the pair's texts beside its tokens for the inspector."""
    pairs = pairs[: cfg.policy_pairs]
    records = scoring.score_pairs(model, tokenizer, pairs, beta=beta, max_length=cfg.max_length, batch_size=None,
                                  cache=logps_cache, **keys)
    for r, ex in zip(records, pairs):
        r.update({"prompt": ex["prompt"], "chosen": ex["chosen"][0]["content"], "rejected": ex["rejected"][0]["content"]})
    return records


def pair_summary(records: list[dict], pairs: list[dict], length: LengthBaseline, method: str, cfg: EvalConfig) -> dict:
    """The pairs as the training-time look measures them (``scoring.pair_metrics``: one function, one set of names),
    beside the length-only baseline in the evaluation's one unit, with intervals and the accuracy's paired margin over
    the baseline. ``records`` gain each pair's lengths (``scoring.add_lengths``)."""
    scoring.add_lengths(records, pairs[: len(records)], length.tokenizer, length.rule)
    return scoring.pair_metrics(records, length.rule, prefix="pairs/", n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                reference_free=methods.of(method).implicit_reward == "avg-logp")


def judge_agreement(cfg: EvalConfig, eval_pairs: list[dict]) -> tuple[dict, list]:
    """The AI judge of ``cfg.judge_model`` on the evaluation's pairs: (summary, per-pair records), ``judge.agreement``."""
    from ..modeling.judge import Judge, agreement

    judge = Judge.load(cfg.judge_model, principle=cfg.judge_principle)
    summary, records = agreement(judge, eval_pairs, cfg.n_bootstrap, cfg.seed)
    log.info(f"[evaluate] judge {cfg.judge_model}: agreement with the human labels {summary['judge/accuracy']:.3f} "
             f"[{summary['judge/accuracy_lo']:.3f}, {summary['judge/accuracy_hi']:.3f}] on {len(eval_pairs)} pairs, "
             f"position bias {summary['judge/position_bias']:+.3f}")
    return summary, records
