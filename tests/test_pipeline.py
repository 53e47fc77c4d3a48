"""The scoring pass and the main job, on the tiny model (fast) and the embedded default (slow)."""

import json

import pytest
import torch

from workbench import logprobs, models, scoring
from workbench.models import ModelConfig
from workbench.pipeline import ScoreConfig, run_score
from workbench.runs import list_runs, load_run


def test_score_pairs_matches_its_definition(tiny_model_dir, hh_pairs):
    policy, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    beta = 0.25
    records = scoring.score_pairs(policy, tok, hh_pairs, beta=beta, batch_size=3)
    assert [r["id"] for r in records] == [ex["id"] for ex in hh_pairs]
    for r, ex in zip(records, hh_pairs):
        p, c = models.encode(tok, ex["prompt"], ex["chosen"])
        _, rj = models.encode(tok, ex["prompt"], ex["rejected"])
        pol = logprobs.completion_logps(policy, [p, p], [c, rj], pad_id=tok.pad_token_id)
        ref = logprobs.completion_logps(policy, [p, p], [c, rj], pad_id=tok.pad_token_id, reference=True)
        assert r["chosen_reward"] == pytest.approx(beta * (pol.sum[0] - ref.sum[0]).item(), abs=1e-4)
        assert r["rejected_reward"] == pytest.approx(beta * (pol.sum[1] - ref.sum[1]).item(), abs=1e-4)
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"])
        assert r["correct"] == (r["margin"] > 0)
        # per-token log-ratios add up to the sequence log-ratio, token for token
        assert len(r["chosen_token_logratio"]) == r["chosen_tokens"] == len(c)
        assert beta * sum(r["rejected_token_logratio"]) == pytest.approx(r["rejected_reward"], abs=1e-4)
    assert any(r["margin"] != 0 for r in records)
    summary = scoring.summarize(records)
    assert summary["rewards/accuracies"] == pytest.approx(sum(r["correct"] for r in records) / len(records))


def test_score_pairs_rejects_non_positive_beta(tiny_model_dir, hh_pairs):
    policy, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False))
    with pytest.raises(ValueError, match="beta must be > 0"):
        scoring.score_pairs(policy, tok, hh_pairs[:1], beta=0.0)


def _check_main_run(run, n_pairs):
    assert run.path.exists() and not run.path.name.endswith((".partial", ".failed"))
    loaded = load_run(run.path)
    for f in ("config.json", "env.json", "metrics.jsonl", "summary.json", "data_report.json", "split.json"):
        assert (run.path / f).exists(), f
    pairs = loaded.records("pairs")
    assert len(pairs) == n_pairs and pairs["id"].is_unique
    split = json.loads((run.path / "split.json").read_text())
    assert set(pairs["id"]) <= set(split["heldout_ids"]) and split["seed"] == loaded.config["seed"]
    report = json.loads((run.path / "data_report.json").read_text())
    assert report["read"] == report["kept"] + sum(report["skipped"].values())
    # a fresh adapter starts as the identity: the policy equals its reference exactly
    assert (pairs["margin"] == 0).all() and (pairs["chosen_reward"] == 0).all()
    assert loaded.summary["n_pairs"] == n_pairs
    # the length baseline: a rule fitted on the split's training pairs, applied to the scored pairs (tokens)
    assert loaded.summary["baseline/length_rule_n_train"] == min(split["n_train"], 2000)
    assert loaded.summary["baseline/length_rule"] == pytest.approx(pairs["length_rule"].mean())
    assert loaded.summary["baseline/longer_wins"] == pytest.approx(
        ((pairs["chosen_length"] > pairs["rejected_length"]) + 0.5 * (pairs["chosen_length"] == pairs["rejected_length"])).mean())
    return loaded


def test_main_job_on_tiny_model_writes_a_complete_run(tiny_model_dir, hh_dir, tmp_path, capsys):
    cfg = ScoreConfig(seed=3, data_source=str(hh_dir), n_pairs=4, max_length=256, runs_dir=str(tmp_path),
                     model=ModelConfig(model_name_or_path=str(tiny_model_dir)))
    run = run_score(cfg)
    out = capsys.readouterr().out
    assert "read 2312" in out and str(run.path) in out
    loaded = _check_main_run(run, 4)
    assert loaded.config["seed"] == 3 and loaded.config["model"]["load_in_4bit"] is True
    table = list_runs(tmp_path)
    assert list(table["method"]) == ["score"] and list(table["seed"]) == [3]


