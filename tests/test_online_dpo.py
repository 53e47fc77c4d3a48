"""Iterative (online) DPO and the AI judge on the tiny model: pairing best against worst with ties counted; the
judge's reading of the two labels, both orders averaged (a judge with a known position bias, built on the real
tokenizer and chat template); online DPO raising an easy reward computed exactly; a run labelled by a judge from the
command line, its records with their rounds, ties, reference refreshes and compute. (The bandit oracle of iterative
DPO is in test_oracle.py.)"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from workbench import data, judge, logprobs, models, online_dpo, rewards, sampling, train
from workbench.runs import is_complete, load_run


def test_best_and_worst_are_paired_and_ties_counted():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 2.0, -1.0, 1.99])  # 3 prompts, k = 3
    pairs, ties = online_dpo.pair_best_and_worst(scores, 3, tie_margin=0.0)
    assert pairs == [(1, 0), (6, 7)] and ties == 1  # the second prompt's three samples tie
    pairs, ties = online_dpo.pair_best_and_worst(scores, 3, tie_margin=1.0)
    assert pairs == [(6, 7)] and ties == 2  # gaps 0.8 and 0 are ties now; 3.0 is not


def test_judge_scores_are_each_responses_mean_win_probability():
    class Fixed:  # P(a ≻ b) = 0.8 when a is the earlier response, for every pair
        def prefer(self, prompts, a, b):
            return torch.full((len(a),), 0.8)
    scores = online_dpo.judge_scores(Fixed(), [[]] * 3, ["x", "y", "z"], 3)
    assert scores.tolist() == pytest.approx([0.8, 0.5, 0.2])  # (0.8 + 0.8)/2, (0.2 + 0.8)/2, (0.2 + 0.2)/2


class KeywordJudgeLM(torch.nn.Module):
    """A stand-in for a judge LM with a known answer: the logit of label A minus that of B is s(A) − s(B) + 0.8,
    where s(reply) = +1 if the reply says "kindly", else −1; 0.8 is a position bias towards A."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.w = tokenizer, torch.nn.Parameter(torch.zeros(1))
        self.a, self.b = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(self.tokenizer))
        for i, row in enumerate(input_ids):
            text = self.tokenizer.decode(row[attention_mask[i].bool()])
            reply_a, reply_b = text.split("Reply A: ")[1].split("Reply B: ")
            s = [1.0 if "kindly" in r.split("Which reply")[0] else -1.0 for r in (reply_a, reply_b)]
            logits[i, -1, self.a] = s[0] - s[1] + 0.8
        return SimpleNamespace(logits=logits)


def _pair(i, chosen, rejected):
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}?"}],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}


def test_the_judge_reads_both_orders_and_cancels_its_position_bias(smollm_tokenizer):
    j = judge.Judge(KeywordJudgeLM(smollm_tokenizer), smollm_tokenizer, batch_size=2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pairs = [_pair(0, "I kindly decline.", "Here is how."), _pair(1, "Sure.", "I kindly refuse."), _pair(2, "No.", "Yes.")]
    summary, records = judge.agreement(j, pairs, n_bootstrap=50)
    # pair 0: p_A(chosen first) = σ(2.8), p_A(chosen second) = σ(−1.2); P(chosen ≻ rejected) = ½(σ(2.8) + 1 − σ(−1.2))
    assert records[0]["p_chosen_first"] == pytest.approx(sig(2.8), abs=1e-5)
    assert records[0]["p_chosen_second"] == pytest.approx(sig(-1.2), abs=1e-5)
    assert records[0]["p_chosen"] == pytest.approx(0.5 * (sig(2.8) + 1 - sig(-1.2)), abs=1e-5)
    assert records[1]["p_chosen"] < 0.5 and records[2]["p_chosen"] == pytest.approx(0.5, abs=1e-6)  # a tie: half
    assert [r["correct"] for r in records] == [1.0, 0.0, 0.5] and summary["judge/accuracy"] == pytest.approx(0.5)
    bias = (sig(2.8) + sig(-1.2) + sig(-1.2) + sig(2.8) + 2 * sig(0.8)) / 6 - 0.5
    assert summary["judge/position_bias"] == pytest.approx(bias, abs=1e-5)
    assert summary["judge/order_agreement"] == pytest.approx(2 / 3)  # the tie's two readings both say A
    # batched and one at a time agree (left padding), and P(a ≻ b) + P(b ≻ a) = 1 by construction
    prompts, a, b = [p["prompt"] for p in pairs], [p["chosen"][0]["content"] for p in pairs], [p["rejected"][0]["content"] for p in pairs]
    one = torch.cat([j.p_first(prompts[i:i + 1], a[i:i + 1], b[i:i + 1]) for i in range(3)])
    assert torch.allclose(j.p_first(prompts, a, b), one, atol=1e-6)
    assert torch.allclose(j.prefer(prompts, a, b) + j.prefer(prompts, b, a), torch.ones(3), atol=1e-6)


def test_a_tokenizer_without_single_token_labels_is_refused(smollm_tokenizer):
    class Odd:
        pad_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1, 2]
    with pytest.raises(ValueError, match="single tokens"):
        judge.Judge(KeywordJudgeLM(smollm_tokenizer), Odd())


