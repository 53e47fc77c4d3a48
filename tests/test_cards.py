"""A run's adapter as an artifact (workbench/training/cards.py): it loads in a fresh process with PEFT and transformers alone,
offline, by the base name it records; its model card says what it is; push_to_hub uploads the folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.training import cards, train
from workbench.modeling import models

LOAD_AND_GENERATE = r"""
import json, sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
adapter = sys.argv[1]
tok = AutoTokenizer.from_pretrained(adapter)
model = AutoPeftModelForCausalLM.from_pretrained(adapter)
ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
print(json.dumps({"base": model.peft_config["default"].base_model_name_or_path, "new_tokens": out.shape[1] - ids.shape[1],
                  "text": tok.decode(out[0, ids.shape[1]:])}))
"""


@pytest.mark.slow
def test_an_adapter_loads_elsewhere_offline_by_its_recorded_base_name(tmp_path, hh_dir):
    _, cfg = train.make_config("dpo", data_source=str(hh_dir), split="test", n_train=4, n_score=2, max_steps=1,
                               per_device_train_batch_size=2, max_length=160, runs_dir=str(tmp_path / "runs"))
    run = train.train("dpo", cfg)
    adapter = run / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((adapter / "workbench.json").read_text())["base_model"] == models.EMBEDDED_POLICY
    assert (adapter / "tokenizer_config.json").exists() and (adapter / "README.md").exists()
    # another machine: the hub model in the standard Hugging Face cache under its name, no network, no workbench cache
    local = Path(models.resolve_model_path(models.EMBEDDED_POLICY))
    snap = tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0"
    snap.mkdir(parents=True)
    for f in local.iterdir():
        if f.is_file():
            (snap / f.name).symlink_to(f)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "WORKBENCH_CACHE": str(tmp_path / "no-workbench-cache"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(adapter)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["base"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and got["new_tokens"] >= 1
    assert not (tmp_path / "no-workbench-cache").exists()


def test_the_model_card_says_what_the_run_is_and_what_it_measured(tmp_path):
    run = tmp_path / "dpo__default__s3__x"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"seed": 3, "beta": 0.2, "loss_type": ["ipo"], "sft_run": "/r/sft__default__s3__y",
                                                 "model": {"model_name_or_path": models.EMBEDDED_POLICY, "load_in_4bit": True},
                                                 "data": {"source": "/d/mine.parquet", "split": "train", "n_train": 64}}))
    (run / "summary.json").write_text(json.dumps({"train/steps": 8, "train/pairs": 64}))
    card = cards.write_model_card(run).read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "**dpo**" in card
    assert "| β | 0.2 |" in card and "| seed | 3 |" in card and "mine.parquet" in card and "sft__default__s3__y" in card
    assert "Not evaluated yet" in card and "Q4_1 GGUF" in card
    ev = run / "eval" / "default"
    ev.mkdir(parents=True)
    (ev / "config.json").write_text(json.dumps({"n_prompts": 64, "n_samples": 2, "temperature": 0.7, "max_new_tokens": 24,
                                               "gold_reward_model": "vader"}))
    (ev / "summary.json").write_text(json.dumps({"eval/gold": 0.41, "eval/gold_lo": 0.35, "eval/gold_hi": 0.47,
                                                "eval/kl": 4.2, "eval/gold_vs_sft": 0.2, "eval/gold_vs_sft_lo": 0.1,
                                                "eval/gold_vs_sft_hi": 0.3}))
    card = cards.write_model_card(run).read_text()
    assert "| `default` | 64 × 2 at T = 0.7, ≤ 24 tokens | vader | 0.410 [0.350, 0.470] | 4.200 | 0.200 [0.100, 0.300] |" in card


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    """A local stand-in for the hub: HfApi's create_repo and upload_folder copy into a folder."""
    import shutil

    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, private=None, exist_ok=False, **kw: calls.append(("create", repo_id, private)))

    def upload(self, repo_id, folder_path, commit_message=None, **kw):
        shutil.copytree(folder_path, hub / repo_id)
        calls.append(("upload", repo_id, commit_message))
        return f"local://{repo_id}"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    run = tmp_path / "kto__default__s0__x"
    (run / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        (run / "adapter" / name).write_text(name)
    assert cards.push_to_hub(run, "me/kto-adapter") == "local://me/kto-adapter"
    assert calls == [("create", "me/kto-adapter", True), ("upload", "me/kto-adapter", "workbench: kto__default__s0__x")]
    assert sorted(p.name for p in (hub / "me" / "kto-adapter").iterdir()) == sorted(p.name for p in (run / "adapter").iterdir())
    with pytest.raises(FileNotFoundError, match="only runs that trained an adapter"):
        cards.push_to_hub(tmp_path / "nothing", "me/x")
