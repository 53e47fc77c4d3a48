"""Tests for workbench/modeling/runs.py: the run-folder contract (atomic write, failure, reading back, seeds, JSON, env)."""

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.modeling.runs import (
    Run,
    environment,
    list_runs,
    load_run,
    parse_run_name,
    run_name,
    set_seed,
    to_jsonable,
)

BASE_COLUMNS = ["method", "name", "seed", "timestamp", "path"]


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)


@dataclasses.dataclass
class Config:
    beta: float = 0.1
    loss: str = "sigmoid"
    optim: Optim = dataclasses.field(default_factory=Optim)


def only_child(root: Path) -> Path:
    """The one folder under root (runs tests write exactly one)."""
    children = list(root.iterdir())
    assert len(children) == 1, children
    return children[0]


def write_run(root, method="dpo", name="beta0.1", seed=0, config=None, summary=None, metrics=()):
    with Run(method, name, seed=seed, config=config if config is not None else Config(), root=root) as run:
        for step, m in enumerate(metrics):
            run.log(m, step=step)
        run.summary.update(summary or {})
    return run


# ----------------------------------------------------------------------------------------------------------
# A clean run


def test_clean_run_writes_every_file_and_renames(tmp_path):
    records = [{"prompt": "hi", "chosen_logps": [-1.0, -2.5], "margin": 0.5},
               {"prompt": "yo", "chosen_logps": [-0.5], "margin": -1.0}]
    with Run("dpo", "beta0.1", seed=3, config=Config(), root=tmp_path) as run:
        run.log({"loss": 0.69, "rewards/margins": 0.0}, step=0)
        run.log({"loss": 0.5, "rewards/margins": 0.25}, step=10)
        run.write_records("pairs", records)
        run.summary["loss"] = 0.5

    final = tmp_path / run.folder
    assert run.path == final
    assert final.is_dir()
    assert not list(tmp_path.glob("*.partial")), "the .partial folder must be renamed away"
    assert only_child(tmp_path) == final
    assert {p.name for p in final.iterdir()} == {"config.json", "env.json", "metrics.jsonl", "records", "summary.json"}

    config = json.loads((final / "config.json").read_text())
    assert config == {"seed": 3, "beta": 0.1, "loss": "sigmoid", "optim": {"lr": 1e-4, "betas": [0.9, 0.999]}}

    lines = (final / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "loss": 0.69, "rewards/margins": 0.0},
        {"step": 10, "loss": 0.5, "rewards/margins": 0.25},
    ]
    assert json.loads((final / "summary.json").read_text()) == {"loss": 0.5}
    assert json.loads((final / "env.json").read_text())["python"]

    loaded = load_run(final)
    assert loaded.config == config
    assert loaded.summary == {"loss": 0.5}
    assert loaded.metrics["step"].tolist() == [0, 10]
    assert loaded.metrics["loss"].tolist() == [0.69, 0.5]
    assert loaded.records("pairs").to_dict("records") == records


def test_missing_records_name_says_what_exists(tmp_path):
    with Run("dpo", "beta0.1", seed=0, config={}, root=tmp_path) as run:
        run.write_records("pairs", [{"a": 1}])
    with pytest.raises(FileNotFoundError, match=r"pairs"):
        load_run(run.path).records("tokens")


def test_config_dict_and_seed_in_config(tmp_path):
    run = write_run(tmp_path, seed=7, config={"seed": 7, "beta": 0.2})
    assert json.loads((run.path / "config.json").read_text()) == {"seed": 7, "beta": 0.2}


