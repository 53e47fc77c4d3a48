"""A training run killed mid-way resumes from its last checkpoint when started again with the same parameters and
run id, and ends where an uninterrupted run ends: same adapter, each step logged once, the whole run's token
counts. (TRL arms; our PPO does not checkpoint yet.)"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from workbench.runs import is_complete, load_run

# train through the command line, SIGKILL-ing the process right after step 3 (the checkpoint of step 2 is on disk)
KILL_AFTER_STEP_3 = """
import os, signal, sys
from transformers import TrainerCallback
from workbench import __main__ as cli, train

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
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    a, b = (load_run(next(p for p in (tmp_path / d).iterdir() if is_complete(p))) for d in ("whole", "killed"))
    wa, wb = (load_file(str(r.path / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    losses = b.metrics.dropna(subset=["loss"])
    assert list(losses["step"]) == [1, 2, 3, 4], "each step logged once"
    assert losses["loss"].tolist() == pytest.approx(a.metrics.dropna(subset=["loss"])["loss"].tolist(), abs=1e-6)
    tokens = [json.loads((r.path / "compute.json").read_text())["tokens"]["train"] for r in (a, b)]
    assert tokens[0] == tokens[1] > 0, "the resumed run counts the steps before the kill too"
    assert not (b.path / "trainer").exists() and not partial.exists()


def test_checkpoints_need_a_run_id():
    from workbench import train

    with pytest.raises(ValueError, match="checkpoint_every needs"):
        train.make_config("dpo", checkpoint_every=2)
