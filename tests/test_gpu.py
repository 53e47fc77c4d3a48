"""The QLoRA path on a CUDA GPU: NF4 weights on the device, bf16 compute, a DPO step, PPO and RLOO. Skipped with a visible
reason where there is no GPU (conftest.py); run on a GPU machine with `bash scripts/test.sh -m gpu`."""

import json

import pytest
import torch

from workbench.modeling import logprobs, models
from workbench.training import train
from workbench.modeling.models import ModelConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def auto_is_the_hardwares(monkeypatch):
    """These tests check what dtype="auto" does on a GPU: lift the suite's fp32 pin (conftest.py) for them."""
    monkeypatch.delenv("WORKBENCH_DTYPE", raising=False)


def test_4bit_policy_on_gpu_uses_bf16_compute_and_matches_a_plain_loop(tiny_model_dir, hh_pairs):
    from bitsandbytes.nn import Linear4bit

    policy, tok = models.load_policy(ModelConfig(model_name_or_path=str(tiny_model_dir)))
    layers = [m for m in policy.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert models.compute_dtype("auto") == torch.bfloat16 and layers[0].compute_dtype == torch.bfloat16
    prompts, completions = [], []
    for ex in hh_pairs[:3]:
        p, (c, r) = models.encode_many(tok, ex["prompt"], [ex["chosen"], ex["rejected"]])
        prompts += [p, p]
        completions += [c, r]
    batched = logprobs.completion_logps(policy, prompts, completions, pad_id=tok.pad_token_id, batch_size=4)
    single = [logprobs.completion_logps(policy, [p], [c], pad_id=tok.pad_token_id).sum for p, c in zip(prompts, completions)]
    torch.testing.assert_close(batched.sum, torch.cat(single), atol=0.5, rtol=1e-2)  # bf16: loose


def test_dpo_step_on_gpu_in_bf16(tiny_model_dir, hh_dir, tmp_path):
    cfg = train.DPOArgs(model=ModelConfig(model_name_or_path=str(tiny_model_dir)), runs_dir=str(tmp_path), max_steps=2,
                        data=train.DataConfig(split="test", source=str(hh_dir), n_train=8, n_score=4, max_length=256))
    assert cfg.bf16 is True
    path = train.train("dpo", cfg)
    assert (path / "adapter" / "adapter_model.safetensors").exists()


def test_ppo_and_rloo_on_gpu_in_bf16(tiny_model_dir, hh_dir, tmp_path):
    """The RL arms' QLoRA path on a GPU: generation, the two adapters and the TRL trainer in bf16."""
    from workbench.training import ppo
    from workbench.modeling import rewards

    reward = rewards.TokenSetReward(range(0, 49152, 2))
    data_cfg = train.DataConfig(split="test", source=str(hh_dir), n_train=8, n_score=4, max_length=256)
    model_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir))
    path = train.train("ppo", ppo.PPOArgs(model=model_cfg, data=data_cfg, runs_dir=str(tmp_path), iterations=2,
                                          rollout_batch_size=4, max_new_tokens=8), reward_fn=reward)
    assert (path / "critic" / "value_head.pt").exists()
    path = train.train("rloo", train.RLOOArgs(model=model_cfg, data=data_cfg, runs_dir=str(tmp_path), max_steps=2,
                                              max_completion_length=8), reward_fn=reward)
    assert (path / "records" / "heldout_rollouts.jsonl").exists()


def test_grpo_generates_with_vllm_on_gpu(tiny_model_dir, hh_dir, tmp_path):
    """use_vllm=True (TRL's colocated vLLM) on GRPO with the QLoRA policy: TRL loads the base into vLLM beside the
    trainer and pushes the merged adapter before each generation. Needs the ``vllm`` extra as well as a GPU."""
    import importlib.util

    from workbench.modeling import rewards

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]'): use_vllm=True is not exercised here")
    reward = rewards.TokenSetReward(range(0, 49152, 2))
    _, cfg = train.make_config("grpo", model=str(tiny_model_dir), data_source=str(hh_dir), split="test", n_train=8,
                               n_score=4, max_length=256, runs_dir=str(tmp_path), max_steps=2, max_new_tokens=8,
                               use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2)
    path = train.train("grpo", cfg, reward_fn=reward)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("rewards/") for m in metrics for key in m)  # TRL logged the reward of vLLM's samples
    assert (path / "records" / "heldout_rollouts.jsonl").exists()