def test_config_seed_that_disagrees_with_run_seed_is_refused(tmp_path):
    # A TRL-style config carries its own seed (default 42); config.json and the folder name must not disagree.
    with pytest.raises(ValueError, match="seed"):
        Run("dpo", "beta0.1", seed=0, config={"seed": 42}, root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_partial_while_open_and_not_listed(tmp_path):
    with Run("dpo", "beta0.1", seed=0, config=Config(), root=tmp_path) as run:
        run.log({"loss": 1.0}, step=0)
        assert run.path.name.endswith(".partial")
        assert run.path.is_dir()
        assert not (tmp_path / run.folder).exists()
        assert (run.path / "metrics.jsonl").read_text().count("\n") == 1, "log lines are flushed at once"
        assert list_runs(tmp_path).empty
        with pytest.raises(ValueError, match="not a complete run"):
            load_run(run.path)
    assert len(list_runs(tmp_path)) == 1


def test_an_adapter_saved_into_the_open_run_lands_in_final_folder(tmp_path):
    class FakeModel:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_config.json").write_text('{"r": 8}')

    with Run("dpo", "beta0.1", seed=0, config={}, root=tmp_path) as run:
        out = run.path / "adapter"  # as train.train saves it
        FakeModel().save_pretrained(out)
        assert out.parent.name.endswith(".partial")
    assert json.loads((run.path / "adapter" / "adapter_config.json").read_text()) == {"r": 8}


def test_write_json_lands_in_final_folder(tmp_path):
    with Run("dpo", "beta0.1", seed=0, config={}, root=tmp_path) as run:
        run.write_json("extra.json", {"x": float("nan"), "p": Path("a/b")})
    assert json.loads((run.path / "extra.json").read_text()) == {"x": "nan", "p": "a/b"}


# ----------------------------------------------------------------------------------------------------------
# A failed run


def test_exception_reraised_folder_failed_with_traceback(tmp_path):
    with pytest.raises(RuntimeError, match="boom at step 3"):
        with Run("dpo", "beta0.1", seed=0, config=Config(), root=tmp_path) as run:
            run.log({"loss": 1.0}, step=0)
            raise RuntimeError("boom at step 3")

    failed = only_child(tmp_path)
    assert failed.name == run.folder + ".failed" and run.path == failed
    assert not (tmp_path / run.folder).exists()
    assert not (tmp_path / (run.folder + ".partial")).exists()
    assert not (failed / "summary.json").exists(), "summary.json is written only by a clean run"
    error = (failed / "error.txt").read_text()
    assert "Traceback (most recent call last)" in error
    assert "RuntimeError: boom at step 3" in error
    assert "test_exception_reraised_folder_failed_with_traceback" in error
    assert (failed / "metrics.jsonl").read_text().strip() == '{"step": 0, "loss": 1.0}', "logged lines survive"

    assert list_runs(tmp_path).empty
    with pytest.raises(ValueError, match="not a complete run"):
        load_run(failed)


def test_failed_run_beside_complete_runs(tmp_path):
    write_run(tmp_path, seed=0)
    with pytest.raises(KeyError):
        with Run("dpo", "beta0.1", seed=1, config=Config(), root=tmp_path):
            raise KeyError("x")
    assert list_runs(tmp_path)["seed"].tolist() == [0]


# ----------------------------------------------------------------------------------------------------------
# list_runs


def test_list_runs_rows_and_columns(tmp_path):
    write_run(tmp_path, "dpo", "beta0.1", seed=0, config=Config(beta=0.1), summary={"rewards/accuracies": 0.6})
    write_run(tmp_path, "dpo", "beta0.1", seed=1, config=Config(beta=0.1), summary={"rewards/accuracies": 0.7})
    write_run(tmp_path, "ipo", "tau0.5", seed=2, config=Config(beta=0.5, loss="ipo"),
              summary={"rewards/accuracies": 0.8, "extra": 1})

    df = list_runs(tmp_path)
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 3
    for col in BASE_COLUMNS + ["config.seed", "config.beta", "config.loss", "config.optim.lr",
                               "config.optim.betas", "rewards/accuracies", "extra"]:
        assert col in df.columns, col
    assert "config.optim" not in df.columns, "nested config is flattened, not kept as a dict"

    df = df.sort_values("seed").reset_index(drop=True)
    assert df["method"].tolist() == ["dpo", "dpo", "ipo"]
    assert df["name"].tolist() == ["beta0.1", "beta0.1", "tau0.5"]
    assert df["seed"].tolist() == [0, 1, 2]
    assert all(isinstance(s, int) for s in df["seed"].tolist())
    assert pd.api.types.is_integer_dtype(df["seed"])
    assert df["config.seed"].tolist() == [0, 1, 2]
    assert df["config.beta"].tolist() == [0.1, 0.1, 0.5]
    assert df["config.loss"].tolist() == ["sigmoid", "sigmoid", "ipo"]
    assert df["config.optim.lr"].tolist() == [1e-4] * 3
    assert df["rewards/accuracies"].tolist() == [0.6, 0.7, 0.8]
    assert math.isnan(df["extra"][0]) and df["extra"][2] == 1
    for _, row in df.iterrows():
        assert Path(row["path"]).is_dir()
        assert Path(row["path"]).parent == tmp_path
        assert Path(row["path"]).name == f"{row['method']}__{row['name']}__s{row['seed']}__{row['timestamp']}"
        assert load_run(row["path"]).config["seed"] == row["seed"]


def test_list_runs_ignores_stray_files_and_folders(tmp_path):
    write_run(tmp_path)
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "dpo__x__s0__20240101-000000-000000").mkdir()  # run-like name, no summary.json
    assert len(list_runs(tmp_path)) == 1


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "does-not-exist"], ids=["empty", "missing"])
def test_list_runs_empty_root(tmp_path, make):
    df = list_runs(make(tmp_path))
    assert isinstance(df, pd.DataFrame)
    assert df.empty
    assert list(df.columns) == BASE_COLUMNS