@pytest.fixture(scope="module")
def peaked_tiny_dir(tmp_path_factory, smollm_tokenizer):
    return models.save_tiny_causal_lm(smollm_tokenizer, tmp_path_factory.mktemp("tiny-peaked-odpo"), seed=0, init_std=0.3)


def _expected_reward(model, tok, prompt_ids, token_set, temperature):
    """Exact E_π[reward] of a one-token response: Σ_{t ∈ set} π(t | prompt), averaged over prompts."""
    _, head = logprobs._backbone_and_head(model)
    with torch.no_grad():
        probs = [torch.softmax(head(logprobs.response_hidden(model, [p], torch.zeros(1, 1, dtype=torch.long),
                                                             torch.ones(1, 1, dtype=torch.bool), tok.pad_token_id)[0, 0]
                                    ).float() / temperature, -1)[token_set].sum() for p in prompt_ids]
    return torch.stack(probs).mean().item()


def test_online_dpo_raises_an_easy_reward_on_a_tiny_4bit_model(peaked_tiny_dir, hh_dir, tmp_path):
    """Reward = the one-token response lies in the even token ids; the expected reward is computed exactly before
    and after 6 rounds (16 prompts × 4 samples each, best against worst)."""
    token_set = torch.arange(0, 49152, 2)
    arm, cfg = train.make_config("online-dpo", model=str(peaked_tiny_dir), data_source=str(hh_dir), split="test",
                                 n_train=16, n_score=2, max_steps=6, per_device_train_batch_size=16,
                                 samples_per_prompt=4, max_new_tokens=1, learning_rate=3e-3, beta=0.1,
                                 max_prompt_length=64, runs_dir=str(tmp_path))
    assert arm == "online-dpo" and (cfg.rounds, cfg.prompts_per_round) == (6, 16)
    model, tok = models.load_policy(cfg.model)
    train_rows, _, _, _ = data.load_for_run(cfg.data, cfg.seed, tok)
    prompt_ids = sampling.encode_prompts(tok, [r["prompt"] for r in data.prompt_view(train_rows)], 64)
    before = _expected_reward(model, tok, prompt_ids, token_set, cfg.temperature)
    path = train.train(arm, cfg, reward_fn=rewards.TokenSetReward(token_set.tolist()))
    trained, _ = models.load_policy(cfg.model, adapter=str(path / "adapter"), trainable=False)
    after = _expected_reward(trained, tok, prompt_ids, token_set, cfg.temperature)
    assert after > before + 0.1, (before, after)
    run = load_run(path)
    assert list(run.metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert run.metrics["objective/kl"].iloc[0] == pytest.approx(0, abs=1e-4)  # round 1 samples from π = π_ref
    assert run.metrics["objective/kl"].iloc[-1] > 0.01  # the fixed reference: the policy drifts away from it


def test_online_dpo_labelled_by_a_judge_runs_from_the_command_line(tiny_model_dir, hh_dir, tmp_path):
    """labeller=judge (the tiny model as judge), k = 3, the reference refreshed every 2 rounds: a complete run folder
    whose records hold every round's pairs and samples, ties counted, judge calls in compute.json."""
    env = {**os.environ, "WORKBENCH_DTYPE": "float32"}
    args = ["online-dpo", "--model", str(tiny_model_dir), "--data-source", str(hh_dir), "--split", "test",
            "--n-train", "8", "--n-score", "2", "--max-steps", "3", "--per-device-train-batch-size", "4",
            "--samples-per-prompt", "3", "--max-new-tokens", "3", "--labeller", "judge", "--judge-model",
            str(tiny_model_dir), "--refresh-reference-every", "2", "--learning-rate", "1e-3", "--runs-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "workbench", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if is_complete(p)]
    assert path.name.startswith("online-dpo__default__s0__")
    run = load_run(path)
    assert run.metrics["reference/refreshed"].tolist() == [0, 0, 1]
    pairs, samples = run.records("online_pairs"), run.records("online_samples")
    assert len(samples) == 3 * 4 * 3 and set(samples["round"]) == {1, 2, 3}
    assert run.summary["train/pairs_kept"] == len(pairs) and run.summary["train/ties"] == 12 - len(pairs)
    assert list(run.metrics["pairs/kept"] + run.metrics["pairs/ties"]) == [4, 4, 4]
    for _, p in pairs.iterrows():  # the chosen response is the one the judge preferred
        assert p["chosen_label"] > p["rejected_label"]
        assert 0 <= p["chosen_label"] <= 1  # a mean win probability
    assert set(samples["paired_as"].dropna()) <= {"chosen", "rejected"}
    compute = json.loads((path / "compute.json").read_text())["tokens"]
    assert compute["generated"] > 0 and compute["reward_forward"] > 0, compute  # the judge's reading is counted
    assert json.loads((path / "config.json").read_text())["judge_principle"] == judge.DEFAULT_PRINCIPLE


def test_online_dpo_config_is_checked():
    for bad, msg in (({"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"),
                     ({"labeller": "human"}, "labeller must be"), ({"loss_type": "nope"}, "Unknown loss_type"),
                     ({"beta": 0.0}, "beta must be > 0"), ({"refresh_reference_every": 0}, "refresh_reference_every")):
        with pytest.raises(ValueError, match=msg):
            train.make_config("online-dpo", **bad)
    with pytest.raises(ValueError, match="needs a reward"):
        train.train("online-dpo", online_dpo.OnlineDPOArgs())
