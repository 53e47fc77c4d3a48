"""The evaluation: statistics against known numbers, the sampled KL against the exact KL, determinism, the
results table on synthetic run folders with known numbers, and the whole chain on tiny run folders
(train → evaluate_runs → table → every figure exported)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.modeling import data, models, runs, sampling, scoring, sources
from workbench.measurement import evaluate, results
from workbench.reporting import figures
from workbench.training import ppo, train
from workbench.core import stats
from workbench.modeling.models import ModelConfig

# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_wins_count_ties_as_half():
    assert stats.wins([1, 2, 3], [2, 2, 2]).tolist() == [0.0, 0.5, 1.0]


def test_cluster_bootstrap_interval_matches_the_binomial_spread():
    rng = np.random.default_rng(0)
    per_prompt = rng.random(400) < 0.7  # one outcome per prompt, shown twice: duplicates add no information
    w = np.repeat(per_prompt.astype(float), 2)
    est, lo, hi = stats.bootstrap_mean(w, np.repeat(np.arange(400), 2), n_boot=2000, seed=0)
    assert est == pytest.approx(per_prompt.mean())
    se = math.sqrt(0.7 * 0.3 / 400)  # the clusters are the 400 prompts, not the 800 samples
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < est < hi
    assert stats.bootstrap_mean([3.0] * 6, [0, 0, 1, 1, 2, 2]) == (3.0, 3.0, 3.0)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    rng = np.random.default_rng(1)
    d = rng.normal(1.0, 1.0, 20000)  # responses mostly longer than the baseline
    p = 1 / (1 + np.exp(-2.0 * np.tanh(d / d.std())))  # wins come from length alone: θ = 0
    w = (rng.random(len(d)) < p).astype(float)
    assert w.mean() > 0.7
    assert stats.length_controlled_win_rate(w, d) == pytest.approx(0.5, abs=0.03)
    w2 = (rng.random(len(d)) < 0.7).astype(float)  # no length effect: the length-controlled rate is the raw one
    assert stats.length_controlled_win_rate(w2, d) == pytest.approx(w2.mean(), abs=0.02)
    assert stats.length_controlled_win_rate([1.0, 0.0, 1.0], [5, 5, 5]) == pytest.approx(2 / 3)


def test_length_rule_picks_shorter_when_shorter_wins_on_training_pairs():
    # Δ = chosen − rejected: −5, −10, +15, −20, −25: the shorter response is chosen in 4 of 5 pairs, and the one
    # exception sits in the middle of |Δ|, so no threshold does better than the pure direction
    rule = stats.fit_length_rule([10, 20, 45, 30, 40], [15, 30, 30, 50, 65])
    assert (rule.small, rule.large, rule.threshold) == ("shorter", "shorter", math.inf) and rule.pure
    assert rule.train_accuracy == pytest.approx(0.8) and rule.n_train == 5
    assert rule.describe() == "prefer the shorter response" and rule.to_dict()["threshold"] is None
    # held out: the rule is right, wrong, tied (half), wrong: by hand (1 + 0 + 0.5 + 0) / 4
    held_c, held_r = [5, 9, 7, 7], [8, 3, 7, 1]
    assert rule.credit(held_c, held_r).tolist() == [1.0, 0.0, 0.5, 0.0]
    assert rule.accuracy(held_c, held_r) == pytest.approx(0.375)
    longer = stats.LengthRule("longer", "longer")
    assert longer.accuracy(held_c, held_r) == pytest.approx(1 - 0.375), "'longer wins' is the mirror image"


def test_length_rule_finds_a_switch_of_direction_at_a_threshold():
    # small differences (1..10 tokens): the longer response is chosen; large ones (30..40): the shorter
    small = [(100 + d, 100) for d in range(1, 11)]
    large = [(100, 100 + d) for d in range(30, 41)]
    c, r = zip(*(small + large))
    pure = max(stats.LengthRule(d, d).accuracy(c, r) for d in ("longer", "shorter"))
    assert pure == pytest.approx(11 / 21)
    rule = stats.fit_length_rule(c, r)
    assert (rule.small, rule.large) == ("longer", "shorter") and 10 <= rule.threshold < 30 and not rule.pure
    assert rule.train_accuracy == 1.0 and rule.n_train == 21
    assert rule.describe().startswith("prefer the longer response when |Δ| ≤ ") and rule.describe().endswith("else the shorter")
    # applied to new pairs: longer by 3 (chosen), shorter by 35 (chosen), longer by 50 (rejected)
    assert rule.credit([53, 10, 70], [50, 45, 20]).tolist() == [1.0, 1.0, 0.0]
    # symmetric in the pair: swapping the responses swaps the choice; equal lengths: no choice
    a, b = np.array([53, 10, 70, 8]), np.array([50, 45, 20, 8])
    assert rule.predict(a, b).tolist() == [1.0, 1.0, -1.0, 0.0] and (rule.predict(b, a) == -rule.predict(a, b)).all()


def test_length_rule_counts_ties_half_and_prefers_the_simpler_rule():
    # every training pair has equal lengths: every candidate scores 0.5, and the pure direction wins the tie
    rule = stats.fit_length_rule([7, 7, 7], [7, 7, 7])
    assert rule.pure and rule.train_accuracy == 0.5
    # two ties and one pair where the longer is chosen: "longer" scores (0.5 + 0.5 + 1) / 3
    rule = stats.fit_length_rule([5, 5, 9], [5, 5, 3])
    assert rule.small == "longer" and rule.pure and rule.train_accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one"):
        stats.fit_length_rule([], [])
    with pytest.raises(ValueError, match="one length"):
        stats.fit_length_rule([1, 2], [1])


def test_t_interval_by_hand():
    mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · s / √n with s = 1
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    one = stats.t_interval([5.0])
    assert one[0] == 5.0 and math.isnan(one[1]) and math.isnan(one[2])


# ----------------------------------------------------------------------------------------------------------
# The sampled KL against the exact KL


@pytest.fixture(scope="module")
def perturbed_policy(tiny_model_dir):
    """The tiny model with a LoRA adapter whose A and B matrices are random, so π ≠ π_ref (the adapter disabled).
    Both drawn from one seeded generator: the adapter's own A initialisation comes from torch's global generator,
    whose state depends on which tests ran before, and the exact KL moved across 0.05 with it (0.041-0.053; the
    tiny model's next-token distribution is close to uniform, so no perturbation takes it much further)."""
    model, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), tok


