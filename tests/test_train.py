"""Training arms on the tiny model: every arm runs, writes a complete run folder, and uses the right reference;
bad input fails early and clearly; a NaN loss stops the run with a diagnostic."""

import json

import pytest
import torch
import trl

from workbench.training import arms, train
from workbench.modeling import logprobs, models
from workbench.modeling.models import ModelConfig
from workbench.modeling.runs import load_run


@pytest.fixture(scope="module")
def common(tiny_model_dir, hh_dir, tmp_path_factory):
    """Settings that make one step take about a second on the tiny model."""
    return dict(
        model=ModelConfig(model_name_or_path=str(tiny_model_dir)),
        data=train.DataConfig(split="test", source=str(hh_dir), n_train=4, n_score=3, max_length=160),
        runs_dir=str(tmp_path_factory.mktemp("runs")),
        max_steps=1, per_device_train_batch_size=2, max_length=160,
    )


@pytest.fixture(scope="module")
def sft_run(common):
    return train.train("sft", train.SFTArgs(**common))


def _complete(path):
    run = load_run(path)
    assert (path / "adapter" / "adapter_config.json").exists()
    assert not (path / "trainer").exists(), "trainer scratch output is removed"
    records = run.records("heldout_pairs")
    assert len(records) == 3
    assert len(records.loc[0, "chosen_token_logratio"]) == records.loc[0, "chosen_tokens"]
    assert "loss" in run.metrics.columns and run.summary["train/steps"] == 1
    split = json.loads((path / "split.json").read_text())
    assert not set(split["train_ids"]) & set(split["heldout_ids"]), "training and held-out pairs are disjoint"
    assert set(records["id"]) <= set(split["heldout_ids"])
    _check_length_baseline(run, split)
    # compute.json: the tokens the trained model saw with gradients are the tokens TRL says it trained on
    compute = json.loads((path / "compute.json").read_text())
    assert compute["tokens"]["train"] > 0
    if "num_tokens" in run.metrics:  # ORPO/CPO (trl.experimental) do not log it
        assert compute["tokens"]["train"] == run.metrics["num_tokens"].dropna().max()
    return run


def _check_length_baseline(run, split):
    """The summary's length baseline: a rule fitted on this run's own training pairs, in this run's tokens, and its
    accuracy on the scored pairs by hand; "longer wins" beside it."""
    from workbench.modeling import scoring

    records = run.records("heldout_pairs")
    s = run.summary
    assert s["eval/length_rule_n_train"] == len(split["train_ids"]), "fitted on the run's own training pairs"
    credit = [(c > r) + 0.5 * (c == r) for c, r in zip(records["chosen_length"], records["rejected_length"])]
    assert s["eval/longer_wins"] == pytest.approx(sum(credit) / len(credit))
    assert s["eval/length_rule"] == pytest.approx(records["length_rule"].mean())
    assert s["eval/length_rule_fit"].startswith("prefer the ")
    assert not [k for k in s if "longer_is_chosen" in k]
    tok = models.load_tokenizer(run.config["model"]["model_name_or_path"])  # the run's own tokens
    first = [ex for ex in _heldout_pairs(run.path) if ex["id"] == records.loc[0, "id"]]
    assert scoring.response_lengths(tok, first) == ([records.loc[0, "chosen_length"]], [records.loc[0, "rejected_length"]])


