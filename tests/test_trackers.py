"""Experiment trackers for every arm (workbench/core/trackers.py): ``report_to`` reaches TRL's arms, PPO and online DPO
alike; TensorBoard's event files stay in the run folder and hold the arm's metrics under TRL's names."""

import json
import struct
from pathlib import Path

import pytest

from workbench.modeling import rewards
from workbench.training import train


def _scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar in the run's TensorBoard event files: tag -> values (read with tensorboardX's protobuf)."""
    from tensorboardX.proto import event_pb2

    files = sorted((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run / 'logs'}"
    out: dict = {}
    for f in files:
        raw, i = f.read_bytes(), 0
        while i < len(raw):  # TFRecord: length (8), its CRC (4), the record, its CRC (4)
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append(v.simple_value)
    return out


@pytest.mark.parametrize("method, expect", [
    ("dpo", "train/rewards/margins"),
    ("ppo", "train/objective/kl"),
    ("online-dpo", "train/objective/kl"),
])
def test_every_arm_reports_to_tensorboard_in_its_run_folder(method, expect, tiny_model_dir, hh_dir, tmp_path):
    own = {"dpo": dict(max_length=160, per_device_train_batch_size=2),
           "ppo": dict(per_device_train_batch_size=4, max_new_tokens=4, max_prompt_length=64),
           "online-dpo": dict(per_device_train_batch_size=4, max_new_tokens=4, max_prompt_length=64)}[method]
    _, cfg = train.make_config(method, model=str(tiny_model_dir), data_source=str(hh_dir), split="test", n_train=8,
                               n_score=2, max_steps=2, runs_dir=str(tmp_path), report_to=["tensorboard"], **own)
    reward = rewards.TokenSetReward(list(range(0, 49152, 2))) if method != "dpo" else None
    path = train.train(method, cfg, reward_fn=reward)
    scalars = _scalars(path)
    assert expect in scalars and len(scalars[expect]) == 2, sorted(scalars)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    logged = [m[expect.removeprefix("train/")] for m in metrics if expect.removeprefix("train/") in m]
    assert scalars[expect] == pytest.approx(logged, rel=1e-6)  # the same numbers as metrics.jsonl
    assert json.loads((path / "config.json").read_text())["report_to"] == ["tensorboard"]  # as the user gave it
    assert not (path / "trainer").exists()  # TRL's output folder goes; the logs stay


def test_an_unknown_tracker_is_refused_before_training(tiny_model_dir, hh_dir, tmp_path):
    _, cfg = train.make_config("dpo", model=str(tiny_model_dir), data_source=str(hh_dir), split="test", n_train=4,
                               max_steps=1, runs_dir=str(tmp_path), report_to="tensorbored")
    with pytest.raises(ValueError, match="'tensorbored' is not a tracker transformers knows"):
        train.train("dpo", cfg)


def _wandb_history(run: Path) -> tuple[str, list[dict]]:
    """(the run's display name, its logged rows) from the offline run wandb kept in the run folder: its .wandb file
    is a record log (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: CRC, length, kind),
    each record one of wandb's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"one offline wandb run in {run / 'logs' / 'wandb'}: {files}"
    raw, i, block, records, part = files[0].read_bytes(), 7, 32768, [], b""
    while i + 7 <= len(raw):
        if block - i % block < 7:  # a block's tail too short for a header is padding
            i += block - i % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[i:i + 7])
        data, i = raw[i + 7:i + 7 + n], i + 7 + n
        if kind == 0:
            break
        part = data if kind in (1, 2) else part + data  # full, first, middle, last
        if kind in (1, 4):
            records.append(part)
    name, rows = None, []
    for data in records:
        record = pb.Record.FromString(data)
        if record.WhichOneof("record_type") == "run":
            name = record.run.display_name
        elif record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return name, rows


def test_wandb_offline_keeps_its_run_in_the_run_folder(tiny_model_dir, hh_dir, tmp_path, monkeypatch):
    """report_to=wandb with WANDB_MODE=offline: wandb's run is in <run>/logs/wandb, finished before the folder was
    renamed (no .partial folder left behind), named as the run folder, with the arm's metrics under TRL's names and
    the same numbers as metrics.jsonl; WANDB_DIR is the user's again afterwards."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    _, cfg = train.make_config("dpo", model=str(tiny_model_dir), data_source=str(hh_dir), split="test", n_train=8,
                               max_steps=2, runs_dir=str(tmp_path), report_to="wandb", max_length=160,
                               per_device_train_batch_size=2)
    path = train.train("dpo", cfg)
    name, rows = _wandb_history(path)
    assert name == path.name
    margins = [r["train/rewards/margins"] for r in rows if "train/rewards/margins" in r]
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert margins == pytest.approx([m["rewards/margins"] for m in metrics if "rewards/margins" in m], rel=1e-6)
    assert len(margins) == 2
    assert not list(tmp_path.glob("*.partial")) and "WANDB_DIR" not in __import__("os").environ
