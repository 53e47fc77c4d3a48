"""The scoring pass on the tiny model (fast) and the embedded default (slow), and a small pipeline's determinism."""

import pytest
import torch

from workbench.modeling import logprobs, models, scoring
from workbench.modeling.models import ModelConfig


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
    summary = scoring.pair_metrics(records)
    assert summary["rewards/accuracies"] == pytest.approx(sum(r["correct"] for r in records) / len(records))


def test_score_pairs_rejects_non_positive_beta(tiny_model_dir, hh_pairs):
    policy, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=False))
    with pytest.raises(ValueError, match="beta must be > 0"):
        scoring.score_pairs(policy, tok, hh_pairs[:1], beta=0.0)


def test_a_fresh_adapter_is_its_own_reference(tiny_model_dir, hh_pairs):
    """A fresh adapter starts as the identity (lora_B = 0): in 4-bit too, the policy equals its reference exactly
    and every implicit reward is 0."""
    policy, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    records = scoring.score_pairs(policy, tok, hh_pairs[:4], beta=0.1, max_length=256)
    assert all(r["margin"] == 0 and r["chosen_reward"] == 0 for r in records)


@pytest.mark.slow
def test_the_embedded_default_scores_like_a_language_model(hh_pairs):
    policy, tok = models.load_policy(ModelConfig())
    records = scoring.score_pairs(policy, tok, hh_pairs[:2], beta=0.1, max_length=512)
    # the real model's log-probs are those of a language model, not of a uniform guess over 49,152 tokens
    per_token = [r["reference_chosen_logp"] / r["chosen_tokens"] for r in records]
    assert all(t > -8 for t in per_token), per_token


def test_the_same_seed_gives_the_same_results_table(tiny_model_dir, hh_dir, tmp_path):
    """A small pipeline (SFT -> reward model -> DPO from SFT -> evaluation) run twice with one seed on one machine:
    every number of the results table is the same (times and paths aside)."""
    from workbench.measurement import evaluate, results
    from workbench.training import train

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
        return results.results_table(evaluate.evaluate_runs(root, cfg), cfg.name)

    a, b = pipeline(tmp_path / "a"), pipeline(tmp_path / "b")
    volatile = [c for c in a.columns if c.endswith("_s") or any(w in c for w in ("time", "path", "run", "wall", "folder",
                                                            "reference"))]  # the reference column names a folder
    a, b = (t.drop(columns=volatile).sort_values(["method", "name"]).reset_index(drop=True) for t in (a, b))
    assert len(a) == 3 and list(a.columns) == list(b.columns)
    numeric = [c for c in a.columns if a[c].dtype.kind in "fi"]
    assert {"pairs/accuracy", "eval/gold", "eval/kl"} <= set(numeric)
    for c in a.columns:
        assert a[c].equals(b[c]), f"{c}: {a[c].tolist()} != {b[c].tolist()}"


def test_the_main_job_puts_figures_and_draft_where_it_is_told(tiny_model_dir, hh_dir, tmp_path, monkeypatch):
    """``workbench main --figures DIR --paper FILE``: the evaluate stage exports the figures into DIR (the grid's
    default figures_dir is replaced) and the draft links them there; nothing is written to ./figures."""
    from pathlib import Path

    import yaml

    from workbench.orchestration import pipeline

    grid = {"name": "tiny-main", "runs_dir": "runs/main",
            "defaults": {"split": "test", "n_train": 4, "n_score": 2, "max_steps": 1, "figures_dir": "figures"},
            "stages": [{"stage": "sft", "notebook": "01_sft.ipynb", "params": {"per_device_train_batch_size": 2, "max_length": 160}},
                       *({"stage": h, "notebook": "02_reward.ipynb",
                          "params": {"half": h[0], "run_name": h, "n_train": 8, "per_device_train_batch_size": 4,
                                     "max_length": 160, "model": "embedded:all-minilm-l6-v2"}} for h in ("a-proxy", "b-gold")),
                       {"stage": "evaluate", "notebook": "05_evaluate.ipynb", "always": True,
                        "params": {"n_prompts": 2, "n_samples": 1, "n_pairs": 2, "max_new_tokens": 4, "n_bootstrap": 50,
                                   "proxy_reward_model": "@a-proxy", "gold_reward_model": "@b-gold"}}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.chdir(tmp_path)
    result = pipeline.run_study(tmp_path / "grid.yaml", runs_dir=str(tmp_path / "runs"), figures_dir=str(tmp_path / "out" / "figs"),
                                paper_path=str(tmp_path / "out" / "draft.md"),
                                overrides={"model": str(tiny_model_dir), "data_source": str(hh_dir)})
    assert not result.failed
    figs = sorted(p.name for p in (tmp_path / "out" / "figs").glob("*.png"))
    assert "frontier.png" in figs and len(figs) >= 5, figs
    assert not (tmp_path / "figures").exists(), "the grid's default figures_dir was replaced"
    draft = Path(tmp_path / "out" / "draft.md").read_text()
    assert "figs/frontier.png" in draft