def test_configs_subclass_trl_and_are_cpu_safe():
    trl_configs = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig,
                   "orpo": arms.ORPOConfig, "simpo": arms.CPOConfig, "reward": trl.RewardConfig,
                   "rloo": trl.RLOOConfig, "grpo": trl.GRPOConfig, "trl-online-dpo": arms.OnlineDPOConfig}
    for method, config_cls in ((m, a.config) for m, a in train.ARMS.items()):
        cfg = config_cls()
        if method == "ppo":  # our own PPO: TRL 1.16 has no PPO config to subclass
            assert cfg.kl_coef > 0 and cfg.kl_estimator == "k1" and cfg.model.load_in_4bit
            continue
        if method == "online-dpo":  # our own loop too
            assert cfg.beta > 0 and cfg.samples_per_prompt >= 2 and cfg.model.load_in_4bit
            continue
        if method == "gold-pairs":  # not a trainer: the known-gold study's dataset, labelled by the embedded gold
            assert cfg.gold == "vader" and cfg.label_temperature == 0 and train.ARMS[method].view == "dataset"
            continue
        assert isinstance(cfg, trl_configs[method]), f"{method}: every TRL option must be available"
        # TRL's bf16 follows the model's compute dtype ("auto": float32 in the test suite, see conftest.py)
        assert cfg.bf16 is (models.compute_dtype(cfg.model.dtype) == torch.bfloat16), method
        assert cfg.seed == 0
        # policies default to QLoRA; the reward model to the small embedded encoder, fully trained
        assert cfg.model.load_in_4bit == (method != "reward")
    assert issubclass(train.DPOArgs, trl.DPOConfig) and issubclass(train.KTOArgs, trl.KTOConfig)
    assert train.SimPOArgs().loss_type == "simpo" and train.SimPOArgs().cpo_alpha == 0.0


def test_sft_run_is_complete(sft_run):
    run = _complete(sft_run)
    assert run.config["learning_rate"] == 2e-4 and sft_run.name.startswith("sft__default__s0__")


@pytest.mark.parametrize("loss_type,label", [(["sigmoid"], "dpo"), (["ipo"], "ipo"),
                                             (["sigmoid", "bco_pair", "sft"], "dpo+bco-pair+sft")])
def test_dpo_family_from_sft_uses_sft_as_reference(common, sft_run, loss_type, label):
    weights = {"loss_weights": [0.8, 0.2, 1.0]} if len(loss_type) == 3 else {}
    path = train.train("dpo", train.DPOArgs(sft_run=str(sft_run), loss_type=loss_type, **weights, **common))
    assert path.name.startswith(f"{label}__default__s0__")
    run = _complete(path)
    # the reference of the preference arm is the SFT policy: its reference log-probs on the held-out pairs are the
    # SFT run's policy log-probs on the same pairs (same seed, same held-out split)
    ref = run.records("heldout_pairs").set_index("id")
    compute = json.loads((path / "compute.json").read_text())  # DPO: every trained token also went through π_ref
    assert compute["tokens"]["reference_forward"] == compute["tokens"]["train"] > 0
    n = compute["params"]["trained"]  # LoRA on a frozen base: 2N forward + 2N backward per trained token
    assert compute["flops"]["total"] == 4 * n * compute["tokens"]["train"] + 2 * n * compute["tokens"]["reference_forward"]
    for t in loss_type:  # each pair carries its loss under the arm's objective (batch-level "sft" excepted)
        assert (f"loss/{t}" in ref.columns) == (t != "sft")
    sft = load_run(sft_run).records("heldout_pairs").set_index("id")
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(torch.tensor(ref[f"reference_{side}_logp"].values),
                                   torch.tensor(sft.loc[ref.index, f"policy_{side}_logp"].values), atol=1e-4, rtol=0)


