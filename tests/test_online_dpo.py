"""Iterative (online) DPO and the AI judge on the tiny model: pairing best against worst with ties counted; the
judge's reading of the two labels, both orders averaged (a judge with a known position bias, built on the real
tokenizer and chat template); online DPO raising an easy reward computed exactly; a run labelled by a judge from the
command line, its records with their rounds, ties, reference refreshes and compute. (The bandit oracle of iterative
DPO is in test_oracle.py.)"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from workbench.modeling import data, judge, logprobs, models, rewards, sampling, sources
from workbench.training import online_dpo, train
from workbench.modeling.runs import is_complete, load_run


def test_best_and_worst_are_paired_and_ties_counted():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 2.0, -1.0, 1.99])  # 3 prompts, k = 3
    pairs, ties = online_dpo.pair_best_and_worst(scores, 3, tie_margin=0.0)
    assert pairs == [(1, 0), (6, 7)] and ties == 1  # the second prompt's three samples tie
    pairs, ties = online_dpo.pair_best_and_worst(scores, 3, tie_margin=1.0)
    assert pairs == [(6, 7)] and ties == 2  # gaps 0.8 and 0 are ties now; 3.0 is not


def test_judge_scores_are_each_responses_mean_win_probability():
    class Fixed:  # P(a ≻ b) = 0.8 when a is the earlier response, for every pair (readings 0.9 and 0.3)
        def judge(self, prompts, a, b):
            return [judge.JudgedPair(0.9, 0.3, 0.8) for _ in a]
    scores, read = online_dpo.judge_scores(Fixed(), [[]] * 6, ["x", "y", "z", "u", "v", "w"], 3)
    # (0.8 + 0.8)/2, (0.2 + 0.8)/2, (0.2 + 0.2)/2 for each of the two prompts
    assert scores.tolist() == pytest.approx([0.8, 0.5, 0.2] * 2)
    # every pairwise reading kept, by prompt and sample: 3 pairs per prompt for k = 3
    assert [(r["prompt_index"], r["a"], r["b"]) for r in read] == [(p, a, b) for p in (0, 1) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert all((r["p_a_first"], r["p_a_second"], r["p_a"]) == (0.9, 0.3, 0.8) for r in read)


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


def test_relabel_swaps_what_the_judge_prefers_the_other_way_and_drops_ties(smollm_tokenizer):
    j = judge.Judge(KeywordJudgeLM(smollm_tokenizer), smollm_tokenizer)
    pairs = [_pair(0, "I kindly decline.", "Here is how."), _pair(1, "Sure.", "I kindly refuse."), _pair(2, "No.", "No.")]
    out, records, summary = judge.relabel(j, pairs)
    assert [r["label"] for r in records] == ["kept", "swapped", "tie"]
    assert records[0]["p_human_chosen"] > 0.5 > records[1]["p_human_chosen"]
    assert [ex["id"] for ex in out] == ["p0", "p1"] and out[0] == pairs[0]
    assert (out[1]["chosen"], out[1]["rejected"]) == (pairs[1]["rejected"], pairs[1]["chosen"])
    assert out[1]["prompt"] == pairs[1]["prompt"] and pairs[1]["chosen"][0]["content"] == "Sure."  # input untouched
    assert (summary["labels/kept"], summary["labels/swapped"], summary["labels/ties"]) == (1, 1, 1)
    assert summary["labels/judge_agreement"] == pytest.approx(0.5)  # 1 agreed, 1 not, a tie counts half
    assert summary["labels/judge_agreement"] == judge.agreement(j, pairs, n_bootstrap=10)[0]["judge/accuracy"]


def test_dpo_trains_on_the_pairs_as_the_judge_labels_them(tiny_model_dir, hh_pairs, tmp_path, monkeypatch):
    """pair_labels="judge" (the tiny model as judge): the trainer gets the judge's labels. Each pair comes with its
    mirror (same prompt, replies exchanged), so exactly one of the two is swapped whatever the judge thinks; a pair of
    two equal replies is a tie and dropped. The held-out pairs keep the human labels; the judge's tokens are counted."""
    base = hh_pairs[:4]
    mirrors = [{**ex, "id": ex["id"] + "-m", "chosen": ex["rejected"], "rejected": ex["chosen"]} for ex in base]
    same = {**hh_pairs[4], "id": "same", "rejected": hh_pairs[4]["chosen"]}
    seen = []
    real_dataset = train._dataset
    monkeypatch.setattr(train, "_dataset", lambda view, rows, seed=0: seen.extend(rows) or real_dataset(view, rows, seed))
    cfg = train.DPOArgs(model=models.ModelConfig(model_name_or_path=str(tiny_model_dir)),
                        data=train.DataConfig(heldout_fraction=0.3, n_score=2, max_length=200), runs_dir=str(tmp_path),
                        max_steps=1, per_device_train_batch_size=2, max_length=200, pair_labels="judge",
                        judge_model=str(tiny_model_dir))
    path = train.train("dpo", cfg, pairs=base + mirrors + [same])
    run = load_run(path)
    split = json.loads((path / "split.json").read_text())
    labels = run.records("judge_labels").set_index("id")
    assert list(labels.index) == split["train_ids"] and split["heldout_ids"]  # every training pair, none held out
    for ex in base:
        if ex["id"] in labels.index:  # a pair and its mirror share their prompt, so their side of the split
            assert {labels.loc[ex["id"], "label"], labels.loc[ex["id"] + "-m", "label"]} == {"kept", "swapped"}
            assert labels.loc[ex["id"], "p_human_chosen"] == pytest.approx(1 - labels.loc[ex["id"] + "-m", "p_human_chosen"], abs=1e-5)
    if "same" in labels.index:
        assert labels.loc["same", "label"] == "tie"
    # the trainer saw the kept pairs as they were and the swapped ones exchanged; ties are gone
    original = {ex["id"]: ex for ex in base + mirrors + [same]}
    assert [r["id"] for r in seen] == [i for i in labels.index if labels.loc[i, "label"] != "tie"]
    for r in seen:
        swapped = labels.loc[r["id"], "label"] == "swapped"
        assert r["chosen"] == original[r["id"]]["rejected" if swapped else "chosen"]
    assert run.summary["labels/swapped"] == (labels["label"] == "swapped").sum() >= 1
    assert run.summary["train/pairs"] == len(seen)
    tokens = json.loads((path / "compute.json").read_text())["tokens"]
    assert tokens["judge_forward"] > 0 and tokens["reward_forward"] == 0  # the judge's reading, under its own name
    heldout = run.records("heldout_pairs")  # scored with the human labels
    assert set(heldout["id"]) <= set(split["heldout_ids"])