# ----------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("method,name", [
    ("dpo", "beta_0.1"),
    ("d_po", "beta0.1"),
    ("dpo", "beta 0.1"),
    ("dpo ", "beta0.1"),
    ("dpo", ""),
    ("dpo", "beta0.1\n"),
    ("dpo", "-beta"),
])
def test_run_name_rejects_bad_parts(method, name):
    with pytest.raises(ValueError, match="no '_', no spaces"):
        run_name(method, name, 0)


def test_run_rejects_bad_name_before_writing(tmp_path):
    with pytest.raises(ValueError, match="no '_'"):
        Run("dpo", "my_run", seed=0, config={}, root=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method,name,seed", [("dpo", "beta0.1", 0), ("ipo", "tau+0.5-lr1e-4", 1234), ("A1", "b", 7)])
def test_parse_run_name_round_trips(method, name, seed):
    folder = run_name(method, name, seed, timestamp="20240102-030405-000006")
    assert folder == f"{method}__{name}__s{seed}__20240102-030405-000006"
    assert parse_run_name(folder) == {"method": method, "name": name, "seed": seed, "timestamp": "20240102-030405-000006"}


def test_run_name_default_timestamp_parses():
    parsed = parse_run_name(run_name("dpo", "x", 5))
    assert parsed["seed"] == 5 and parsed["timestamp"] and "_" not in parsed["timestamp"]


# ----------------------------------------------------------------------------------------------------------
# Seeds


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_set_seed_same_seed_same_draws():
    set_seed(123)
    first = draws()
    set_seed(123)
    assert draws() == first
    set_seed(124)
    other = draws()
    for a, b in zip(first, other):  # each library is seeded, not just one of them
        assert a != b


def test_run_sets_seed_on_entry(tmp_path):
    with Run("dpo", "a", seed=11, config={}, root=tmp_path):
        first = draws()
    random.random(), np.random.rand(), torch.rand(1)  # disturb the global state in between
    with Run("dpo", "b", seed=11, config={}, root=tmp_path):
        second = draws()
    with Run("dpo", "c", seed=12, config={}, root=tmp_path):
        third = draws()
    assert first == second
    assert all(a != b for a, b in zip(first, third))


# ----------------------------------------------------------------------------------------------------------
# to_jsonable


def test_to_jsonable_non_finite_tensors_paths():
    obj = {
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "np_nan": np.float64("nan"),
        "np_int": np.int64(3),
        "tensor": torch.tensor([[1.0, 2.0], [3.0, float("nan")]]),
        "scalar_tensor": torch.tensor(0.5),
        "array": np.arange(3),
        "path": Path("runs") / "x",
        "tuple": (1, 2.5, None, True),
        "nested": [{"deep": float("inf")}],
        3: "int key",
        "config": Config(),
    }
    out = to_jsonable(obj)
    text = json.dumps(out, allow_nan=False)  # raises on NaN/inf
    assert json.loads(text) == out
    assert out["nan"] == "nan" and out["inf"] == "inf" and out["ninf"] == "-inf" and out["np_nan"] == "nan"
    assert out["np_int"] == 3 and type(out["np_int"]) is int
    assert out["tensor"] == [[1.0, 2.0], [3.0, "nan"]]
    assert out["scalar_tensor"] == 0.5
    assert out["array"] == [0, 1, 2]
    assert out["path"] == str(Path("runs") / "x")
    assert out["tuple"] == [1, 2.5, None, True]
    assert out["nested"] == [{"deep": "inf"}]
    assert out["3"] == "int key"
    assert out["config"] == {"beta": 0.1, "loss": "sigmoid", "optim": {"lr": 1e-4, "betas": [0.9, 0.999]}}


def test_nan_metrics_and_summary_stay_valid_json(tmp_path):
    with Run("dpo", "x", seed=0, config={}, root=tmp_path) as run:
        run.log({"loss": float("nan"), "grad": torch.tensor(float("inf"))}, step=0)
        run.summary["loss"] = float("nan")
    for name in ("metrics.jsonl", "summary.json"):
        text = (run.path / name).read_text()
        assert "NaN" not in text and "Infinity" not in text, name
    assert load_run(run.path).metrics.to_dict("records") == [{"step": 0, "loss": "nan", "grad": "inf"}]


# ----------------------------------------------------------------------------------------------------------
# env.json


def test_environment_fields():
    env = environment()
    assert env["git_commit"] and len(env["git_commit"]) == 40  # the tests run inside the git checkout
    assert env["python"].count(".") == 2
    assert env["packages"]["torch"] is not None
    assert env["packages"]["numpy"] == np.__version__
    assert env["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def test_env_json_has_no_secrets(tmp_path, monkeypatch):
    secrets = {
        "HF_TOKEN": "hf_secretvalue123",
        "HUGGING_FACE_HUB_TOKEN": "hf_othersecret456",
        "WANDB_API_KEY": "wandbsecret789abc",
        "OPENAI_API_KEY": "sk-secret000xyz",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    run = write_run(tmp_path, metrics=[{"loss": 1.0}], summary={"loss": 1.0})

    env = json.loads((run.path / "env.json").read_text())
    assert env["git_commit"]
    assert env["python"]
    assert env["packages"]["torch"] is not None
    assert env["device"]
    files = [p for p in run.path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "env.json", "metrics.jsonl", "summary.json"}
    for p in files:
        text = p.read_text()
        for k, v in secrets.items():
            assert v not in text, f"{k}'s value leaked into {p.name}"
            assert k not in text, f"{k} named in {p.name}"


# ----------------------------------------------------------------------------------------------------------
# Corrupt files


def test_corrupt_metrics_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path, metrics=[{"loss": 1.0}, {"loss": 0.9}])
    metrics = run.path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1], '{"step": 2, "loss": 0.']) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON") as err:
        load_run(run.path)
    assert str(metrics) in str(err.value)


