"""Iterative (online) DPO, written here: the bridge between the two camps. Like the RL arms it samples its own
responses and learns from a reward model (or an AI judge); like DPO it learns from pairs with the DPO family's
losses, against a reference. Readable top to bottom: one round samples, labels, pairs and trains
(``OnlineDPOTrainer.train``).

A round (Xu et al. 2024, arXiv:2404.10719, "Is DPO superior to PPO for LLM alignment?", iterative DPO on
HH-RLHF; Guo et al. 2024, arXiv:2402.04792, online AI feedback; Xiong et al. 2024, arXiv:2312.11456, iterative DPO
as a KL-regularised contextual bandit):
  1. sample k ≥ 2 responses to each of the round's prompts from the current policy, with the RL arms' decoding
     (``sampling.generate``: temperature, cut after the first EOS);
  2. label them: the reward model's score of each (``labeller="reward"``), or the AI judge's (``judge.Judge``)
     mean probability that the response beats each of the other k − 1 (``labeller="judge"``, both orders);
  3. pair the best with the worst of each prompt's k; a prompt whose best and worst labels differ by no more than
     ``tie_margin`` gives no pair (a tie: dropped and counted);
  4. train the DPO loss (any ``losses.PAIRED_LOSSES`` type) on the round's pairs for ``epochs_per_round`` passes,
     the reference's log-probs computed once per round;
  5. every ``refresh_reference_every`` rounds the reference becomes the current policy (a frozen copy of the
     adapter, "ref"); with None it stays the starting policy (the SFT adapter, or the base) for every round.

On the analytic bandit (``bandit.train_tabular_iterative_dpo``) the fixed-reference variant ends each round at
π* ∝ π_ref·exp(r/β) and the refreshed one at π_ref·exp(t·r/β), moving on towards the reward's argmax.

Memory: one base model; the policy is the adapter "default", the reference the frozen adapter "ref" (the SFT
adapter, or after a refresh the policy's copy) or the base with adapters disabled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import console
from ..modeling import data
from ..modeling.logprobs import reference_adapter, response_logprobs
from ..modeling.runs import Run
from ..modeling.sampling import baselines, call_reward, encode_prompts, generate, sample_logps
from . import losses
from .config import RLFields, RunFields, check_beta, check_judge_fields, snapshot_steps

log = console.logger(__name__)


@dataclass
class OnlineDPOArgs(RLFields, RunFields):
    """Iterative DPO's settings, beside the fields every arm has (``config.RunFields``, ``config.RLFields``)."""

    data: data.DataConfig = field(default_factory=lambda: data.DataConfig(n_score=16))
    # --- rounds of sampling
    rounds: int = 4  # rounds of sampling, labelling and DPO (the common name max_steps maps here)
    prompts_per_round: int = 16  # prompts sampled each round (the common name per_device_train_batch_size maps here)
    samples_per_prompt: int = 2  # k ≥ 2 responses per prompt; the pair is the best and the worst
    max_new_tokens: int = 64  # the longest response sampled, in tokens
    temperature: float = 0.7  # as the RL arms sample
    # --- labels
    # "reward": reward_model scores each response; "judge": the AI judge compares them (it asks ``judge_model``
    # with ``judge_principle``, fields every arm has: config.RunFields)
    labeller: str = "reward"
    tie_margin: float = 0.0  # a prompt whose best and worst labels differ by <= this gives no pair (counted)
    # --- DPO on each round's pairs
    loss_type: str = "sigmoid"  # any of losses.PAIRED_LOSSES
    beta: float = 0.1  # DPO's β (arXiv:2305.18290 §6), the scale of the implicit reward against the reference
    label_smoothing: float = 0.0  # robust, exo_pair, aot (as TRL's DPOConfig)
    learning_rate: float = 5e-6  # as the DPO arm
    epochs_per_round: int = 1  # passes over each round's pairs
    batch_size: int = 4  # pairs per gradient step
    max_grad_norm: float = 1.0  # gradient clipping
    refresh_reference_every: int | None = None  # None: the reference stays the starting policy

    def __post_init__(self):
        check_beta("beta", self.beta)
        check_judge_fields(self)
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to make a pair (got {self.samples_per_prompt}).")
        if self.labeller not in ("reward", "judge"):
            raise ValueError(f"labeller must be 'reward' or 'judge' (got {self.labeller!r}).")
        if self.loss_type not in losses.PAIRED_LOSSES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}. Known: {', '.join(losses.PAIRED_LOSSES)}.")
        for name in ("rounds", "prompts_per_round", "epochs_per_round", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)}).")
        if self.refresh_reference_every is not None and self.refresh_reference_every < 1:
            raise ValueError(f"refresh_reference_every must be >= 1 or None (got {self.refresh_reference_every}).")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); online DPO samples its responses.")