def test_sampled_kl_is_unbiased_for_the_exact_kl(perturbed_policy):
    model, tok = perturbed_policy
    prompt = [{"role": "user", "content": "Is it ever right to lie?"}]
    T = 0.7
    recs = sampling.sample_completions(model, tok, [{"id": "p", "prompt": prompt}], n_samples=600, max_new_tokens=1,
                                       temperature=T, seed=0, batch_size=200)
    ids = torch.tensor([sampling.encode_prompts(tok, [prompt], 256)[0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float() / T, -1)
        with model.disable_adapter():
            logq = torch.log_softmax(model(input_ids=ids).logits[0, -1].float() / T, -1)
    exact = (logp.exp() * (logp - logq)).sum().item()  # KL(π‖π_ref) of the one-token distributions, whole vocabulary
    kls = np.array([r["kl"] for r in recs])
    assert exact > 0.05, "the perturbation must move the policy for this test to mean anything"
    assert abs(kls.mean() - exact) < 4 * kls.std() / math.sqrt(len(kls))
    for r in recs[:5]:  # the record adds up: per-token log-ratios sum to the sequence KL
        assert sum(r["token_logratio"]) == pytest.approx(r["kl"], abs=1e-5)
        assert r["token_logratio"][0] == pytest.approx(logp[r["completion_token_ids"][0]].item()
                                                       - logq[r["completion_token_ids"][0]].item(), abs=1e-4)
    # beside it, the same samples' log-ratio at T = 1 (the models' own distributions): DPO's KL, not PPO's
    with torch.no_grad():
        logp1 = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        with model.disable_adapter():
            logq1 = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    for r in recs[:20]:
        t = r["completion_token_ids"][0]
        assert r["kl_t1"] == pytest.approx(logp1[t].item() - logq1[t].item(), abs=1e-4)
    assert any(abs(r["kl_t1"] - r["kl"]) > 1e-3 for r in recs[:20]), "T = 1 and T = 0.7 differ"
    # sampled at T = 1, the two are one number, and its mean estimates the KL at T = 1
    at1 = sampling.sample_completions(model, tok, [{"id": "p", "prompt": prompt}], n_samples=600, max_new_tokens=1,
                                      temperature=1.0, seed=0, batch_size=200)
    exact1 = (logp1.exp() * (logp1 - logq1)).sum().item()
    kl1 = np.array([r["kl_t1"] for r in at1])
    assert all(r["kl"] == pytest.approx(r["kl_t1"], abs=1e-6) for r in at1)
    assert abs(kl1.mean() - exact1) < 4 * kl1.std() / math.sqrt(len(kl1))


# ----------------------------------------------------------------------------------------------------------
# Synthetic run folders with known numbers


def _fake_run(root: Path, method: str, seed: int, beta, gold: list[float], chosen_gold: list[float],
              chars: list[int], flops: float, name="default", sft_run=None) -> Path:
    path = root / f"{method}__{name}__s{seed}__20260101-000000-00000{seed}"
    (path / "eval" / "default").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "beta": beta, "sft_run": sft_run}))
    (path / "summary.json").write_text("{}")
    (path / "compute.json").write_text(json.dumps({"tokens": {"train": 10}, "flops": {"total": flops}}))
    gens = [{"id": f"p{i // 2}", "sample": i % 2, "gold_score": g, "chosen_gold_score": c, "response_tokens": n,
             "chosen_tokens": 100} for i, (g, c, n) in enumerate(zip(gold, chosen_gold, chars))]
    ev = path / "eval" / "default"
    ev.joinpath("generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    ev.joinpath("pairs.jsonl").write_text("")
    cfg = {"prompt_ids": sorted({g["id"] for g in gens}), "n_samples": 2, "temperature": 0.7, "top_p": 1.0,
           "max_new_tokens": 8, "seed": 0, "gold_reward_model": "gold", "n_bootstrap": 200}
    ev.joinpath("config.json").write_text(json.dumps(cfg))
    summary = {"eval/gold": float(np.mean(gold)), "eval/kl": 1.0 + seed, "pairs/accuracy": 0.5 + 0.1 * seed}
    ev.joinpath("summary.json").write_text(json.dumps(summary))
    return path


def test_results_table_win_rates_and_aggregates_on_known_numbers(tmp_path):
    sft = _fake_run(tmp_path, "sft", 0, None, [0, 0, 0, 0], [1, 1, 1, 1], [100] * 4, 1e9)
    dpo = [_fake_run(tmp_path, "dpo", s, 0.1, [1, -1, 1, 1], [1, 1, 1, 1], [120, 80, 120, 120], 2e9 * (s + 1),
                     sft_run=str(sft)) for s in range(3)]
    table = results.results_table([sft, *dpo])
    assert list(results.results_table([*reversed(dpo), sft])["run"]) == list(table["run"])  # one order, however asked
    assert list(table["method"]) == ["dpo"] * 3 + ["sft"] and list(table["seed"]) == [0, 1, 2, 0]
    row = table[table["run"] == dpo[0].name].iloc[0]
    assert row["win/sft"] == pytest.approx(0.75)  # 3 of 4 samples beat the SFT sample on the same (prompt, index)
    assert row["baseline_run"] == sft.name
    assert row["compute/pipeline_flops"] == pytest.approx(2e9 + 1e9)  # the run plus its SFT run
    agg = results.aggregate(table, ["eval/kl", "pairs/accuracy"])
    d = agg[agg["method"] == "dpo"].iloc[0]
    assert d["n_seeds"] == 3 and d["seeds"] == "0,1,2"
    assert d["eval/kl"] == pytest.approx(2.0)
    assert d["eval/kl_hi"] - d["eval/kl"] == pytest.approx(4.303 / math.sqrt(3))  # kl = 1, 2, 3: s = 1
    # a runs root names the same runs as the list of its folders (a string is not a list of characters)
    assert sorted(results.results_table(str(tmp_path))["run"]) == sorted(table["run"])
    cost = results.cost_to_reach(table, level=0.5).set_index("method")
    assert cost.loc["dpo", "compute/pipeline_flops"] == pytest.approx(3e9)  # the cheapest dpo run reaching 0.5
    assert cost.loc["dpo", "runs_reaching"] == 3 and math.isnan(cost.loc["sft", "compute/pipeline_flops"])


def test_cost_to_reach_is_per_setting_as_the_tables_name_them():
    """PPO against the gold and PPO against the proxy are two settings of one method: each its own cost and count."""
    import pandas as pd

    table = pd.DataFrame([
        {"method": "ppo", "name": "default", "beta": 0.05, "eval/gold": 0.6, "compute/pipeline_flops": 2e9},
        {"method": "ppo", "name": "gt", "beta": 0.05, "eval/gold": 0.7, "compute/pipeline_flops": 1e9},
        {"method": "ppo", "name": "gt", "beta": 0.05, "eval/gold": 0.2, "compute/pipeline_flops": 5e8}])
    cost = results.cost_to_reach(table, level=0.5).set_index("setting")
    assert cost.loc["ppo β=0.05", "runs"] == 1 and cost.loc["ppo (gt) β=0.05", "runs"] == 2
    assert cost.loc["ppo (gt) β=0.05", "compute/pipeline_flops"] == 1e9  # its cheaper run did not reach the level
    assert cost.loc["ppo (gt) β=0.05", "runs_reaching"] == 1 and (cost["method"] == "ppo").all()


def test_across_seeds_per_sample_quantities_get_the_two_level_bootstrap(tmp_path):
    sft = _fake_run(tmp_path, "sft", 0, None, [0, 1, 0, 2], [1, 1, 1, 1], [100] * 4, 1e9)
    golds = {0: [1, -1, 1, 1], 1: [2, 0, 1, 3], 2: [0, 0, 2, 1]}
    dpo = [_fake_run(tmp_path, "dpo", s, 0.1, golds[s], [1, 1, 1, 1], [100] * 4, 1e9, sft_run=str(sft)) for s in golds]
    table = results.results_table([sft, *dpo])
    agg = results.aggregate(table, ["eval/gold", "eval/gold_vs_sft", "eval/kl"]).set_index("method")
    d = agg.loc["dpo"]
    per_prompt = lambda v: {"p0": v[:2], "p1": v[2:]}  # noqa: E731 -- samples 2i, 2i+1 are prompt p{i}'s
    want = stats.two_level_bootstrap([per_prompt(golds[s]) for s in golds])
    assert (d["eval/gold"], d["eval/gold_lo"], d["eval/gold_hi"]) == pytest.approx(want)
    sft_gold = [0, 1, 0, 2]
    want = stats.two_level_bootstrap([per_prompt([a - b for a, b in zip(golds[s], sft_gold)]) for s in golds])
    assert (d["eval/gold_vs_sft"], d["eval/gold_vs_sft_lo"], d["eval/gold_vs_sft_hi"]) == pytest.approx(want)
    assert d["eval/kl_hi"] - d["eval/kl"] == pytest.approx(4.303 / math.sqrt(3))  # no per-sample KL: t across seeds
    assert "eval/gold, eval/gold_vs_sft: two-level bootstrap" in d["interval"]
    # the SFT run filtered out of the table: its samples are still found beside the policy's
    agg = results.aggregate(table[table["method"] == "dpo"], ["eval/gold_vs_sft"]).set_index("method")
    assert agg.loc["dpo", "eval/gold_vs_sft_lo"] == pytest.approx(want[1])


def test_a_run_trained_on_an_evaluation_prompt_is_refused(tmp_path, hh_dir):
    prompts, _, all_pairs = evaluate.eval_set(train.DataConfig(split="test", source=str(hh_dir)), 4, 4)
    leaked = next(ex for ex in all_pairs if ex["prompt"] == prompts[2]["prompt"])
    (tmp_path / "split.json").write_text(json.dumps({"train_ids": [leaked["id"]]}))
    with pytest.raises(ValueError, match="trained on 1 of the 4 evaluation prompts"):
        evaluate.check_not_trained_on(tmp_path, prompts, all_pairs)


def test_a_run_trained_on_a_related_conversation_is_refused(tmp_path, hh_dir):
    """A planted leak no exact-prompt check sees: a training conversation that continues an evaluation prompt."""
    prompts, _, all_pairs = evaluate.eval_set(train.DataConfig(split="test", source=str(hh_dir)), 4, 4)
    source = next(ex for ex in all_pairs if ex["prompt"] == prompts[3]["prompt"])
    longer = {**source, "id": "planted/1", "prompt": source["prompt"] + [{"role": "assistant", "content": "Go on?"},
                                                                        {"role": "user", "content": "Tell me more."}]}
    clean = next(ex for ex in all_pairs if data.group_key(ex) not in {data.group_key(p) for p in prompts})
    (tmp_path / "split.json").write_text(json.dumps({"train_ids": [clean["id"]]}))
    evaluate.check_not_trained_on(tmp_path, prompts, all_pairs + [longer])  # clean: passes
    (tmp_path / "split.json").write_text(json.dumps({"train_ids": [clean["id"], "planted/1"]}))
    with pytest.raises(ValueError, match="opens with the same user turn"):
        evaluate.check_not_trained_on(tmp_path, prompts, all_pairs + [longer])


def test_a_leak_through_an_upstream_run_or_a_pair_is_refused(tmp_path, hh_dir):
    prompts, eval_pairs, all_pairs = evaluate.eval_set(train.DataConfig(split="test", source=str(hh_dir)), 2, 8)

    def run(name, train_ids, **config):
        path = tmp_path / f"{name}__default__s0__x"
        path.mkdir()
        (path / "summary.json").write_text("{}")
        (path / "config.json").write_text(json.dumps({"seed": 0, **config}))
        if train_ids is not None:
            (path / "split.json").write_text(json.dumps({"train_ids": train_ids}))
        return path

    clean = [ex["id"] for ex in all_pairs if ex["prompt"] not in [p["prompt"] for p in prompts]
             and ex["prompt"] not in [p["prompt"] for p in eval_pairs]][:3]
    leaked = next(ex for ex in all_pairs if ex["prompt"] == prompts[1]["prompt"])["id"]
    sft = run("sft", clean + [leaked])
    dpo = run("dpo", clean, sft_run=str(sft))
    with pytest.raises(ValueError, match=r"through sft__default__s0__x, which dpo__default__s0__x was built from"):
        evaluate.check_not_trained_on(dpo, prompts, all_pairs, eval_pairs)
    only_pair = next(p for p in eval_pairs if p["prompt"] not in [q["prompt"] for q in prompts])
    pair_leak = next(ex for ex in all_pairs if ex["prompt"] == only_pair["prompt"])["id"]
    rm = run("reward", clean + [pair_leak])
    ppo = run("ppo", clean, reward_model=str(rm))
    with pytest.raises(ValueError, match="evaluation pairs"):
        evaluate.check_not_trained_on(ppo, prompts, all_pairs, eval_pairs)
    evaluate.check_not_trained_on(run("ppo2", clean, reward_model="some/hub-model"), prompts, all_pairs, eval_pairs)
    with pytest.raises(FileNotFoundError, match="split.json is missing"):
        evaluate.check_not_trained_on(run("kto", None), prompts, all_pairs, eval_pairs)


# ----------------------------------------------------------------------------------------------------------
# The whole chain on tiny run folders


@pytest.fixture(scope="module")
def study(tiny_model_dir, hh_dir, tmp_path_factory):
    """SFT → DPO and IPO from it; proxy and gold reward models on the two prompt halves; PPO from SFT."""
    root = tmp_path_factory.mktemp("study")
    d = dict(split="test", source=str(hh_dir), max_length=160)
    model = ModelConfig(model_name_or_path=str(tiny_model_dir))
    common = dict(model=model, data=train.DataConfig(**d, n_train=4, n_score=2), runs_dir=str(root), max_steps=1,
                  per_device_train_batch_size=2, max_length=160)
    sft = train.train("sft", train.SFTArgs(**common))
    train.train("dpo", train.DPOArgs(**common, sft_run=str(sft)))
    train.train("dpo", train.DPOArgs(**common, sft_run=str(sft), loss_type="ipo", beta=0.5))
    enc = ModelConfig(model_name_or_path=models.EMBEDDED_REWARD_BACKBONE, load_in_4bit=False, use_peft=False)
    rms = [train.train("reward", train.RewardArgs(**{**common, "model": enc, "run_name": h,
                                                     "data": train.DataConfig(**d, n_train=8, half=h[0])}))
           for h in ("a-proxy", "b-gold")]
    train.train("ppo", ppo.PPOArgs(model=model, data=train.DataConfig(**d, n_train=4, n_score=2), runs_dir=str(root),
                                   sft_run=str(sft), reward_model=str(rms[0]), gold_reward_model=str(rms[1]),
                                   iterations=2, rollout_batch_size=4, max_new_tokens=6))
    cfg = evaluate.EvalConfig(n_prompts=3, n_samples=2, n_pairs=4, max_new_tokens=6, n_bootstrap=100)
    return root, cfg, results.results_table(evaluate.evaluate_runs(root, cfg), cfg.name)


def test_every_run_is_evaluated_into_one_table(study):
    root, cfg, table = study
    assert sorted(table["method"]) == ["dpo", "ipo", "ppo", "reward", "reward", "sft"]
    pol = table[table["method"] != "reward"]
    for col in ("eval/gold", "eval/gold_lo", "eval/proxy", "eval/kl", "win/chosen", "win/chosen_lc_hi",
                "pairs/accuracy", "pairs/length_rule", "pairs/longer_wins", "pairs/gold_rm_accuracy", "compute/flops"):
        assert pol[col].notna().all(), col
    for col in ("win/sft", "win/sft_lc", "compute/pipeline_flops"):
        assert pol[pol["method"] != "sft"][col].notna().all(), col
    assert (pol["eval/gold_lo"] <= pol["eval/gold"]).all() and (pol["eval/gold"] <= pol["eval/gold_hi"]).all()
    assert table[table["method"] == "reward"]["pairs/accuracy"].notna().all()
    ppo_row = table[table["method"] == "ppo"].iloc[0]
    # PPO's pipeline: its own FLOPs plus the SFT run's and the proxy reward model's
    assert ppo_row["compute/pipeline_flops"] > ppo_row["compute/flops"] > 0
    assert ppo_row["compute/tokens_generated"] > 0 and ppo_row["compute/tokens_reward_forward"] > 0
    gens = runs.read_eval(ppo_row["path"])["generations"]
    assert len(gens) == cfg.n_prompts * cfg.n_samples
    for g in gens:
        assert len(g["token_logratio"]) == g["response_tokens"] == len(g["completion_token_ids"])
        assert g["chosen_gold_score"] is not None and g["gold_score"] is not None
    # every run was scored on the same prompts and pairs
    ids = {json.dumps(runs.read_eval(p)["config"]["prompt_ids"]) for p in pol["path"]}
    assert len(ids) == 1


def test_one_length_baseline_in_one_unit_for_every_run(study, tiny_model_dir):
    root, cfg, table = study
    # a reward model and the policies report the same fitted baseline and "longer wins" on the same pairs
    for col in ("pairs/length_rule", "pairs/length_rule_lo", "pairs/length_rule_hi", "pairs/longer_wins",
                "pairs/length_rule_fit", "pairs/length_rule_n_train"):
        assert table[col].notna().all() and table[col].nunique() == 1, col
    assert not [c for c in table if "length_baseline" in c or "longer_is_chosen" in c], "old names are gone"
    rm, dpo = (table[table["method"] == m].iloc[0] for m in ("reward", "dpo"))
    rm_ev, dpo_ev = runs.read_eval(rm["path"]), runs.read_eval(dpo["path"])
    # the unit is recorded: tokens of the policies' base model, for the reward model too
    assert rm_ev["config"]["length_tokenizer"] == dpo_ev["config"]["length_tokenizer"] == str(tiny_model_dir)
    lengths = [[(p["id"], p["chosen_length"], p["rejected_length"], p["length_rule"]) for p in ev["pairs"]]
               for ev in (rm_ev, dpo_ev)]
    assert lengths[0] == lengths[1] and len(lengths[0]) == cfg.n_pairs
    # by hand: the rule fitted on the training side of the split, in these tokens, applied to the held-out pairs
    dcfg = train.DataConfig(**dpo_ev["config"]["data"])
    all_pairs, _ = data.load_hh(dcfg.subset, dcfg.split, dcfg.source)
    train_side, heldout, _ = data.split_heldout(all_pairs, dcfg.heldout_fraction, seed=dcfg.split_seed)
    tok = models.load_tokenizer(str(tiny_model_dir))
    rule = stats.fit_length_rule(*scoring.response_lengths(tok, train_side[: scoring.LENGTH_FIT_PAIRS]))
    assert dpo_ev["config"]["length_rule"] == rule.to_dict() == rm_ev["config"]["length_rule"]
    assert dpo["pairs/length_rule_n_train"] == min(len(train_side), scoring.LENGTH_FIT_PAIRS)
    c, r = scoring.response_lengths(tok, heldout[: cfg.n_pairs])
    assert [p["chosen_length"] for p in dpo_ev["pairs"]] == c and [p["rejected_length"] for p in dpo_ev["pairs"]] == r
    assert dpo["pairs/length_rule"] == pytest.approx(rule.accuracy(c, r))
    assert dpo["pairs/longer_wins"] == pytest.approx(np.mean([(a > b) + 0.5 * (a == b) for a, b in zip(c, r)]))
    assert dpo["pairs/length_rule_lo"] <= dpo["pairs/length_rule"] <= dpo["pairs/length_rule_hi"]


def test_a_reward_model_evaluated_alone_counts_lengths_in_the_default_policy_tokens(study, capsys):
    root, cfg, table = study
    rm = Path(table[table["method"] == "reward"].iloc[0]["path"])
    evaluate.evaluate_run(rm, table_cfg(cfg, table, name="alone"))
    ev = runs.read_eval(rm, "alone")
    assert ev["config"]["length_tokenizer"] == models.EMBEDDED_POLICY
    assert f"length baseline in tokens of {models.EMBEDDED_POLICY} (the default policy)" in capsys.readouterr().err
    assert ev["summary"]["pairs/length_rule"] == pytest.approx(np.mean([p["length_rule"] for p in ev["pairs"]]))


def test_evaluation_repeats_exactly_and_resumes(study):
    root, cfg, table = study
    dpo = Path(table[table["method"] == "dpo"].iloc[0]["path"])
    first = runs.read_eval(dpo)
    stamp = (dpo / "eval" / "default" / "summary.json").stat().st_mtime_ns
    evaluate.evaluate_run(dpo, table_cfg(cfg, table))
    assert (dpo / "eval" / "default" / "summary.json").stat().st_mtime_ns == stamp, "same settings: kept, not redone"
    # written before the judge settings existed: with no judge asked for now, it is still the same evaluation
    config_path = dpo / "eval" / "default" / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in saved.items() if not k.startswith("judge_")}))
    evaluate.evaluate_run(dpo, table_cfg(cfg, table))
    assert (dpo / "eval" / "default" / "summary.json").stat().st_mtime_ns == stamp, "a new setting left off: kept"
    # the same one level down: a field added to the data config since (columns), off now
    assert saved["data"]["columns"] is None
    config_path.write_text(json.dumps({**saved, "data": {k: v for k, v in saved["data"].items() if k != "columns"}}))
    evaluate.evaluate_run(dpo, table_cfg(cfg, table))
    assert (dpo / "eval" / "default" / "summary.json").stat().st_mtime_ns == stamp, "a new data field left off: kept"
    config_path.write_text(json.dumps(saved))
    again = evaluate.evaluate_run(dpo, table_cfg(cfg, table, name="again"))
    second = runs.read_eval(dpo, "again")
    assert [g["completion"] for g in second["generations"]] == [g["completion"] for g in first["generations"]]
    assert [g["kl"] for g in second["generations"]] == [g["kl"] for g in first["generations"]]
    assert second["summary"]["eval/gold"] == first["summary"]["eval/gold"]
    assert again.name == "again"
    with pytest.raises(FileExistsError, match="other settings"):
        evaluate.evaluate_run(dpo, table_cfg(cfg, table, name="again", temperature=1.0))