def test_pair_labels_are_checked():
    with pytest.raises(ValueError, match="pair_labels must be one of"):
        train.make_config("dpo", pair_labels="ai")
    for method in ("ppo", "grpo", "online-dpo"):  # the arms that sample their own responses train on no dataset pairs
        with pytest.raises(ValueError, match="reward_model='judge'"):
            train.make_config(method, pair_labels="judge")


def test_the_judge_as_a_reward_is_the_log_odds_of_beating_the_baseline(smollm_tokenizer):
    reward = rewards.JudgeReward(judge.Judge(KeywordJudgeLM(smollm_tokenizer), smollm_tokenizer))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    prompts = [[{"role": "user", "content": "Help?"}]] * 3
    # TRL hands conversational completions as message lists and the dataset's columns by name
    got = reward(prompts=prompts, completions=[[{"role": "assistant", "content": c}] for c in
                                               ("I kindly decline.", "Sure.", "No.")], baseline=["No.", "I kindly say no.", "No."])
    p = 0.5 * (sig(2.8) + 1 - sig(-1.2))  # "kindly" against a plain baseline, both orders averaged
    assert got[0] == pytest.approx(math.log(p / (1 - p)), abs=1e-4) and got[1] == pytest.approx(-got[0], abs=1e-4)
    assert got[2] == pytest.approx(0.0, abs=1e-5)  # the baseline against itself
    with pytest.raises(ValueError, match="baseline"):
        reward(prompts=prompts, completions=["a", "b", "c"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_an_rl_arm_learns_from_the_judge_and_is_evaluated_with_it(tiny_model_dir, hh_dir, tmp_path, method):
    """reward_model="judge" (the tiny model as judge), through TRL's GRPO and our PPO: each hands the judge the prompt's
    baseline reply (TRL as a prompt dataset's column), the judge's tokens are counted, and the evaluation scores the
    samples with the same judge, named in its config."""
    from workbench.measurement import evaluate

    own = {"num_generations": 2, "max_length": 160} if method == "grpo" else {}
    _, cfg = train.make_config(method, model=str(tiny_model_dir), data_source=str(hh_dir), split="test", n_train=4,
                               n_score=2, max_steps=1, per_device_train_batch_size=4, max_new_tokens=4,
                               max_prompt_length=64, reward_model="judge", judge_model=str(tiny_model_dir),
                               runs_dir=str(tmp_path), **own)
    path = train.train(method, cfg)
    run = load_run(path)
    assert run.metrics["rewards/proxy/mean" if method == "grpo" else "objective/scores"].notna().any()
    rollouts = run.records("heldout_rollouts")
    assert rollouts["score"].abs().max() < 9.3 and rollouts["score"].notna().all()  # log-odds, clamped
    compute = json.loads((path / "compute.json").read_text())
    assert compute["tokens"]["judge_forward"] > 0 and compute["flops"]["judge_forward"] > 0
    out = evaluate.evaluate_run(path, evaluate.EvalConfig(n_prompts=2, n_samples=1, n_pairs=3, max_new_tokens=4,
                                                          n_bootstrap=20))
    saved = json.loads((out / "config.json").read_text())
    assert saved["proxy_reward_model"] == "judge" and saved["reward_judge"]["judge_model"] == str(tiny_model_dir)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(g["chosen_score"] == pytest.approx(0.0, abs=1e-5) for g in gens)  # the chosen reply against itself
    summary = json.loads((out / "summary.json").read_text())
    assert -9.3 < summary["eval/proxy"] < 9.3
    if method == "grpo":  # with a DPO run that asked no judge: both scored by, and recording, the GRPO run's judge
        _, dpo_cfg = train.make_config("dpo", model=str(tiny_model_dir), data_source=str(hh_dir), split="test",
                                       n_train=4, n_score=2, max_steps=1, max_length=160, runs_dir=str(tmp_path))
        dpo = train.train("dpo", dpo_cfg)
        both = evaluate.EvalConfig(name="both", n_prompts=2, n_samples=1, n_pairs=3, max_new_tokens=4, n_bootstrap=20)
        evaluate.evaluate_runs([path, dpo], both)
        for p in (path, dpo):
            saved = json.loads((p / "eval" / "both" / "config.json").read_text())
            assert saved["proxy_reward_model"] == "judge" and saved["reward_judge"]["judge_model"] == str(tiny_model_dir)
        # evaluated alone again, the DPO run resolves no judge of its own: not the same settings, so not silently kept
        with pytest.raises(FileExistsError, match="other settings"):
            evaluate.evaluate_run(dpo, dataclasses.replace(both, proxy_reward_model="judge"))


def test_the_judge_reads_the_label_logits_in_float32(tiny_model_dir, smollm_tokenizer):
    """The judge's labels come from the last hidden state times the label rows of the output layer, in float32: equal
    to the model's own logits in float32, and finer than a bf16 model's own logits (8 significant bits), so the two
    orders of a pair do not read alike by rounding."""
    rows = [smollm_tokenizer.encode(t, add_special_tokens=False) for t in ("Which reply, A or B?", "A or B? Say one.")]
    input_ids, attention = logprobs.pad_left(rows, smollm_tokenizer.pad_token_id)
    labels = [smollm_tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]
    for dtype in ("float32", "bfloat16"):
        model, _ = models.load_policy(models.ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False,
                                                         use_peft=False, dtype=dtype), trainable=False)
        with torch.no_grad():
            got = logprobs.last_token_logits(model, input_ids, attention, labels)
            own = model(input_ids=input_ids, attention_mask=attention).logits[:, -1, labels].float()
        assert got.dtype == torch.float32 and got.shape == (2, 2)
        if dtype == "float32":
            torch.testing.assert_close(got, own, atol=1e-5, rtol=0)
        else:  # bf16 rounding of the same numbers, and read finer than that
            torch.testing.assert_close(got.bfloat16().float(), own, atol=0.02, rtol=0.02)
            assert (got != got.bfloat16().float()).any()


def test_a_judge_is_counted_under_its_own_name_and_once(tiny_model_dir):
    """compute.json counts an AI judge's tokens as judge_forward with its own parameter count (not mixed into a
    reward model's), and a judge attached twice (it labels and rewards) counts each token once."""
    from workbench.core.compute import TokenCounter

    model, _ = models.load_policy(models.ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False,
                                                     use_peft=False), trainable=False)
    counter = TokenCounter()
    counter.attach(model, role="judge")
    counter.attach(model, role="judge")
    with torch.no_grad():
        model(input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))
    counter.detach()
    assert counter.tokens["judge_forward"] == 5 and counter.tokens["reward_forward"] == 0
    assert counter.flops()["judge_forward"] == 2 * counter.params["judge"] * 5 > 0


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
    train_rows, _, _, _ = sources.load_for_run(cfg.data, cfg.seed, tok)
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