def test_main_job_is_deterministic_for_a_seed(tiny_model_dir, hh_dir, tmp_path):
    kw = dict(data_source=str(hh_dir), n_pairs=2, max_length=256, runs_dir=str(tmp_path),
              model=ModelConfig(model_name_or_path=str(tiny_model_dir)))
    a = load_run(run_score(ScoreConfig(seed=1, **kw)).path).records("pairs")
    b = load_run(run_score(ScoreConfig(seed=1, **kw)).path).records("pairs")
    c = load_run(run_score(ScoreConfig(seed=2, **kw)).path).records("pairs")
    assert list(a["id"]) == list(b["id"]) and list(a["policy_chosen_logp"]) == list(b["policy_chosen_logp"])
    assert list(a["id"]) != list(c["id"]), "another seed holds out other prompts"


def test_main_config_fails_early_on_bad_values():
    with pytest.raises(ValueError, match="n_pairs"):
        ScoreConfig(n_pairs=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ScoreConfig(heldout_fraction=1.5)


def test_cli_builds_the_config(monkeypatch):
    from workbench import __main__ as cli
    from workbench import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_score", lambda cfg: seen.setdefault("cfg", cfg))
    cli.main(["score", "--n-pairs", "5", "--seed", "2", "--model", "some/model", "--no-4bit", "--batch-size", "3",
              "--beta", "0.5"])
    cfg = seen["cfg"]
    assert (cfg.n_pairs, cfg.seed, cfg.model.model_name_or_path, cfg.model.load_in_4bit) == (5, 2, "some/model", False)
    assert (cfg.batch_size, cfg.beta, cfg.data_source) == (3, 0.5, None)


@pytest.mark.slow
def test_main_job_on_the_embedded_default(hh_dir, tmp_path):
    run = run_score(ScoreConfig(data_source=str(hh_dir), n_pairs=2, runs_dir=str(tmp_path)))
    loaded = _check_main_run(run, 2)
    assert loaded.config["model"]["model_name_or_path"] == models.EMBEDDED_POLICY
    # the real model's log-probs are those of a language model, not of a uniform guess over 49,152 tokens
    pairs = loaded.records("pairs")
    per_token = pairs["reference_chosen_logp"] / pairs["chosen_tokens"]
    assert (per_token > -8).all(), per_token.tolist()


def test_the_same_seed_gives_the_same_results_table(tiny_model_dir, hh_dir, tmp_path):
    """A small pipeline (SFT -> reward model -> DPO from SFT -> evaluation) run twice with one seed on one machine:
    every number of the results table is the same (times and paths aside)."""
    from workbench import evaluate, train

    def pipeline(root):
        common = dict(model=ModelConfig(model_name_or_path=str(tiny_model_dir)), runs_dir=str(root),
                      data=train.DataConfig(split="test", source=str(hh_dir), n_train=4, n_score=2, max_length=160),
                      max_steps=2, per_device_train_batch_size=2, max_length=160, seed=5)
        sft = train.train("sft", train.SFTArgs(**common))
        rm = train.train("reward", train.RewardArgs(**{**common, "model": ModelConfig(
            model_name_or_path=models.EMBEDDED_REWARD_BACKBONE, load_in_4bit=False, use_peft=False)}))
        train.train("dpo", train.DPOArgs(**common, sft_run=str(sft)))
        cfg = evaluate.EvalConfig(n_prompts=2, n_samples=2, n_pairs=3, max_new_tokens=4, n_bootstrap=50,
                                  proxy_reward_model=str(rm), gold_reward_model=str(rm))
        return evaluate.evaluate_runs(root, cfg)

    a, b = pipeline(tmp_path / "a"), pipeline(tmp_path / "b")
    volatile = [c for c in a.columns if c.endswith("_s") or any(w in c for w in ("time", "path", "run", "wall", "folder",
                                                            "reference"))]  # the reference column names a folder
    a, b = (t.drop(columns=volatile).sort_values(["method", "name"]).reset_index(drop=True) for t in (a, b))
    assert len(a) == 3 and list(a.columns) == list(b.columns)
    numeric = [c for c in a.columns if a[c].dtype.kind in "fi"]
    assert {"pairs/accuracy", "eval/gold", "eval/kl"} <= set(numeric)
    for c in a.columns:
        assert a[c].equals(b[c]), f"{c}: {a[c].tolist()} != {b[c].tolist()}"