def test_an_sft_adapters_logps_are_computed_once_and_equal_a_fresh_pass(study):
    """evaluate_runs computes the SFT adapter's log-probs on the pairs once: as DPO's and IPO's reference and as
    the SFT run's own policy. The shared numbers equal a fresh pass without the cache."""
    root, cfg, table = study
    run = {m: Path(table[table["method"] == m].iloc[0]["path"]) for m in ("sft", "dpo", "ipo")}
    shared = [(p["policy_chosen_logp"], p["policy_rejected_logp"]) for p in runs.read_eval(run["sft"])["pairs"]]
    for m in ("dpo", "ipo"):
        ref = [(p["reference_chosen_logp"], p["reference_rejected_logp"]) for p in runs.read_eval(run[m])["pairs"]]
        assert ref == shared, m
    evaluate.evaluate_run(run["sft"], table_cfg(cfg, table, name="fresh"))
    fresh = [(p["policy_chosen_logp"], p["policy_rejected_logp"]) for p in runs.read_eval(run["sft"], "fresh")["pairs"]]
    assert fresh == shared
    cache = {}
    for m in ("dpo", "ipo"):
        evaluate.evaluate_run(run[m], table_cfg(cfg, table, name="cached"), shared=evaluate.Shared(logps=cache))
    assert len(cache) == 3, "DPO's and IPO's adapters, and their one reference"


