"""A training run killed mid-way resumes from its last checkpoint when started again with the same parameters and
run id, and ends where an uninterrupted run ends: same adapter, each step logged once, the whole run's token
counts. DPO (a TRL arm, through TRL's resume_from_checkpoint) and our PPO (policy, critic, value head, optimizer,
KL controller, RNG states and rollouts)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from workbench.modeling.runs import is_complete, load_run

# train through the command line, SIGKILL-ing the process right after step 3 (the checkpoint of step 2 is on disk)
KILL_AFTER_STEP_3 = """
import os, signal, sys
from transformers import TrainerCallback
from workbench import __main__ as cli
from workbench.training import train

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

build = train.build_trainer
def build_and_kill(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(Kill())
    return trainer
train.build_trainer = build_and_kill
sys.exit(cli.main(sys.argv[1:]))
"""


def _train(args, runs, script=None):
    env = {**os.environ, "WORKBENCH_DTYPE": "float32"}
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "workbench"]
    return subprocess.run([*head, "train", *args, "--runs-dir", str(runs)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_killed_dpo_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tiny_model_dir, hh_dir, tmp_path):
    args = ["dpo", "--model", str(tiny_model_dir), "--data-source", str(hh_dir), "--split", "test", "--n-train", "8",
            "--n-score", "2", "--max-steps", "4", "--per-device-train-batch-size", "2", "--max-length", "160",
            "--learning-rate", "1e-3", "--checkpoint-every", "2", "--run-id", "job-1"]
    whole = _train(args, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _train(args, tmp_path / "killed", KILL_AFTER_STEP_3)
    assert killed.returncode != 0  # SIGKILL
    partial = tmp_path / "killed" / "dpo__default__s0__job-1.partial"
    assert (partial / "trainer" / "checkpoint-2").is_dir() and not is_complete(partial)
    resumed = _train(args, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr  # the log, on stderr
    a, b = (load_run(next(p for p in (tmp_path / d).iterdir() if is_complete(p))) for d in ("whole", "killed"))
    wa, wb = (load_file(str(r.path / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    losses = b.metrics.dropna(subset=["loss"])
    assert list(losses["step"]) == [1, 2, 3, 4], "each step logged once"
    assert losses["loss"].tolist() == pytest.approx(a.metrics.dropna(subset=["loss"])["loss"].tolist(), abs=1e-6)
    tokens = [json.loads((r.path / "compute.json").read_text())["tokens"]["train"] for r in (a, b)]
    assert tokens[0] == tokens[1] > 0, "the resumed run counts the steps before the kill too"
    assert not (b.path / "trainer").exists() and not partial.exists()


# PPO on the tiny model with a one-token-set reward; KILL_AT=N SIGKILLs the process once iteration N is logged
PPO = """
import os, signal, sys
import torch
from workbench.modeling import data, models, rewards, runs
from workbench.training import ppo, train

model_dir, hh_dir, runs_dir = sys.argv[1:4]
kill_at = int(os.environ.get("KILL_AT", 0))
log = runs.Run.log
def log_and_kill(self, metrics, step):
    log(self, metrics, step)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
runs.Run.log = log_and_kill
cfg = ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=model_dir), iterations=4, rollout_batch_size=4,
                  num_minibatches=2, max_new_tokens=3, learning_rate=1e-3, kl_coef=0.1, adaptive_kl=True,
                  target_kl=0.01, max_prompt_length=64, runs_dir=runs_dir, run_id="job-1", checkpoint_every=2,
                  data=data.DataConfig(split="test", source=hh_dir, n_train=8, n_score=2, max_length=256))
train.train("ppo", cfg, reward_fn=rewards.TokenSetReward(list(range(0, 49152, 2))))
"""


def _ppo(tiny_model_dir, hh_dir, runs, kill_at=0):
    env = {**os.environ, "WORKBENCH_DTYPE": "float32", "KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", PPO, str(tiny_model_dir), str(hh_dir), str(runs)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_killed_ppo_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tiny_model_dir, hh_dir, tmp_path):
    whole = _ppo(tiny_model_dir, hh_dir, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _ppo(tiny_model_dir, hh_dir, tmp_path / "killed", kill_at=3)
    assert killed.returncode != 0  # SIGKILL after iteration 3, the checkpoint of iteration 2 on disk
    partial = tmp_path / "killed" / "ppo__default__s0__job-1.partial"
    assert (partial / "trainer" / "checkpoint-2" / "ppo_state.pt").exists() and not is_complete(partial)
    resumed = _ppo(tiny_model_dir, hh_dir, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr  # the log, on stderr
    a, b = (load_run(next(p for p in (tmp_path / d).iterdir() if is_complete(p))) for d in ("whole", "killed"))
    for rel in ("adapter/adapter_model.safetensors", "critic/value/adapter_model.safetensors"):
        wa, wb = (load_file(str(r.path / rel)) for r in (a, b))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6, rel
    assert max((wa[k]).abs().max().item() for k in wa if "lora_B" in k) > 0, "the critic trained"
    import torch

    ha, hb = (torch.load(r.path / "critic" / "value_head.pt") for r in (a, b))
    assert all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha)
    assert list(b.metrics["step"]) == [1, 2, 3, 4], "each iteration logged once"
    for name in ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value"):
        assert b.metrics[name].tolist() == pytest.approx(a.metrics[name].tolist(), abs=1e-6), name
    assert a.metrics["objective/kl_coef"].nunique() > 1, "the adaptive KL coefficient moved: its state was resumed"
    ra, rb = a.records("rollouts"), b.records("rollouts")
    assert len(rb) == 16 and rb["completion"].tolist() == ra["completion"].tolist()
    tokens = [json.loads((r.path / "compute.json").read_text())["tokens"] for r in (a, b)]
    assert tokens[0] == tokens[1], "the resumed run counts the iterations before the kill too"
    assert not (b.path / "trainer").exists() and not partial.exists()


def test_checkpoints_need_a_run_id():
    from workbench.training import ppo, train

    with pytest.raises(ValueError, match="checkpoint_every needs"):
        train.make_config("dpo", checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every needs"):
        ppo.PPOArgs(checkpoint_every=2)


def test_checkpoints_under_several_processes_are_refused(tmp_path):
    """On restart only rank 0 would find its checkpoint (the others write into scratch folders): refused, clearly."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "WORKBENCH_DTYPE": "float32"}
    for method in ("dpo", "ppo"):
        extra = ["--reward-model", "x"] if method == "ppo" else []
        proc = subprocess.run([sys.executable, "-m", "workbench", "train", method, *extra, "--checkpoint-every", "2",
                               "--run-id", "j", "--runs-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and "checkpoint_every under several processes" in proc.stderr, proc.stderr[-500:]
    assert not list(tmp_path.iterdir())
