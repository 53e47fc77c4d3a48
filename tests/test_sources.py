"""Your own data in TRL's dataset formats (workbench/modeling/sources.py): each format read from a local file into the rows
HH-RLHF gives, the column mapping, the report's counted skips, one named error per bad-data fixture, and training
from the command line and from a grid on such files."""

import json
from pathlib import Path

import pandas as pd
import pytest

from workbench.modeling import data, sources

FIXTURES = Path(__file__).parent / "fixtures" / "bad_data"


def _formats(pairs: list[dict]) -> dict[str, list[dict]]:
    """The same pairs written in each of TRL's four pair formats (explicit/implicit prompt, standard/conversational)."""
    def text(messages):  # a conversation as HH writes it, for the standard implicit format
        return data.render_hh(messages)

    return {
        "preference, conversational": [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                       for p in pairs],
        "preference, standard": [{"prompt": p["prompt"][-1]["content"], "chosen": p["chosen"][0]["content"],
                                  "rejected": p["rejected"][0]["content"]} for p in pairs if len(p["prompt"]) == 1],
        "implicit, conversational": [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
                                     for p in pairs],
        "implicit, standard (HH transcripts)": [{"chosen": text(p["prompt"] + p["chosen"]),
                                                 "rejected": text(p["prompt"] + p["rejected"])} for p in pairs],
    }


@pytest.fixture(scope="module")
def hh_rows(hh_dir):
    pairs, _ = data.load_hh("harmless-base", "test", hh_dir, limit=120)
    return pairs


@pytest.mark.parametrize("fmt", ["preference, conversational", "preference, standard", "implicit, conversational",
                                 "implicit, standard (HH transcripts)"])
@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_each_pair_format_reads_back_as_hh_rows(tmp_path, hh_rows, fmt, ext):
    rows = _formats(hh_rows)[fmt]
    path = tmp_path / f"pairs.{ext}"
    if ext == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, report, found = sources.read_dataset(path)
    assert found == ("preference" if fmt.startswith("preference") else "preference, implicit prompt")
    want = [p for p in hh_rows if fmt != "preference, standard" or len(p["prompt"]) == 1]
    assert report.read == len(rows) and report.kept + report.skipped["duplicate"] == len(rows)
    assert [(g["prompt"], g["chosen"], g["rejected"]) for g in got] == \
        [(w["prompt"], w["chosen"], w["rejected"]) for w in want][: len(got)]
    assert all(g["id"].startswith("pairs/") for g in got)  # no id column: file and row name the row