@pytest.mark.slow
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
    # every pairwise reading of the judge is kept: k = 3 gives 3 pairs per prompt, both orders in each
    read = run.records("online_judgements")
    assert len(read) == 3 * 4 * 3 and set(read["round"]) == {1, 2, 3}
    assert ((read["p_a"] - 0.5 * (read["p_a_first"] + 1 - read["p_a_second"])).abs() < 1e-6).all()
    # and each sample's label is its mean win probability over those readings (a prompt drawn once in a round)
    for (rnd, pid), group in read.groupby(["round", "id"]):
        drawn = samples[(samples["round"] == rnd) & (samples["id"] == pid)]
        if len(drawn) != 3:
            continue
        for s_, label in zip(drawn["sample"], drawn["label"]):
            wins = [r.p_a if r.a == s_ else 1 - r.p_a for r in group.itertuples() if s_ in (r.a, r.b)]
            assert label == pytest.approx(sum(wins) / 2, abs=1e-5)
    compute = json.loads((path / "compute.json").read_text())["tokens"]
    assert compute["generated"] > 0 and compute["judge_forward"] > 0, compute  # the judge's reading is counted
    assert json.loads((path / "config.json").read_text())["judge_principle"] == judge.DEFAULT_PRINCIPLE


def test_online_dpo_config_is_checked():
    for bad, msg in (({"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"),
                     ({"labeller": "human"}, "labeller must be"), ({"loss_type": "nope"}, "Unknown loss_type"),
                     ({"beta": 0.0}, "beta must be > 0"), ({"refresh_reference_every": 0}, "refresh_reference_every")):
        with pytest.raises(ValueError, match=msg):
            train.make_config("online-dpo", **bad)
    with pytest.raises(ValueError, match="needs a reward"):
        train.train("online-dpo", online_dpo.OnlineDPOArgs())
