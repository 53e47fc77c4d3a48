"""The GPU's dtype path on the CPU: every arm trains once in bf16 on the tiny model, whatever the CPU (slow
without AMX/AVX512-BF16, but the tiny model does not care), so dtype bugs a GPU would hit show here. And
``dtype="auto"``: bf16 exactly where the hardware computes it natively, recorded in env.json."""


import pytest
import torch

from workbench.modeling import models, runs
from workbench.training import online_dpo, ppo, train
from workbench.modeling.models import ModelConfig
from workbench.modeling.runs import load_run


@pytest.fixture(scope="module")
def bf16(tiny_model_dir, hh_dir, tmp_path_factory):
    return dict(
        model=ModelConfig(model_name_or_path=str(tiny_model_dir), dtype="bfloat16"),
        data=train.DataConfig(split="test", source=str(hh_dir), n_train=4, n_score=2, max_length=160),
        runs_dir=str(tmp_path_factory.mktemp("runs-bf16")),
        max_steps=1, per_device_train_batch_size=2, max_length=160,
    )


def _finite(summary: dict) -> bool:
    return all(torch.isfinite(torch.tensor(float(v))) for v in summary.values() if isinstance(v, (int, float)))


def _trained_tensors_are_fp32(path):
    """Mixed precision: the saved trained weights (adapter or full model) are float32."""
    from safetensors.torch import load_file

    files = list((path / "adapter").glob("*.safetensors")) + list((path / "model").glob("*.safetensors"))
    assert files, f"nothing saved in {path}"
    dtypes = {t.dtype for f in files for t in load_file(f).values()}
    assert dtypes == {torch.float32}, dtypes


@pytest.fixture(scope="module")
def sft_bf16(bf16):
    return train.train("sft", train.SFTArgs(**bf16))


def test_sft_in_bf16(sft_bf16):
    run = load_run(sft_bf16)
    assert run.config["bf16"] is True and _finite(run.summary)
    _trained_tensors_are_fp32(sft_bf16)


@pytest.mark.parametrize("method,kw", [("dpo", {}), ("kto", {"per_device_train_batch_size": 4}), ("orpo", {}),
                                       ("simpo", {})])
def test_preference_arms_in_bf16(bf16, sft_bf16, method, kw):
    cfg = train.ARMS[method].config(**{**bf16, **kw}, **({"sft_run": str(sft_bf16)} if method in ("dpo", "kto") else {}))
    path = train.train(method, cfg)
    run = load_run(path)
    assert run.config["bf16"] is True and _finite(run.summary) and run.metrics["loss"].dropna().map(float).notna().all()
    _trained_tensors_are_fp32(path)
    records = run.records("heldout_pairs")
    assert records["policy_chosen_logp"].map(lambda v: v < 0).all()  # real log-probs through the bf16 path


def test_dpo_on_an_unquantized_bf16_base(bf16):
    cfg = train.DPOArgs(**{**bf16, "model": ModelConfig(model_name_or_path=bf16["model"].model_name_or_path,
                                                        dtype="bfloat16", load_in_4bit=False)})
    path = train.train("dpo", cfg)
    assert _finite(load_run(path).summary)
    _trained_tensors_are_fp32(path)


@pytest.fixture(scope="module")
def reward_bf16(bf16):
    """The main job's reward model: the embedded MiniLM encoder, trained in full, in bf16 mixed precision."""
    cfg = train.RewardArgs(**{**bf16, "model": ModelConfig(model_name_or_path=models.EMBEDDED_REWARD_BACKBONE,
                                                           load_in_4bit=False, use_peft=False, dtype="bfloat16")})
    return train.train("reward", cfg)


def test_reward_model_in_bf16_keeps_fp32_master_weights(reward_bf16):
    run = load_run(reward_bf16)
    assert run.config["bf16"] is True and _finite(run.summary)
    _trained_tensors_are_fp32(reward_bf16)


def test_a_4bit_decoder_reward_model_in_bf16(bf16):
    path = train.train("reward", train.RewardArgs(**bf16))
    assert _finite(load_run(path).summary)
    _trained_tensors_are_fp32(path)


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_trl_rl_arms_in_bf16(bf16, reward_bf16, method):
    cfg = train.ARMS[method].config(**{**bf16, "max_steps": 1, "per_device_train_batch_size": 4},
                                   max_completion_length=4, max_prompt_length=64, reward_model=str(reward_bf16))
    path = train.train(method, cfg)
    run = load_run(path)
    assert run.config["bf16"] is True and _finite(run.summary)
    _trained_tensors_are_fp32(path)