def test_unpaired_prompt_only_and_mapped_columns(tmp_path):
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0})
                                + "\n" for i in range(6)))
    rows, _, fmt = sources.read_dataset(unpaired)
    assert fmt == "unpaired preference" and [r["label"] for r in rows] == [True, False] * 3
    assert rows[0]["prompt"] == [{"role": "user", "content": "Question 0?"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Answer 0."}]
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"question": ["Why is the sky blue?", "How do magnets work?"]}).to_csv(prompts, index=False)
    rows, _, fmt = sources.read_dataset(prompts, columns="prompt=question")
    assert fmt == "prompt-only" and [r["prompt"][0]["content"] for r in rows] == ["Why is the sky blue?", "How do magnets work?"]
    assert data.prompt_view(rows)[0]["baseline"] is None
    mapped = tmp_path / "mine.parquet"
    pd.DataFrame({"q": ["Hi?"], "good": ["Hello!"], "bad": ["Go away."]}).to_parquet(mapped)
    rows, _, fmt = sources.read_dataset(mapped, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert fmt == "preference" and rows[0]["chosen"][0]["content"] == "Hello!"
    assert sources.parse_columns(["chosen=good", "rejected=bad"]) == {"chosen": "good", "rejected": "bad"}
    with pytest.raises(ValueError, match="not a column of TRL's formats"):
        sources.parse_columns("chosn=good")


def test_duplicates_and_over_length_rows_are_skipped_and_counted(tmp_path, smollm_tokenizer):
    path = tmp_path / "dup.jsonl"
    rows = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}] * 3 + \
        [{"prompt": "Tell me a long story. " * 80, "chosen": "Once.", "rejected": "No."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, report, _ = sources.read_dataset(path, tokenizer=smollm_tokenizer, max_length=256)
    assert len(got) == 1 and report.skipped["duplicate"] == 2 and report.skipped["over_length"] == 1
    assert report.read == report.kept + sum(report.skipped.values())
    assert report.examples["duplicate"] == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("fixture, message", [
    ("not_json.jsonl", "not_json.jsonl line 2, field '<json>': not valid JSON"),
    ("missing_column.jsonl", "missing_column.jsonl line 2, field 'rejected': is missing"),
    ("empty_chosen.jsonl", "empty_chosen.jsonl line 2, field 'chosen': is empty"),
    ("same_replies.jsonl", "same_replies.jsonl line 2, field 'rejected': is the same text as chosen"),
    ("turns_not_alternating.jsonl", "turns_not_alternating.jsonl line 2, field 'prompt': turn 1 has role 'user'"),
    ("label_not_bool.jsonl", "label_not_bool.jsonl line 2, field 'label': must be true or false"),
    ("no_format.jsonl", "no_format.jsonl line 1, field '<columns>': has columns answer, question: none of TRL's formats"),
])
def test_each_bad_data_fixture_gives_its_own_named_error(fixture, message):
    with pytest.raises(data.HHFormatError) as e:
        sources.read_dataset(FIXTURES / fixture)
    assert message in str(e.value) and "The formats (TRL's)" in str(e.value)


def test_a_bad_row_can_be_skipped_and_counted_instead(tmp_path):
    rows, report, _ = sources.read_dataset(FIXTURES / "same_replies.jsonl", on_error="skip")
    assert len(rows) == 1 and report.skipped["bad_row"] == 1 and "is the same text as chosen" in report.examples["bad_row"][0]


def test_the_split_halves_and_n_train_work_on_your_data_as_on_hh(tmp_path, hh_rows):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame(_formats(hh_rows)["preference, conversational"]).to_parquet(path)
    mine = data.DataConfig(source=str(path), n_train=20, half="a")
    train_rows, heldout, report, info = sources.load_for_run(mine, 0)
    ref_train, ref_heldout, _, _ = sources.load_for_run(data.DataConfig(n_train=20, half="a"), 0, pairs=hh_rows)
    key = lambda rows: [(r["prompt"], r["chosen"]) for r in rows]  # noqa: E731
    assert key(train_rows) == key(ref_train) and key(heldout) == key(ref_heldout)
    assert info["format"] == "preference" and report.kept == len(hh_rows)


# ----------------------------------------------------------------------------------------------------------
# Training on your data: the command line and a grid


def _train_args(tiny_model_dir, tmp_path, source, *extra):
    return ["train", *extra, "--model", str(tiny_model_dir), "--data-source", str(source), "--n-train", "8",
            "--n-score", "2", "--max-steps", "1", "--per-device-train-batch-size", "2", "--max-length", "160",
            "--runs-dir", str(tmp_path / "runs")]


@pytest.mark.parametrize("fmt", ["preference, conversational", "preference, standard", "implicit, conversational",
                                 "implicit, standard (HH transcripts)"])
def test_dpo_trains_from_the_command_line_on_each_pair_format(tmp_path, hh_rows, tiny_model_dir, fmt, capsys):
    from workbench import __main__ as cli
    from workbench.modeling.runs import run_paths

    path = tmp_path / "mine.parquet"
    rows = _formats(hh_rows)[fmt]
    pd.DataFrame([{"good" if k == "chosen" else k: v for k, v in r.items()} for r in rows]).to_parquet(path)
    assert cli.main(_train_args(tiny_model_dir, tmp_path, path, "dpo", "--columns", "chosen=good")) == 0
    (run,) = run_paths(tmp_path / "runs")
    split = json.loads((run / "split.json").read_text())
    assert split["format"] == "preference" and split["n_train_used"] == 8
    assert json.loads((run / "data_report.json").read_text())["source"] == str(path)
    assert json.loads((run / "summary.json").read_text())["train/steps"] == 1


def test_kto_trains_on_an_unpaired_file_and_dpo_refuses_it(tmp_path, tiny_model_dir, capsys):
    from workbench import __main__ as cli
    from workbench.modeling.runs import run_paths

    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"It is {2 * i}."
                                        if i % 3 else f"I don't know {i}.", "label": bool(i % 3)}) + "\n" for i in range(40)))
    assert cli.main(_train_args(tiny_model_dir, tmp_path, path, "kto")) == 0
    (run,) = run_paths(tmp_path / "runs")
    assert json.loads((run / "split.json").read_text())["format"] == "unpaired preference"
    assert cli.main(_train_args(tiny_model_dir, tmp_path / "dpo", path, "dpo")) == 2
    err = capsys.readouterr().err
    assert "trains on preference rows; the data is in the unpaired preference format" in err and "Traceback" not in err


@pytest.mark.slow  # a whole sweep through papermill: the full suite's, not the fast tier's
def test_a_grid_trains_on_your_files(tmp_path, hh_rows, tiny_model_dir, monkeypatch):
    import yaml

    from workbench.orchestration import sweep
    from workbench.modeling.runs import run_paths

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
                             for r in _formats(hh_rows)["preference, conversational"]))
    unpaired = tmp_path / "kto.parquet"
    pd.DataFrame([{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 > 0} for i in range(40)]
                 ).to_parquet(unpaired)
    grid = {"name": "yours", "runs_dir": str(tmp_path / "runs"),
            "defaults": {"model": str(tiny_model_dir), "n_train": 8, "n_score": 2, "max_steps": 1,
                         "per_device_train_batch_size": 2, "max_length": 160},
            "stages": [{"stage": "dpo", "notebook": "04_preference.ipynb",
                        "params": {"method": "dpo", "data_source": str(pairs), "columns": "prompt=q,chosen=good,rejected=bad"}},
                       {"stage": "kto", "notebook": "04_preference.ipynb",
                        "params": {"method": "kto", "data_source": str(unpaired)}}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.chdir(tmp_path)
    result = sweep.run_sweep(tmp_path / "grid.yaml", runs_dir=str(tmp_path / "runs"))
    assert not result.failed
    runs = {p.name.split("__")[0]: p for p in run_paths(tmp_path / "runs")}
    assert json.loads((runs["dpo"] / "config.json").read_text())["data"]["columns"] == "prompt=q,chosen=good,rejected=bad"
    assert json.loads((runs["dpo"] / "split.json").read_text())["format"] == "preference"
    assert json.loads((runs["kto"] / "split.json").read_text())["format"] == "unpaired preference"