def test_precomputed_reference_logps_give_the_same_reference(common, sft_run):
    path = train.train("dpo", train.DPOArgs(sft_run=str(sft_run), precompute_ref_log_probs=True, run_name="precomp", **common))
    ref = _complete(path).records("heldout_pairs").set_index("id")
    sft = load_run(sft_run).records("heldout_pairs").set_index("id")
    torch.testing.assert_close(torch.tensor(ref["reference_chosen_logp"].values),
                               torch.tensor(sft.loc[ref.index, "policy_chosen_logp"].values), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_other_arms_train_one_step(common, method):
    config_cls = train.ARMS[method].config
    kw = {"per_device_train_batch_size": 4} if method == "kto" else {}  # KTO's KL estimate needs a batch > 1 pair
    run = _complete(train.train(method, config_cls(**{**common, **kw})))
    assert run.path.name.startswith(f"{method}__")


def test_trained_adapter_reloads_to_the_scored_policy(common, sft_run, hh_dir):
    run = load_run(sft_run)
    policy, tok = models.load_policy(common["model"], adapter=str(sft_run / "adapter"))
    rec = run.records("heldout_pairs").iloc[0]
    from workbench.modeling.data import load_hh

    examples, _ = load_hh("harmless-base", "test", hh_dir)
    ex = next(e for e in examples if e["id"] == rec["id"])
    p, c = models.encode(tok, ex["prompt"], ex["chosen"], max_length=160)
    lp = logprobs.completion_logps(policy, [p], [c], pad_id=tok.pad_token_id)
    assert lp.sum.item() == pytest.approx(rec["policy_chosen_logp"], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad input and failure


def test_bad_configs_fail_before_loading_anything(common, tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'ppo2'"):
        train.train("ppo2")
    with pytest.raises(TypeError, match="DPOArgs"):
        train.train("dpo", train.KTOArgs(**common))
    with pytest.raises(ValueError, match="beta must be > 0"):
        train.train("dpo", train.DPOArgs(beta=0.0, **common))
    with pytest.raises(ValueError, match="beta must be > 0"):
        train.train("kto", train.KTOArgs(beta=-1.0, **common))
    with pytest.raises(ValueError, match=r"Unknown DPO loss_type \['sigmod'\]"):
        train.train("dpo", train.DPOArgs(loss_type=["sigmod"], **common))
    with pytest.raises(FileNotFoundError, match="no adapter/ folder"):
        train.train("dpo", train.DPOArgs(sft_run=str(tmp_path), **common))


def test_reference_from_another_base_is_refused(common, sft_run):
    other = {**common, "model": ModelConfig(model_name_or_path=models.EMBEDDED_POLICY)}
    with pytest.raises(ValueError, match="was trained on base .* but this run's model is 'embedded:smollm2"):
        train.train("dpo", train.DPOArgs(sft_run=str(sft_run), **other))


def test_pairs_without_needed_columns_are_named(common):
    with pytest.raises(ValueError, match=r"pairs\[1\] lacks column\(s\) \['rejected'\]"):
        train.train("dpo", train.DPOArgs(**common), pairs=[
            {"id": "a", "prompt": [], "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": "y"}]},
            {"id": "b", "prompt": [], "chosen": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match="'chosen' must be"):
        train.train("dpo", train.DPOArgs(**common), pairs=[{"id": "a", "prompt": [], "chosen": "x", "rejected": "y"}])


def test_nan_loss_stops_the_run_with_a_diagnostic(common, monkeypatch):
    def nan_loss(self, model, inputs, *args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(trl.DPOTrainer, "compute_loss", nan_loss)
    with pytest.raises(train.NonFiniteLossError, match="loss became nan at step 0"):
        train.train("dpo", train.DPOArgs(run_name="nan", **common))
    from pathlib import Path

    failed = [p for p in Path(common["runs_dir"]).iterdir() if p.name.startswith("dpo__nan__") and p.name.endswith(".failed")]
    assert len(failed) == 1
    diag = json.loads((failed[0] / "nan_diagnostic.json").read_text())
    assert diag["step"] == 0 and diag["loss"] == "nan" and len(diag["batch_starts"]) == 4  # 2 pairs × (chosen, rejected)
    assert "NonFiniteLossError" in (failed[0] / "error.txt").read_text()


def test_cli_train_builds_the_config(monkeypatch):
    from workbench import __main__ as cli

    seen = {}
    monkeypatch.setattr(train, "train", lambda method, cfg: seen.update(method=method, cfg=cfg))
    cli.main(["train", "dpo", "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5", "--beta", "0.2",
              "--max-steps", "3", "--seed", "4"])
    cfg = seen["cfg"]
    assert seen["method"] == "dpo" and isinstance(cfg, train.DPOArgs)
    assert (cfg.loss_type, cfg.loss_weights, cfg.beta, cfg.max_steps, cfg.seed) == (["sigmoid", "sft"], [1.0, 0.5], 0.2, 3, 4)


def test_every_parameter_of_every_arm_has_its_help_and_the_cli_prints_it(capsys):
    """One schema: each config field carries its help (TRL's ``metadata["help"]``, or the comment written with the
    workbench's declaration: ``config.field_help``); ``train METHOD --help`` prints every flat parameter with it."""
    import dataclasses

    from workbench import __main__ as cli
    from workbench.training import arms, config, ppo
    from workbench.modeling import data, models
    from workbench.measurement import evaluate

    for method, arm in arms.ARMS.items():
        helps = config.field_help(arm.config)
        assert not [f.name for f in dataclasses.fields(arm.config) if f.init and not helps.get(f.name)], method
    for cls in (models.ModelConfig, data.DataConfig, evaluate.EvalConfig):
        assert all(config.field_help(cls).values()), cls.__name__
    assert config.field_help(arms.DPOArgs)["beta"].count("workbench: DPO paper's β") == 1  # TRL's help, then ours
    assert "GAE's λ" in config.field_help(ppo.PPOArgs)["lam"]
    assert config.field_help(ppo.PPOArgs)["kl_coef"].startswith("β of")  # "# --- reward" headings are not help

    assert cli.main(["train", "ppo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in arms.config_fields("ppo"):
        assert f"  --{flag.replace('_', '-')}  " in out, flag
    assert "--lam  (float; default 0.95)\n      GAE's λ" in out
    assert "--max-steps  = --iterations" in out  # an alias is declared once, and shown


# ---------------------------------------------------------------------------------------------------------
# The reward model


def _synthetic_pairs(n):
    """Pairs where content, not length, decides: the polite answer is chosen and is the *shorter* one."""
    topics = ["bread", "tax forms", "a bike", "tomatoes", "python", "chess", "a resume", "knots", "tea", "a poem"]
    pairs = []
    for i in range(n):
        topic = topics[i % len(topics)]
        pairs.append({
            "id": f"synthetic/{i}",
            "prompt": [{"role": "user", "content": f"Can you help me with {topic}? (#{i})"}],
            "chosen": [{"role": "assistant", "content": f"Happy to help with {topic}."}],
            "rejected": [{"role": "assistant", "content": f"No. I will not help you with {topic}, go away and stop asking."}],
        })
    return pairs


def test_reward_model_learns_a_preference_against_length(common, tmp_path):
    cfg = train.RewardArgs(runs_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=2e-4,
                           data=train.DataConfig(heldout_fraction=0.25, n_score=40), seed=1)
    path = train.train("reward", cfg, pairs=_synthetic_pairs(120))
    run = load_run(path)
    assert path.name.startswith("reward__default__s1__")
    assert (path / "model" / "model.safetensors").exists() and not (path / "adapter").exists()
    summary = run.summary
    assert summary["eval/longer_wins"] == 0.0, "by construction the longer answer always loses"
    # ... so the length-only rule fitted on the training pairs prefers the shorter one, and is always right
    assert summary["eval/length_rule_fit"] == "prefer the shorter response"
    assert summary["eval/length_rule"] == 1.0 and summary["eval/length_rule_train_accuracy"] == 1.0
    assert summary["eval/length_rule_n_train"] == summary["train/pairs"]
    assert summary["eval/accuracy"] >= 0.95, summary
    records = run.records("heldout_pairs")
    assert (records["margin"] == records["chosen_score"] - records["rejected_score"]).all()
    # the saved model reproduces the recorded scores
    from transformers import AutoModelForSequenceClassification

    from workbench.modeling import scoring

    model = AutoModelForSequenceClassification.from_pretrained(path / "model")
    tok = models.load_tokenizer(str(path / "model"))
    heldout = [p for p in _synthetic_pairs(120) if p["id"] == records.loc[0, "id"]]
    again = scoring.score_pairs_with_reward(model, tok, heldout)
    assert again[0]["chosen_score"] == pytest.approx(records.loc[0, "chosen_score"], abs=1e-4)


def test_reward_model_on_a_4bit_decoder_trains_an_adapter(common):
    path = train.train("reward", train.RewardArgs(**{**common, "model": ModelConfig(model_name_or_path=common["model"].model_name_or_path)}))
    run = load_run(path)
    assert (path / "adapter" / "adapter_config.json").exists()
    assert {"eval/accuracy", "eval/length_rule", "eval/longer_wins"} <= set(run.summary)
    _check_length_baseline(run, json.loads((path / "split.json").read_text()))
    with pytest.raises(ValueError, match="sft_run does not apply"):
        train.train("reward", train.RewardArgs(sft_run=str(path), **common))


# ---------------------------------------------------------------------------------------------------------
# RL arms against reward-model run folders: a proxy RM on prompt half "a", a gold RM on half "b"


@pytest.fixture(scope="module")
def reward_runs(common):
    """(proxy, gold): two 4-bit decoder reward models (LoRA + score head) trained on disjoint prompt halves."""
    runs = {}
    for half in ("a", "b"):
        cfg = train.RewardArgs(**{**common, "model": ModelConfig(model_name_or_path=common["model"].model_name_or_path),
                                  "data": train.DataConfig(**{**vars(common["data"]), "half": half}), "run_name": f"half-{half}"})
        runs[half] = train.train("reward", cfg)
    return runs["a"], runs["b"]


def test_reward_halves_are_disjoint_and_load_back_with_their_scores(reward_runs):
    from workbench.modeling import rewards

    proxy, gold = reward_runs
    ids = [set(json.loads((p / "split.json").read_text())["train_ids"]) for p in (proxy, gold)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    rf = rewards.load_reward(str(proxy))
    rec = load_run(proxy).records("heldout_pairs").iloc[0]
    pair = [ex for ex in _heldout_pairs(proxy) if ex["id"] == rec["id"]][0]
    got = rf.score([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
    assert got.tolist() == pytest.approx([rec["chosen_score"], rec["rejected_score"]], abs=1e-4)
    with pytest.raises(FileNotFoundError, match="neither a reward-model run folder"):
        rewards.load_reward(str(proxy / "records"))


def _heldout_pairs(run_path):
    from workbench.modeling import data

    cfg = json.loads((run_path / "config.json").read_text())["data"]
    examples, _ = data.load_hh(cfg["subset"], cfg["split"], cfg["source"])
    wanted = set(json.loads((run_path / "split.json").read_text())["heldout_ids"])
    return [ex for ex in examples if ex["id"] in wanted]


def _check_rl_run(path, n_score=3):
    run = load_run(path)
    assert (path / "adapter" / "adapter_config.json").exists()
    rollouts = run.records("heldout_rollouts")
    assert len(rollouts) == n_score
    for _, r in rollouts.iterrows():
        assert len(r["token_logratio"]) == len(r["completion_token_ids"]) == r["response_tokens"]
        assert sum(r["token_logratio"]) == pytest.approx(r["kl"], abs=1e-5)
        assert r["gold_score"] is not None
    assert len(run.records("heldout_pairs")) == n_score
    assert {"eval/objective/scores", "eval/objective/gold_scores", "eval/objective/kl"} <= set(run.summary)
    _check_length_baseline(run, json.loads((path / "split.json").read_text()))
    return run


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_trl_rl_arms_train_against_the_reward_model(common, reward_runs, method):
    proxy, gold = reward_runs
    cfg = train.ARMS[method].config(**{**common, "max_steps": 2, "per_device_train_batch_size": 4},
                                   max_completion_length=4, max_prompt_length=64, reward_model=str(proxy),
                                   gold_reward_model=str(gold))
    run = _check_rl_run(train.train(method, cfg))
    assert "rewards/proxy/mean" in run.metrics and "kl" in run.metrics  # TRL's own names, our RM's name
    steps = run.metrics.dropna(subset=["loss"])  # the last line is the trainer's end-of-training summary
    assert len(steps) == 2 and steps["kl"].notna().all()


def test_ppo_from_an_sft_run_uses_it_as_the_reference(common, sft_run, reward_runs):
    proxy, gold = reward_runs
    cfg = ppo_args(common, sft_run=str(sft_run), reward_model=str(proxy), gold_reward_model=str(gold))
    run = _check_rl_run(train.train("ppo", cfg))
    # the policy starts at the SFT adapter and the reference is that adapter (frozen): no KL before the first update
    assert run.metrics["objective/kl"].iloc[0] == pytest.approx(0, abs=1e-5)
    assert "objective/gold_scores" in run.metrics


def ppo_args(common, **kw):
    from workbench.training import ppo

    return ppo.PPOArgs(model=common["model"], data=common["data"], runs_dir=common["runs_dir"], iterations=2,
                       rollout_batch_size=2, max_new_tokens=4, max_prompt_length=64, **kw)


def test_rl_arms_refuse_to_run_without_a_reward(common):
    for method in ("ppo", "rloo"):
        cfg = ppo_args(common) if method == "ppo" else train.RLOOArgs(**{**common, "per_device_train_batch_size": 4})
        with pytest.raises(ValueError, match="needs a reward"):
            train.train(method, cfg)


def test_every_arm_name_builds_that_arm_and_loss_types_build_dpo():
    """make_config(arm) is that arm with its own config class ("sft" is TRL's SFTTrainer, not DPO's loss type of
    the same name, which once made every SFT run a DPO run on the chosen NLL); other loss types are the DPO arm."""
    for method, config_cls in ((m, a.config) for m, a in train.ARMS.items()):
        arm, cfg = train.make_config(method)
        assert arm == method and type(cfg) is config_cls, method
    arm, cfg = train.make_config("ipo")
    assert (arm, cfg.loss_type) == ("dpo", ["ipo"])
    arm, cfg = train.make_config("dpo", loss_type=["sft"])
    assert (arm, train.method_label(arm, cfg)) == ("dpo", "dpo-sft")


def test_the_seed_reaches_ktos_order_of_examples(hh_pairs):
    """TRL's KTO reads its rows in order (its KL term pairs neighbours in a fixed-order batch), so the unpaired view is
    shuffled by the run's seed: another seed trains on another order of the same rows, one seed always on the same."""
    rows = lambda seed: [(r["completion"][0]["content"], r["label"]) for r in train._dataset("unpaired", hh_pairs[:20], seed)]  # noqa: E731
    assert rows(0) == rows(0) and sorted(rows(0)) == sorted(rows(1)) and rows(0) != rows(1)


@pytest.mark.parametrize("method", ["rloo", "grpo", "trl-online-dpo"])
def test_vllm_is_trls_option_and_what_it_needs_is_asked_before_anything_loads(tiny_model_dir, hh_dir, tmp_path,
                                                                              monkeypatch, method):
    """use_vllm (TRL's own field on its generating arms) reaches the config from flat parameters; without vLLM, or
    without a CUDA GPU, the run fails in validation with what to do, before a model loads or a run folder exists."""
    import importlib.util

    _, cfg = train.make_config(method, model=str(tiny_model_dir), data_source=str(hh_dir), split="test",
                               runs_dir=str(tmp_path), reward_model="vader", use_vllm=True, vllm_mode="colocate")
    assert cfg.use_vllm is True and cfg.vllm_mode == "colocate"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"vLLM is not installed.*pip install -e '\.\[vllm\]'"):
        train.train(method, cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train.train(method, cfg)
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing was started


def test_arms_that_sample_with_the_workbenchs_sampler_name_where_vllm_is_an_option():
    with pytest.raises(ValueError, match=r"unknown parameter 'use_vllm' \(generation by vLLM is TRL's option of "
                                         r"rloo, grpo, trl-online-dpo; this arm samples with the workbench's own"):
        train.make_config("ppo", use_vllm=True)
    with pytest.raises(ValueError, match="unknown parameter 'vllm_mode'.*TRL's option of"):
        train.make_config("online-dpo", vllm_mode="server")