def test_a_worker_that_dies_is_an_error_not_a_hang():
    """An evaluation worker killed before it reports (out of memory, a signal) ends evaluate_runs with an error that
    says so, instead of waiting for a result that never comes."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=os._exit, args=(3,))
    dead.start()
    dead.join()
    path, error = evaluate._next_result(ctx.Queue(), [dead])
    assert isinstance(error, RuntimeError) and "exit code 3" in str(error)
    done = ctx.Queue()
    done.put(("runs/a", None))  # a result waiting is returned, whatever the workers' state
    assert evaluate._next_result(done, [dead]) == ("runs/a", None)


def test_workers_evaluate_as_one_process_does(study):
    """evaluate_runs with 2 worker processes: the SFT adapter's log-probs on the pairs first, in this process (it
    is the others' reference), then every run in a worker with its share of the threads; the same numbers as one
    process, and the SFT adapter's log-probs reach the workers through the cache (not computed again)."""
    import dataclasses

    root, cfg, table = study
    threads = torch.get_num_threads()
    paths = evaluate.evaluate_runs(root, dataclasses.replace(cfg, name="workers", workers=2))
    assert sorted(map(str, paths)) == sorted(table["path"])
    sft = Path(table[table["method"] == "sft"].iloc[0]["path"])
    shared = [(p["policy_chosen_logp"], p["policy_rejected_logp"]) for p in runs.read_eval(sft, "workers")["pairs"]]
    for _, row in table.iterrows():
        one, two = runs.read_eval(row["path"]), runs.read_eval(row["path"], "workers")
        assert two["config"]["torch_threads"] == max(1, threads // 2)
        assert [g["completion"] for g in two["generations"]] == [g["completion"] for g in one["generations"]]
        for key, value in one["summary"].items():
            if isinstance(value, float) and key != "time/eval_s":
                assert two["summary"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["method"], key)
        if row["method"] in ("dpo", "ipo", "ppo"):  # their reference is the SFT adapter: from the cache, bit for bit
            assert [(p["reference_chosen_logp"], p["reference_rejected_logp"]) for p in two["pairs"]] == shared
    with pytest.raises(ValueError, match="workers must be >= 1"):
        evaluate.EvalConfig(workers=0)


def table_cfg(cfg, table, **changes):
    """The EvalConfig evaluate_runs used (its data and reward models filled in from the runs)."""
    import dataclasses

    saved = runs.read_eval(table.iloc[0]["path"])["config"]
    return dataclasses.replace(cfg, data=train.DataConfig(**saved["data"]), proxy_reward_model=saved["proxy_reward_model"],
                               gold_reward_model=saved["gold_reward_model"], **changes)


def test_every_figure_is_exported(study, tmp_path):
    _, _, table = study
    for name, fn in figures.FIGURES.items():
        fig = fn(table)
        assert len(fig.data) > 0, f"{name} has no data"
    # the accuracy figure and the paper name the fitted length rule, with "longer wins" beside it
    acc = figures.fig_accuracy(table)
    lines = {t.name.split(":")[0]: t.y[0] for t in acc.data if t.type == "scatter"}
    assert {"length-only rule (fitted on training pairs)", "longer wins"} <= set(lines)
    assert lines["length-only rule (fitted on training pairs)"] == pytest.approx(table["pairs/length_rule"].iloc[0])
    from workbench.reporting import paper

    caveats = paper._caveats(table, results.aggregate(table))
    rule = table["pairs/length_rule"].iloc[0]
    # the gold reward model's accuracy as its own row in the table shows it (the number of the table and the figure)
    gold = table[table["path"].map(lambda p: Path(p).name.startswith("reward__b-gold"))]["pairs/accuracy"].item()
    assert f"length-only rule fitted on {int(table['pairs/length_rule_n_train'].iloc[0])} training pairs" in caveats
    assert table["pairs/length_rule_fit"].iloc[0] in caveats and "the longer response wins" in caveats
    assert f"{(gold - rule) * 100:+.1f} points against the length-only rule" in caveats
    # the cost figure names settings as the tables do (PPO against the gold apart from PPO against the proxy)
    cost = figures.fig_cost(table)
    pol = figures._policies(table).dropna(subset=["compute/pipeline_flops", "eval/gold"])
    assert len(pol) and {t.name for t in cost.data} == {results.setting(r) for _, r in pol.iterrows()}
    for fig in (figures.fig_win_rates(table), acc, cost):  # subtitles in lines that fit the figure's width
        assert all(len(line) <= 100 for line in fig.layout.title.text.split("<sup>")[1].removesuffix("</sup>").split("<br>")), fig.layout.title.text
    paths = figures.export_all(table, tmp_path)
    assert len(paths) == len(figures.FIGURES) * 3
    for p in paths:
        assert p.stat().st_size > 1000, p
    assert paths[0].read_bytes()[:4] == b"%PDF"


def test_cli_evaluates_a_runs_root_and_writes_table_and_figures(study, tmp_path, capsys):
    from workbench.__main__ import main

    root, _, _ = study
    assert main(["evaluate", str(root), "--name", "cli", "--n-prompts", "2", "--n-samples", "1", "--n-pairs", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    table = __import__("pandas").read_csv(tmp_path / "results.csv")
    assert len(table) == 6 and table["eval/gold"].notna().sum() == 4  # four policies; the two RMs rank pairs only
    assert (tmp_path / "results_by_method.csv").exists() and (tmp_path / "frontier.pdf").exists()
    assert "results.csv" in capsys.readouterr().out


def test_the_frontier_averages_seeds_per_step_from_the_sft_start():
    """Three seeds of one arm, each with a snapshot at step 2 and its final adapter at step 4: the frontier starts at
    SFT (KL 0, the mean gold of the SFT runs), draws one curve through the means per step with t-intervals across
    seeds, and each seed's points faint beside it."""
    rows = []
    for seed in (0, 1, 2):
        sft = f"/runs/sft__default__s{seed}__a{seed}"
        rows.append({"path": sft, "method": "sft", "name": "default", "seed": seed, "beta": None, "reference": None,
                     "step": 0, "final": True, "eval/gold": 0.05 + 0.01 * seed, "eval/kl": 0.0})
        for step, kl in ((2, 0.5), (4, 1.0)):
            rows.append({"path": f"/runs/dpo__default__s{seed}__b{seed}", "method": "dpo", "name": "default",
                         "seed": seed, "beta": 0.1, "reference": sft, "step": step, "final": step == 4,
                         "eval/gold": 0.06 + 0.01 * seed + 0.02 * step, "eval/kl": kl * (1 + 0.1 * seed)})
    fig = figures.fig_frontier(pd.DataFrame(rows))
    assert "seeds 0,1,2" in fig.layout.title.text
    curves = [t for t in fig.data if t.showlegend is not False]
    assert len(curves) == 1 and curves[0].name.startswith("dpo")
    dpo = curves[0]
    assert list(dpo.x)[0] == 0.0 and dpo.y[0] == pytest.approx(0.06), "the curve starts at SFT: KL 0, its mean gold"
    assert list(dpo.x)[1:] == pytest.approx([0.55, 1.1]) and list(dpo.y)[1:] == pytest.approx([0.11, 0.15])
    assert dpo.error_y.array[0] is None and all(e > 0 for e in dpo.error_y.array[1:]), "SFT anchor: no bar; t-intervals across the seeds"
    assert sum(t.showlegend is False for t in fig.data) == 3, "each seed's points, faint"


def test_the_closing_caveat_follows_the_numbers_and_flips_with_them():
    from workbench.reporting import paper

    def agg(lo, hi):
        return pd.DataFrame({"method": ["sft", "dpo", "ppo"], "beta": [None, 0.1, None], "n_seeds": [1, 1, 1],
                             "eval/kl": [1.6, 0.3, 0.5], "eval/gold_vs_sft": [None, (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2],
                             "eval/gold_vs_sft_lo": [None, *lo], "eval/gold_vs_sft_hi": [None, *hi]})

    found = paper._caveats(pd.DataFrame(), agg([0.1, -0.05], [0.3, 0.05]))
    assert "1 of 2 arms beat their SFT policy on gold" in found and "dpo β=0.1: 0.2 [0.1, 0.3]" in found
    assert "not distinguishable from noise" not in found
    assert "between 0.3 and 0.5 nats" in found  # the arms' KL, not the SFT row's (to the base)
    nothing = paper._caveats(pd.DataFrame(), agg([-0.1, -0.05], [0.1, 0.05]))
    assert "not distinguishable from noise" in nothing and "beat their SFT" not in nothing
    worse = paper._caveats(pd.DataFrame(), agg([-0.3, -0.05], [-0.1, 0.05]))
    assert "1 fell below it (dpo" in worse


def test_arms_are_compared_paired_and_the_draft_follows_which_is_ahead(tmp_path):
    """Arm against arm, paired by prompt and sample within each seed, two-level across seeds: a shift the prompts'
    own spread would hide between two separate intervals is shown, the draft's sentence names the arm ahead, and it
    flips when the numbers flip."""
    from workbench.measurement import findings

    rng = np.random.default_rng(5)
    prompt_effect = np.repeat(rng.normal(0, 3, 16), 2)  # 16 prompts x 2 samples, a large effect both arms share

    def study(root, shift):
        sft = _fake_run(root, "sft", 0, None, list(prompt_effect), [0] * 32, [100] * 32, 1e9)
        runs = [sft]
        for s in range(3):
            base = prompt_effect + rng.normal(0, 0.1, 32)
            runs.append(_fake_run(root, "dpo", s, 0.1, list(base + shift), [0] * 32, [100] * 32, 1e9, sft_run=str(sft)))
            runs.append(_fake_run(root, "kto", s, 0.1, list(base + rng.normal(0, 0.1, 32)), [0] * 32, [100] * 32, 1e9,
                                  sft_run=str(sft)))
        return results.results_table(runs)

    table = study(tmp_path / "up", 0.3)
    pairs = results.paired_arms(table)
    assert list(pairs[["a", "b", "seeds"]].iloc[0]) == ["dpo β=0.1", "kto β=0.1", "0,1,2"]
    est, lo, hi = pairs.iloc[0][["estimate", "lo", "hi"]]
    assert 0.15 < lo < est < hi < 0.45 and pairs.iloc[0]["n_prompts"] == 16
    agg = results.aggregate(table, ["eval/gold"]).set_index("method")  # unpaired, the arms' intervals overlap
    assert agg.loc["dpo", "eval/gold_lo"] < agg.loc["kto", "eval/gold_hi"]
    found = findings.arm_differences(table)
    assert "1 of 1 differences have an interval that excludes 0: dpo β=0.1 above kto β=0.1 by 0.2" in found
    flipped = findings.arm_differences(study(tmp_path / "down", -0.3))
    assert "kto β=0.1 above dpo β=0.1 by 0.3" in flipped or "kto β=0.1 above dpo β=0.1 by 0.2" in flipped and "dpo β=0.1 above" not in flipped
    same = findings.arm_differences(study(tmp_path / "same", 0.0))
    assert "0 of 1 differences have an interval that excludes 0; the others are not distinguishable" in same
    assert "| dpo β=0.1 | kto β=0.1 | 0,1,2 |" in findings.arms_table(table)


def test_win_rates_are_flagged_when_their_judge_does_not_beat_the_length_rule(tmp_path):
    from workbench.reporting import paper

    def study(root, margin_lo):
        gold = _fake_run(root, "reward", 0, None, [0] * 4, [0] * 4, [100] * 4, 1e9, name="gold")
        summary = json.loads((gold / "eval" / "default" / "summary.json").read_text())
        summary.update({"pairs/accuracy_vs_length_rule": margin_lo + 0.05, "pairs/accuracy_vs_length_rule_lo": margin_lo,
                        "pairs/accuracy_vs_length_rule_hi": margin_lo + 0.1})
        (gold / "eval" / "default" / "summary.json").write_text(json.dumps(summary))
        dpo = _fake_run(root, "dpo", 0, 0.1, [1, 0, 1, 1], [0] * 4, [100] * 4, 1e9)
        for run in (gold, dpo):
            cfg = json.loads((run / "eval" / "default" / "config.json").read_text())
            (run / "eval" / "default" / "config.json").write_text(json.dumps({**cfg, "gold_reward_model": str(gold)}))
        table = results.results_table([gold, dpo])
        return paper._results(results.aggregate(table), table)

    flagged = study(tmp_path / "weak", -0.02)
    assert "win vs chosen †" in flagged and "does not beat the length-only rule" in flagged and "gold__s0" in flagged
    clear = study(tmp_path / "strong", 0.04)
    assert "†" not in clear


@pytest.fixture
def toy_arm():
    """An arm the workbench has never seen, added in one place (``arms.register``) and removed afterwards: a DPO-style
    arm on pairs against a reference, trained by TRL's DPOTrainer with the hinge loss, named "toy"."""
    import dataclasses as dc

    import trl

    from workbench.training import arms
    from workbench.core import methods

    @dc.dataclass
    class ToyArgs(train.DPOArgs):
        loss_type: list = dc.field(default_factory=lambda: ["hinge"])

    arm = arms.register("toy", ToyArgs, trl.DPOTrainer, methods.Facts("pairs", has_reference=True),
                        pair_losses=arms.ARMS["dpo"].pair_losses)
    yield arm
    del arms.ARMS["toy"], methods.FACTS["toy"]


def test_an_arm_added_in_one_place_is_trained_evaluated_tabled_and_drawn(study, toy_arm, tmp_path):
    """The arm table is the one place an arm is declared: a new one, registered once, goes through training (with
    its held-out pair losses), the evaluation (sampled, scored against its reference with its own β), the results
    table, the aggregate and the figures, with no other module told its name."""
    import shutil

    from workbench.core import methods

    root, cfg, _ = study
    copy = tmp_path / "study"
    shutil.copytree(root, copy)
    sft = next(p for p in copy.iterdir() if p.name.startswith("sft__"))
    sft_cfg = runs.run_info(sft)["config"]
    _, toy_cfg = train.make_config("toy", model=sft_cfg["model"]["model_name_or_path"], split="test",
                                   data_source=sft_cfg["data"]["source"], n_train=4, n_score=2, max_steps=1,
                                   per_device_train_batch_size=2, max_length=160, sft_run=str(sft),
                                   runs_dir=str(copy), beta=0.2)
    toy = train.train("toy", toy_cfg)
    assert toy.name.startswith("toy__") and methods.of("toy").scores_with_own_beta
    assert "loss/hinge" in runs.load_run(toy).records("heldout_pairs").columns
    table = results.results_table(evaluate.evaluate_runs(copy, cfg), cfg.name)
    row = table[table["method"] == "toy"].iloc[0]
    for col in ("eval/gold", "eval/kl", "pairs/accuracy", "win/sft", "compute/pipeline_flops"):
        assert pd.notna(row[col]), col
    assert runs.read_eval(toy)["config"]["beta"] == 0.2, "its implicit reward is scored with its own β"
    assert "toy" in set(results.aggregate(table)["method"])
    drawn = [t.name or "" for t in figures.fig_frontier(table).data]
    assert any("toy" in name for name in drawn), drawn


def test_the_training_look_and_the_evaluation_measure_pairs_alike(study):
    """One way to measure a pair (``scoring.pair_metrics``): a DPO run's own held-out look (``eval/<name>`` in its
    summary) and an evaluation of the same run on the same pairs (``pairs/<name>``) report the same numbers under the
    same names. (The length rule is fitted differently by design: on the run's own training pairs, or once for all.)"""
    root, _, _ = study
    run = next(p for p in root.iterdir() if p.name.startswith("dpo__") and runs.is_complete(p))
    look = runs.load_run(run)
    trained_on = runs.run_info(run)["config"]
    ids = list(look.records("heldout_pairs")["id"])
    data_cfg = data.DataConfig(**trained_on["data"])
    by_id = {p["id"]: p for p in sources.load_pairs(data_cfg)[0]}
    # the evaluation's held-out pairs are those the run scored (a pair's side of the split is its own hash's: the
    # held-out pairs split again are all held out, in their order); the length rule fitted on the whole split
    length = evaluate.fit_length_baseline(trained_on["model"]["model_name_or_path"], data_cfg)
    cfg = evaluate.EvalConfig(name="same-pairs", n_pairs=len(ids), n_prompts=1, n_samples=1, max_new_tokens=2,
                              max_length=trained_on["max_length"], n_bootstrap=20, snapshots=False)
    out = evaluate.evaluate_run(run, cfg, shared=evaluate.Shared(pairs=[by_id[i] for i in ids], length=length))
    ev = runs.read_eval(run, "same-pairs")
    assert [r["id"] for r in ev["pairs"]] == ids, "the same pairs"
    names = [k.removeprefix("eval/") for k in look.summary if k.startswith("eval/")]
    shared = [k for k in names if f"pairs/{k}" in ev["summary"]]
    assert {"accuracy", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logratio/rejected",
            "avg_logp_accuracy", "length_rule", "longer_wins"} <= set(shared), sorted(shared)
    for k in shared:
        if k.startswith(("length_rule", "longer_wins")):  # the one part fitted differently (see above)
            continue
        assert ev["summary"][f"pairs/{k}"] == pytest.approx(look.summary[f"eval/{k}"], rel=1e-4, abs=1e-4), (k, out)