def test_corrupt_records_line_names_file_and_line(tmp_path):
    with Run("dpo", "x", seed=0, config={}, root=tmp_path) as run:
        run.write_records("pairs", [{"a": 1}])
    (run.path / "records" / "pairs.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2"):
        load_run(run.path).records("pairs")


def test_a_run_id_names_the_folder_and_owns_it(tmp_path):
    """A run id (a sweep's job id) makes the folder's name known in advance: the leftovers of a killed or failed
    attempt under that id are replaced, and a complete folder is never written a second time."""
    name = "dpo__default__s0__job-1"
    (tmp_path / f"{name}.partial").mkdir()  # a kill -9 left these
    (tmp_path / f"{name}.partial" / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / f"{name}.failed").mkdir()
    with Run("dpo", "default", seed=0, config={}, root=tmp_path, run_id="job-1") as run:
        run.log({"loss": 1.0}, step=0)
    assert run.path == tmp_path / name and not (tmp_path / f"{name}.partial").exists()
    assert not (tmp_path / f"{name}.failed").exists()
    assert (run.path / "metrics.jsonl").read_text().count("\n") == 1, "the killed attempt's lines are gone"
    with pytest.raises(FileExistsError, match="already complete"):
        with Run("dpo", "default", seed=0, config={}, root=tmp_path, run_id="job-1"):
            pass
    assert len(list_runs(tmp_path)) == 1
    for bad in ("a.b", "a__b", "x/y", ""):
        with pytest.raises(ValueError, match="Run id"):
            Run("dpo", "default", seed=0, config={}, root=tmp_path, run_id=bad)


_WRITER = """
import sys, time
from workbench.modeling.runs import Run
with Run("dpo", "default", seed=0, config={}, root=sys.argv[1], run_id="job-2") as run:
    run.log({"loss": 1.0}, step=0)
    print("open", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_writer(root, seconds):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_a_run_being_written_by_a_living_process_is_neither_taken_nor_replaced(tmp_path):
    """One process writes a named run at a time: a second writer (a resumed sweep while a kernel from before its
    interruption still runs) is refused, naming the pid; ``wait_for_writer`` waits until the first has ended and
    then finds the folder complete."""
    from workbench.modeling.runs import is_complete, wait_for_writer

    folder = tmp_path / "dpo__default__s0__job-2"
    proc = _start_writer(tmp_path, 1.5)
    with pytest.raises(RuntimeError, match=rf"another process \(pid {proc.pid}\)"):
        with Run("dpo", "default", seed=0, config={}, root=tmp_path, run_id="job-2"):
            pass
    assert (folder.with_name(folder.name + ".partial") / "metrics.jsonl").exists(), "the writer's folder was kept"
    seen = []
    assert wait_for_writer(folder, seen.append) and seen == [str(proc.pid)]
    assert proc.wait() == 0 and is_complete(folder)
    assert not (folder / ".writer.lock").exists()
    assert not wait_for_writer(folder), "no writer any more: nothing to wait for"


def test_a_killed_writer_leaves_no_lock_behind(tmp_path):
    """The lock ends with its process, however it ends: after a kill -9 the run starts again at once."""
    import signal

    proc = _start_writer(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = tmp_path / "dpo__default__s0__job-2"
    assert folder.with_name(folder.name + ".partial").is_dir()
    from workbench.modeling.runs import wait_for_writer

    assert not wait_for_writer(folder)
    with Run("dpo", "default", seed=0, config={}, root=tmp_path, run_id="job-2") as run:
        run.log({"loss": 2.0}, step=0)
    assert run.path == folder and (folder / "metrics.jsonl").read_text().count("\n") == 1