def test_ppo_in_bf16(bf16, reward_bf16):
    cfg = ppo.PPOArgs(model=bf16["model"], data=bf16["data"], runs_dir=bf16["runs_dir"], iterations=2,
                      rollout_batch_size=2, max_new_tokens=4, max_prompt_length=64, reward_model=str(reward_bf16))
    path = train.train("ppo", cfg)
    run = load_run(path)
    assert run.metrics["objective/kl"].iloc[0] == pytest.approx(0, abs=1e-3)  # π = π_ref before the first update
    assert _finite(run.summary) and run.metrics["loss/policy"].notna().all()
    _trained_tensors_are_fp32(path)


def test_trl_online_dpo_in_bf16(bf16, reward_bf16):
    cfg = train.ARMS["trl-online-dpo"].config(**{**bf16, "max_steps": 1, "per_device_train_batch_size": 2},
                                             max_new_tokens=4, max_prompt_length=64, reward_model=str(reward_bf16))
    path = train.train("trl-online-dpo", cfg)
    run = load_run(path)
    assert run.config["bf16"] is True and _finite(run.summary)
    _trained_tensors_are_fp32(path)


def test_online_dpo_in_bf16(bf16, reward_bf16):
    cfg = online_dpo.OnlineDPOArgs(model=bf16["model"], data=bf16["data"], runs_dir=bf16["runs_dir"], rounds=2,
                                   prompts_per_round=2, max_new_tokens=4, max_prompt_length=64,
                                   reward_model=str(reward_bf16), refresh_reference_every=1)
    path = train.train("online-dpo", cfg)
    run = load_run(path)
    assert run.metrics["objective/kl"].iloc[0] == pytest.approx(0, abs=1e-3)  # round 1 samples from π = π_ref
    assert _finite(run.summary) and run.metrics["train/loss"].notna().any()
    _trained_tensors_are_fp32(path)


def test_4bit_layers_compute_in_the_chosen_dtype(tiny_model_dir):
    import bitsandbytes as bnb

    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        policy, _ = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir), dtype=name))
        layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(m.compute_dtype == dtype for m in layers)
        assert {p.dtype for n, p in policy.named_parameters() if p.requires_grad} == {torch.float32}  # LoRA: fp32


@pytest.mark.parametrize("caps,expected", [({"cpu_name": "x", "avx512_bf16": True}, torch.bfloat16),
                                           ({"cpu_name": "x", "amx_bf16": True}, torch.bfloat16),
                                           ({"cpu_name": "x", "avx2": True}, torch.float32)])
def test_auto_is_bf16_exactly_where_the_cpu_computes_it(monkeypatch, caps, expected):
    monkeypatch.delenv("WORKBENCH_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    assert models.compute_dtype("auto") == expected
    _, cfg = train.make_config("dpo")
    assert cfg.bf16 is (expected == torch.bfloat16)
    # without a GPU, always: transformers needs it for bf16, and for data parallelism over CPU processes (torchrun)
    assert cfg.use_cpu is (not torch.cuda.is_available())
    # full fine-tuning keeps float32 master weights; a frozen 4-bit or LoRA base computes in the chosen dtype
    assert models.weights_dtype(ModelConfig(load_in_4bit=False, use_peft=False)) == torch.float32
    assert models.weights_dtype(ModelConfig()) == expected
    env = runs.environment()
    assert env["dtype_auto"] == str(expected).removeprefix("torch.") and env["native_bf16"] is (expected == torch.bfloat16)


def test_workbench_dtype_overrides_auto_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setenv("WORKBENCH_DTYPE", "bfloat16")
    assert models.compute_dtype("auto") == torch.bfloat16
    assert models.compute_dtype("float32") == torch.float32  # an explicit dtype wins over the override
    monkeypatch.setenv("WORKBENCH_DTYPE", "fp32")
    with pytest.raises(ValueError, match="WORKBENCH_DTYPE='fp32'"):
        models.compute_dtype("auto")
    with pytest.raises(ValueError, match="ModelConfig.dtype='half'"):
        models.compute_dtype("half")
