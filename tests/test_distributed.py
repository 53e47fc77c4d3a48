"""Training under several processes (torchrun, gloo on CPU): DPO on 2 processes of 2 pairs equals DPO on 1 process
of 4 pairs (the same global batch: all 4 training pairs, so the sampler's grouping cannot differ), and only rank 0
writes the one run folder. Our PPO refuses several processes
with a clear message until its combined DDP backward exists."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.runs import is_complete

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
    import json

    assert json.loads((two / "compute.json").read_text())["tokens"]["train"] > 0


def test_ppo_refuses_several_processes_with_a_clear_message(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "WORKBENCH_DTYPE": "float32"}
    proc = subprocess.run([sys.executable, "-m", "workbench", "train", "ppo", "--reward-model", "x", "--runs-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Our PPO runs in one process for now" in proc.stderr
    assert not list(tmp_path.iterdir())