@dataclass
class RoundsResult:
    """What ``OnlineDPOTrainer.train`` returns, with the names of TRL's ``TrainOutput``."""

    global_step: int  # gradient steps taken
    training_loss: float  # mean loss over the steps
    metrics: dict  # {"train_runtime": seconds}


def pair_best_and_worst(scores: Tensor, k: int, tie_margin: float) -> tuple[list[tuple[int, int]], int]:
    """([(chosen, rejected) sample indices], ties): per prompt (k consecutive samples), its best and worst sample;
    a prompt whose best and worst scores differ by <= ``tie_margin`` gives no pair and counts as a tie."""
    pairs, ties = [], 0
    for p in range(len(scores) // k):
        s = scores[p * k : (p + 1) * k]
        best, worst = int(s.argmax()), int(s.argmin())
        if s[best] - s[worst] <= tie_margin:
            ties += 1
            continue
        pairs.append((p * k + best, p * k + worst))
    return pairs, ties


def judge_scores(judge, prompts: list[list[dict]], texts: list[str], k: int) -> tuple[Tensor, list[dict]]:
    """((n·k,) scores, judgements): each response's mean probability, by the judge (both orders), of beating the other
    k − 1 responses to its prompt, a Borda count of the pairwise preferences (for k = 2, P(y1 ≻ y2) and its
    complement); and every pairwise judgement read (samples a, b of prompt p: both readings and P(a ≻ b))."""
    index = [(p * k + i, p * k + j) for p in range(len(texts) // k) for i in range(k) for j in range(i + 1, k)]
    judged = judge.judge([prompts[a // k] for a, _ in index], [texts[a] for a, _ in index], [texts[b] for _, b in index])
    wins = torch.zeros(len(texts))
    for (a, b), j in zip(index, judged):
        wins[a] += j.prefer_a
        wins[b] += 1 - j.prefer_a
    judgements = [{"prompt_index": a // k, "a": a % k, "b": b % k, "p_a_first": j.p_a_first,
                   "p_a_second": j.p_a_second, "p_a": j.prefer_a} for (a, b), j in zip(index, judged)]
    return wins / (k - 1), judgements


class OnlineDPOTrainer:
    """The loop, plugged into ``train.train`` as a TRL trainer is (``train()``; its summary is added to the run's).

    ``reward_fn``: a TRL-style reward function (``labeller="reward"``); ``judge``: a ``judge.Judge``
    (``labeller="judge"``); ``gold_fn``: measured only. Every round logs its metrics (step = round) and keeps its
    samples and pairs as records (``records/online_samples.jsonl``, ``records/online_pairs.jsonl``, with the round), and
    with the judge every pairwise reading (``records/online_judgements.jsonl``: samples a and b, both orders)."""

    @classmethod
    def build(cls, cfg: OnlineDPOArgs, train_rows: list[dict], run: Run, reward_fn=None, gold_fn=None):
        """(model, tokenizer, trainer) for ``train.train``: the policy (adapter "default") and its reference ("ref",
        the SFT adapter, frozen; without an SFT run, the base), and with ``labeller="judge"`` the judge: the reward's
        own judge when the reward is that judge, else one of ``cfg.judge_model``."""
        from pathlib import Path

        from ..modeling import models
        from ..modeling.judge import Judge
        from ..modeling.rewards import JudgeReward

        sft_adapter = str(Path(cfg.sft_run) / "adapter") if cfg.sft_run else None
        model, tokenizer = models.load_policy(cfg.model, adapter=sft_adapter)
        if sft_adapter:
            model.load_adapter(sft_adapter, adapter_name="ref", is_trainable=False)
            model.set_adapter("default")
        judge = None
        if cfg.labeller == "judge":
            judge = (reward_fn.judge if isinstance(reward_fn, JudgeReward) and cfg.reward_model == "judge" else
                     Judge.load(cfg.judge_model, principle=cfg.judge_principle))
        return model, tokenizer, cls(cfg, model, tokenizer, data.prompt_view(train_rows), run, reward_fn, gold_fn,
                                     judge)

    def __init__(self, cfg: OnlineDPOArgs, model, tokenizer, prompts: list[dict], run: Run, reward_fn=None,
                 gold_fn=None, judge=None):
        if not prompts:
            raise ValueError("No training prompts left after the held-out split; see data_report.json.")
        if (reward_fn if cfg.labeller == "reward" else judge) is None:
            raise ValueError(f"labeller={cfg.labeller!r} needs a {'reward function' if cfg.labeller == 'reward' else 'judge'}.")
        self.cfg, self.model, self.tokenizer, self.prompts, self.run = cfg, model, tokenizer, prompts, run
        self.reward_fn, self.gold_fn, self.judge = reward_fn, gold_fn, judge
        self.summary = {"train/rounds": cfg.rounds, "train/prompts": len(prompts),  # samples the labeller scored:
                        "train/reward_queries": cfg.rounds * cfg.prompts_per_round * cfg.samples_per_prompt}

    def _refresh_reference(self) -> None:
        """The reference becomes the current policy: the adapter "ref" (created if the run started from the base)
        takes the policy adapter's weights, frozen."""
        model = self.model
        if "ref" not in model.peft_config:
            model.add_adapter("ref", model.peft_config["default"])
            model.set_adapter("default")
        policy = {n.replace(".default.", ".ref."): p for n, p in model.named_parameters() if ".default." in n}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".ref." in n:
                    p.copy_(policy[n])
                    p.requires_grad_(False)

    def _sequence_logps(self, prompt_ids, response, mask) -> Tensor:
        lp, _ = response_logprobs(self.model, prompt_ids, response, mask, self.tokenizer.pad_token_id, 1.0)
        return lp.sum(1)

    def _round_logps(self, prompt_ids, response, mask, k: int) -> Tensor:
        """(n·k,) sequence log-probs of a round's samples (k consecutive rows per prompt), without gradients, each
        prompt run once for its k samples (``sampling.sample_logps``)."""
        groups = [list(range(i * k, (i + 1) * k)) for i in range(len(prompt_ids))]
        rows = [p for p in prompt_ids for _ in range(k)]
        per_token = sample_logps(self.model, rows, response, mask, groups, self.tokenizer.pad_token_id, 1.0)
        return torch.stack([t.float().sum() for t in per_token])

    def train(self) -> RoundsResult:
        cfg, model, tokenizer, run, k = self.cfg, self.model, self.tokenizer, self.run, self.cfg.samples_per_prompt
        params = [p for n, p in model.named_parameters() if ".default." in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
        model.eval()  # dropout off, as in PPO: the log-probs trained on are those the samples were drawn from
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        samples, pair_records, judgements, step_losses, steps = [], [], [], [], 0
        t_loop = time.time()
        snapshot_at = set(snapshot_steps(cfg.rounds, cfg.snapshots))
        for rnd in range(cfg.rounds):
            refreshed = bool(cfg.refresh_reference_every and rnd > 0 and rnd % cfg.refresh_reference_every == 0)
            if refreshed:
                self._refresh_reference()
            rows = [self.prompts[order[(rnd * cfg.prompts_per_round + j) % len(order)]] for j in range(cfg.prompts_per_round)]
            prompts = [r["prompt"] for r in rows for _ in range(k)]  # k samples per prompt, consecutive
            unique_ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)
            prompt_ids = [p for p in unique_ids for _ in range(k)]  # each sample's prompt

            # --- 1. sample k responses per prompt from the current policy (one prefill per prompt)
            t0 = time.time()
            response, mask, ended = generate(model, tokenizer, unique_ids, cfg.max_new_tokens, cfg.temperature,
                                             n_samples=k)
            t_gen = time.time() - t0
            texts = tokenizer.batch_decode(response, skip_special_tokens=True)

            # --- 2. label them; the sampled KL to the reference (as the RL arms log it)
            t0 = time.time()
            with torch.no_grad():
                base = baselines([rows[i // k] for i in range(len(texts))])
                if cfg.labeller == "reward":
                    scores = call_reward(self.reward_fn, prompts, texts, response, mask, base)
                else:  # every pairwise reading kept: P(a ≻ b) for samples a, b of one prompt
                    scores, read = judge_scores(self.judge, prompts, texts, k)
                    judgements += [{"round": rnd + 1, "id": rows[j.pop("prompt_index")]["id"], **j} for j in read]
                gold = call_reward(self.gold_fn, prompts, texts, response, mask, base) if self.gold_fn else None
                logps = self._round_logps(unique_ids, response, mask, k)
                with reference_adapter(model):
                    ref_logps = self._round_logps(unique_ids, response, mask, k)
            t_label = time.time() - t0

            # --- 3. best vs worst of each prompt's k; ties dropped and counted
            pairs, ties = pair_best_and_worst(scores, k, cfg.tie_margin)

            # --- 4. DPO on the round's pairs (reference log-probs from step 2: the reference is fixed in a round)
            t0 = time.time()
            round_stats: dict[str, float] = {}
            for _ in range(cfg.epochs_per_round):
                perm = torch.randperm(len(pairs), generator=generator).tolist()
                for start in range(0, len(pairs), cfg.batch_size):
                    batch = [pairs[i] for i in perm[start : start + cfg.batch_size]]
                    c, r = [a for a, _ in batch], [b for _, b in batch]
                    both = c + r
                    seq = self._sequence_logps([prompt_ids[i] for i in both], response[both], mask[both])
                    lengths = mask[both].sum(1).float()
                    loss, _, chosen_rewards, rejected_rewards = losses.preference_loss(
                        cfg.loss_type, losses.PairLogps(seq[: len(c)], seq[len(c):], ref_logps[c].to(seq.device),
                                                        ref_logps[r].to(seq.device), lengths[: len(c)].to(seq.device),
                                                        lengths[len(c):].to(seq.device)),
                        cfg.beta, label_smoothing=cfg.label_smoothing)  # each loss takes the options it uses
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    steps += 1
                    step_losses.append(loss.item())
                    for key, v in (("loss", loss.item()), ("grad_norm", grad_norm.item()),
                                   ("rewards/margins", (chosen_rewards - rejected_rewards).mean().item()),
                                   ("rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean().item())):
                        round_stats.setdefault(key, []).append(v)
            t_train = time.time() - t0

            # --- 5. bookkeeping: per-round metrics, samples and pairs as records
            kl = logps - ref_logps
            metrics = {
                "objective/scores": scores.mean().item(),
                **({"objective/gold_scores": gold.mean().item()} if gold is not None else {}),
                "objective/kl": kl.mean().item(),
                "pairs/kept": len(pairs), "pairs/ties": ties,
                "pairs/label_gap": (sum((scores[a] - scores[b]).item() for a, b in pairs) / len(pairs)) if pairs else 0.0,
                **{f"train/{key}": sum(v) / len(v) for key, v in round_stats.items()},
                "lengths/response_tokens": mask.sum(1).float().mean().item(),
                "val/num_eos_tokens": ended.sum().item(),
                "reference/refreshed": int(refreshed),
                "time/generation_s": t_gen, "time/labelling_s": t_label, "time/training_s": t_train,
                "tokens/generated_per_s": mask.sum().item() / max(t_gen, 1e-9),
            }
            run.log(metrics, step=rnd + 1)
            kept = {i: ("chosen" if j == 0 else "rejected") for pair in pairs for j, i in enumerate(pair)}
            for i in range(len(texts)):
                m = mask[i]
                samples.append({"round": rnd + 1, "id": rows[i // k]["id"], "sample": i % k, "prompt": prompts[i],
                                "completion": texts[i], "completion_token_ids": response[i][m].tolist(),
                                "response_tokens": int(m.sum()), "ended": ended[i].item(), "label": scores[i].item(),
                                "gold_score": None if gold is None else gold[i].item(), "kl": kl[i].item(),
                                "paired_as": kept.get(i)})
            for a, b in pairs:
                pair_records.append({"round": rnd + 1, "id": rows[a // k]["id"], "prompt": prompts[a],
                                     "chosen": texts[a], "rejected": texts[b], "chosen_label": scores[a].item(),
                                     "rejected_label": scores[b].item(),
                                     "chosen_kl": kl[a].item(), "rejected_kl": kl[b].item(),
                                     "chosen_token_ids": response[a][mask[a]].tolist(),
                                     "rejected_token_ids": response[b][mask[b]].tolist()})
            if rnd + 1 in snapshot_at:  # the policy part-way, for the reward–KL frontier
                run.save_snapshot(model, rnd + 1)
            log.info(f"[online_dpo] round {rnd + 1}/{cfg.rounds}: label {metrics['objective/scores']:.3f} "
                     f"kl {metrics['objective/kl']:.3f}, {len(pairs)} pairs ({ties} ties) ({t_gen:.1f}s gen, "
                     f"{t_label:.1f}s label, {t_train:.1f}s train)")
        run.write_records("online_samples", samples)
        run.write_records("online_pairs", pair_records)
        if judgements:
            run.write_records("online_judgements", judgements)
        self.summary["train/pairs_kept"] = len(pair_records)
        self.summary["train/ties"] = cfg.rounds * cfg.prompts_per_round - len(pair_records)
        return RoundsResult(steps, sum(step_losses) / max(len(step_losses), 1),
                            {"train_runtime": round(time.time() - t_loop, 1)})
