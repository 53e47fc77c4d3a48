"""Training under several processes (torchrun, gloo on CPU), each compared with one process over the same global
batch, and only rank 0 writing the one run folder: DPO on 2 processes of 2 pairs equals DPO on 1 process of 4 pairs
(all 4 training pairs, so the sampler's grouping cannot differ); our PPO on 2 processes of 2 prompts equals PPO on 1
process of 4 (rollouts fixed per prompt, so only the distribution of the work differs: whitening over the global
batch, gradients averaged over processes), and both processes end with the same parameters."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.modeling.runs import is_complete, load_run

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], nproc: int, runs: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DTYPE": "float32"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "workbench", "train", *args]
    else:
        cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "-m", "workbench", "train", *args]
    proc = subprocess.run([*cmd, "--runs-dir", str(runs)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p for p in runs.iterdir()]
    assert len(folders) == 1 and is_complete(folders[0]), [p.name for p in folders]  # one writer: rank 0
    return folders[0]


def test_dpo_on_two_processes_equals_one_process_over_the_same_global_batch(tiny_model_dir, hh_dir, tmp_path):
    # 4 training pairs: every step's global batch is all of them, on 2 processes × 2 pairs as on 1 process × 4
    common = ["dpo", "--model", str(tiny_model_dir), "--data-source", str(hh_dir), "--split", "test", "--n-train", "4",
              "--n-score", "2", "--max-steps", "2", "--max-length", "160", "--learning-rate", "1e-3"]
    two = _train([*common, "--per-device-train-batch-size", "2"], 2, tmp_path / "two")
    one = _train([*common, "--per-device-train-batch-size", "4"], 1, tmp_path / "one")
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (two, one))
    assert a.keys() == b.keys() and a
    moved = max((t.abs().max().item() for k, t in a.items() if "lora_B" in k))
    assert moved > 1e-4, "the adapter did not train"
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4 * max(1.0, moved), f"2 processes differ from 1 by {diff} (adapter moved {moved})"
    # compute.json sums the processes' counts (the counts themselves under DDP: see docs/arms.md, "Several processes")
    assert json.loads((two / "compute.json").read_text())["tokens"]["train"] > 0


def test_judge_labels_on_two_processes_equal_one_process(tiny_model_dir, hh_dir, tmp_path):
    """pair_labels="judge" under torchrun: each process judges its share of the pairs and all get every label; the
    labels, the trained adapter and the judge's token count equal those of one process."""
    common = ["dpo", "--model", str(tiny_model_dir), "--data-source", str(hh_dir), "--split", "test", "--n-train", "6",
              "--n-score", "2", "--max-steps", "1", "--max-length", "160", "--learning-rate", "1e-3",
              "--pair-labels", "judge", "--judge-model", str(tiny_model_dir)]
    two = _train([*common, "--per-device-train-batch-size", "1"], 2, tmp_path / "two")
    one = _train([*common, "--per-device-train-batch-size", "2"], 1, tmp_path / "one")
    labels = [[json.loads(line) for line in (p / "records" / "judge_labels.jsonl").read_text().splitlines()]
              for p in (two, one)]
    assert [r["id"] for r in labels[0]] == [r["id"] for r in labels[1]] and len(labels[0]) == 6
    assert [r["label"] for r in labels[0]] == [r["label"] for r in labels[1]]
    for a, b in zip(*labels):
        assert abs(a["p_human_chosen"] - b["p_human_chosen"]) < 1e-5
    tokens = [json.loads((p / "compute.json").read_text())["tokens"]["judge_forward"] for p in (two, one)]
    assert tokens[0] == tokens[1] > 0, tokens  # judged once in all, not once per process
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (two, one))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# PPO on the tiny model; each prompt's response is a fixed function of its tokens (not sampled), so the rollouts are
# the same whichever process holds the prompt. Each process saves its trained parameters to <dump>/rank<r>.pt.
PPO_FIXED_ROLLOUTS = """
import os, sys
import torch
from workbench.modeling import data, models, rewards
from workbench.core import distributed
from workbench.training import ppo, train

model_dir, hh_dir, runs_dir, dump = sys.argv[1:5]

def fixed_responses(model, tokenizer, prompt_ids, max_new_tokens, temperature):
    rows = [[(sum(p) * 31 + 7 * k) % 49152 for k in range(max_new_tokens)] for p in prompt_ids]
    response = torch.tensor(rows)
    return response, torch.ones_like(response, dtype=torch.bool), torch.zeros(len(rows), dtype=torch.bool)
ppo.generate = fixed_responses

run_ppo = ppo.PPOTrainer.train
def train_and_dump(self, *args, **kwargs):
    out = run_ppo(self, *args, **kwargs)
    torch.save({k: v.detach().clone() for k, v in self._trained().items()}, os.path.join(dump, f"rank{distributed.world()[0]}.pt"))
    return out
ppo.PPOTrainer.train = train_and_dump

cfg = ppo.PPOArgs(model=models.ModelConfig(model_name_or_path=model_dir), iterations=2, rollout_batch_size=4,
                  num_minibatches=1, ppo_epochs=2, max_new_tokens=3, learning_rate=1e-3, kl_coef=0.1,
                  max_prompt_length=64, runs_dir=runs_dir,
                  data=data.DataConfig(split="test", source=hh_dir, n_train=8, n_score=2, max_length=256))
train.train("ppo", cfg, reward_fn=rewards.TokenSetReward(list(range(0, 49152, 2))))
"""


def test_ppo_on_two_processes_equals_one_process_over_the_same_global_batch(tiny_model_dir, hh_dir, tmp_path):
    script = tmp_path / "ppo_fixed.py"
    script.write_text(PPO_FIXED_ROLLOUTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DTYPE": "float32"}
    params, folders = {}, {}
    for nproc in (2, 1):
        runs, dump = tmp_path / f"runs{nproc}", tmp_path / f"dump{nproc}"
        dump.mkdir()
        head = ([TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
                if nproc == 2 else [sys.executable])
        proc = subprocess.run([*head, str(script), str(tiny_model_dir), str(hh_dir), str(runs), str(dump)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = list(runs.iterdir())
        assert len(found) == 1 and is_complete(found[0]), [p.name for p in found]  # one writer: rank 0
        folders[nproc] = found[0]
        params[nproc] = [torch.load(p) for p in sorted(dump.glob("rank*.pt"))]
    assert len(params[2]) == 2 and len(params[1]) == 1
    rank0, rank1 = params[2]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the two processes ended with different parameters"
    one = params[1][0]
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k)
    assert moved > 1e-4, "PPO did not train"
    diff = max((rank0[k] - one[k]).abs().max().item() for k in one)
    assert diff < 1e-5 * max(1.0, moved), f"2 processes differ from 1 by {diff} (LoRA B moved {moved})"
    a, b = (load_run(folders[n]) for n in (2, 1))
    for name in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "val/explained_variance"):
        assert a.metrics[name].tolist() == pytest.approx(b.metrics[name].tolist(), abs=1e-5), name
    ra, rb = a.records("rollouts"), b.records("rollouts")
    assert len(ra) == len(rb) == 8 and ra["id"].tolist() == rb["id"].tolist()  # the global batch, in prompt order
    ta, tb = (json.loads((f / "compute.json").read_text())["tokens"] for f in (folders[2], folders[1]))
    assert ta["generated"] == tb["generated"] == 0  # fixed rollouts: nothing was generated by the model
    assert ta["reference_forward"] == tb["reference_forward"] > 0, "compute sums both processes' forwards"
