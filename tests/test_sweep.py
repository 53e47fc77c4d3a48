"""Notebooks and sweeps: every notebook is clean and parameterized; every grid file in the repository loads and
validates; a bad grid fails before anything runs; the CI sweep executes every notebook on a tiny model with
papermill, isolates a failing job, survives being killed mid-sweep and resumes without losing or repeating a run."""

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.reporting import paper
from workbench.orchestration import grid as grids
from workbench.orchestration import sweep
from workbench.training import train
from workbench.modeling.runs import is_complete

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
GRIDS = sorted((REPO / "grids").glob("*.yaml"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_clean_parameterized_and_define_nothing(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and nb["metadata"]["language_info"]["name"] == "python"
    params = grids.notebook_parameters(path)  # exactly one parameters cell, literals only
    assert params
    import papermill

    # papermill reads every parameter line too (a comment it cannot parse costs a console line per job)
    assert set(papermill.inspect_notebook(str(path))) == set(params), path.name
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: committed with outputs"
        tree = ast.parse("".join(cell["source"]))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defs, f"{path.name}: notebooks drive, they don't define"
    if "method" in params:  # training notebooks hand every parameter to make_config, and the defaults build
        call = next(n for c in nb["cells"] if c["cell_type"] == "code" for n in ast.walk(ast.parse("".join(c["source"])))
                    if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "make_config")
        # every parameter passed by name, and the one ``overrides`` dict for the config's other fields
        assert {k.arg or k.value.id for k in call.keywords} == set(params) - {"method"}
        overrides = params.pop("overrides")
        train.make_config(params.pop("method"), **params, **overrides)


def test_there_is_a_notebook_for_each_stage_of_the_study():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("00_data", "01_sft", "01b_gold_pairs", "02_reward", "03_rl", "04_preference", "05_evaluate",
                   "06_inspector"):
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_grid_file_loads_and_validates(path):
    grid, jobs = grids.load_grid(path)
    assert jobs and len({j.id for j in jobs}) == len(jobs), "job ids are unique"
    stages = [s["stage"] for s in grid["stages"]]
    assert stages[0] and all(j.stage in stages for j in jobs)


def test_gpu_grid_is_the_real_study():
    _, jobs = grids.load_grid(REPO / "grids" / "gpu.yaml")
    methods = {j.params.get("method") for j in jobs}
    assert {"ppo", "rloo", "grpo", "dpo", "ipo", "kto", "orpo", "simpo"} <= methods
    assert {j.params.get("seed") for j in jobs if j.stage in ("rl", "preference")} == {0, 1, 2}
    assert all(j.params.get("load_in_4bit", True) for j in jobs if j.stage != "evaluate")
    assert all(j.resources["gpus"] == 1 and j.resources["cpus"] >= 1 for j in jobs), "one GPU per job, declared"
    # AI feedback: DPO on the judge's labels and GRPO with the judge as reward, three seeds each, configs that build
    judged = [j for j in jobs if j.stage in ("rlaifpairs", "rlaifreward")]
    assert len(judged) == 6 and {(j.params["pair_labels"] if "pair_labels" in j.params else j.params["reward_model"])
                                 for j in judged} == {"judge"}
    for j in judged:
        params = {k: v for k, v in j.params.items() if not str(v).startswith("@")}
        arm, cfg = train.make_config(params.pop("method"), **params)
        assert cfg.judge_model == "Qwen/Qwen2.5-1.5B-Instruct"


def test_the_main_job_is_the_known_gold_study_with_shared_data_and_seeded_arms():
    """grids/main.yaml: SFT, the gold-labelled dataset and the proxies are built once (seed 0), every arm the issue
    names is there once per seed, the proxy and the policy arms read the dataset's disjoint halves, the RL arms are
    measured by the gold, PPO also runs against the gold itself, and the evaluation reads the dataset."""
    _, one = grids.load_grid(REPO / "grids" / "main.yaml")
    _, three = grids.load_grid(REPO / "grids" / "main.yaml", seeds=[0, 1, 2])
    shared = [j for j in one if j.stage in ("sft", "gold-pairs", "noisy", "proxy", "proxy-small", "proxy-noisy")]
    assert all(j.params["seed"] == 0 for j in shared) and [j for j in three if j in shared] == shared
    arms = [j for j in one if j not in shared and not j.always]
    methods = {j.params.get("method") for j in arms}
    assert {"dpo", "ipo", "kto", "ppo", "online-dpo"} <= methods
    assert len([j for j in three if not j.always]) == len(shared) + 3 * len(arms)
    assert {j.params["half"] for j in arms} == {"b"} and {j.params["half"] for j in shared if "half" in j.params} == {"a"}
    assert all(j.params["data_source"].startswith("@") for j in arms)
    rl = [j for j in arms if j.notebook.name == "03_rl.ipynb"]
    assert {j.params["gold_reward_model"] for j in rl} == {"vader"}
    assert any(j.params["method"] == "ppo" and j.params["reward_model"] == "vader" for j in rl), "PPO-GT"
    assert all(j.params.get("snapshots", 0) >= 2 for j in arms), "at least 3 frontier points per run"
    (ev,) = [j for j in one if j.always]
    assert ev.params["data_source"] == "@gold-pairs" and ev.params["gold_reward_model"] == "vader"
    assert ev.params["n_pairs"] >= 256


def test_seeds_run_the_hh_study_once_per_seed_and_pair_references_by_seed():
    from workbench.__main__ import _seed_list

    _, one = grids.load_grid(REPO / "grids" / "hh.yaml")
    _, three = grids.load_grid(REPO / "grids" / "hh.yaml", seeds=[0, 1, 2])
    trained = [j for j in one if not j.always]
    judges = [j for j in trained if j.stage in ("proxy", "gold")]  # their params fix seed 0: one pair for all seeds
    assert len(judges) == 2 and all(j.params["seed"] == 0 for j in judges)
    assert len([j for j in three if not j.always]) == 3 * (len(trained) - 2) + 2
    assert [j for j in three if j.stage in ("proxy", "gold")] == judges
    assert {j.params["seed"] for j in three if not j.always} == {0, 1, 2}
    assert [j.stage for j in three if j.always] == [j.stage for j in one if j.always]  # evaluation once, over all
    # seed 0's jobs are the very jobs of the one-seed study: adding seeds to a finished study reruns nothing
    assert {j.id for j in trained if j.params.get("seed", 0) == 0} <= {j.id for j in three}
    state = {}
    ppo = next(j for j in three if j.params.get("method") == "ppo" and j.params["seed"] == 2)
    sft = next(j for j in three if j.stage == "sft" and j.params["seed"] == 2)
    state[sft.id] = {"status": "done", "run": "/runs/sft-seed-2"}
    for j in three:  # every other referenced job is done too, in some other folder
        state.setdefault(j.id, {"status": "done", "run": f"/runs/{j.id}"})
    params, why = grids.resolve_refs(ppo, state, three)
    assert why is None and params["sft_run"] == "/runs/sft-seed-2"
    assert params["reward_model"] == state[judges[0].id]["run"]  # seed 2's PPO is judged by the one proxy
    assert _seed_list("0,1,2") == [0, 1, 2]
    for bad in ("a,b", "", "-1"):
        with pytest.raises(Exception, match="--seeds"):
            _seed_list(bad)
    with pytest.raises(ValueError, match="seeds must be"):
        grids.load_grid(REPO / "grids" / "hh.yaml", seeds=[])


@pytest.mark.parametrize("grid", ["hh.yaml", "gpu.yaml"])
def test_no_policy_trains_on_the_gold_judges_half(grid):
    """The human-label grids judge by a "gold" reward model trained on prompt half b: every job that trains a policy
    (SFT, the preference arms, PPO's and online DPO's prompts) reads half a, the proxy's, and nothing reads all."""

    _, jobs = grids.load_grid(REPO / "grids" / grid)
    gold = [j for j in jobs if j.stage == "gold"]
    assert gold and {j.params["half"] for j in gold} == {"b"}
    policies = [j for j in jobs if not j.always and j.stage not in ("gold", "proxy")]
    assert policies and {j.params.get("half") for j in policies} == {"a"}, \
        [(j.stage, j.params.get("half")) for j in policies if j.params.get("half") != "a"]
    assert {j.params["half"] for j in jobs if j.stage == "proxy"} == {"a"}


def test_a_bad_grid_lists_every_problem_before_running(tmp_path):
    bad = {"name": "bad", "colour": "red", "stages": [
        {"stage": "sft", "notebook": "01_sft.ipynb", "params": {"max_stepz": 2, "seed": "zero"}},
        {"stage": "dpo", "notebook": "04_preference.ipynb", "params": {"sft_run": "@nope", "beta": -1.0}},
        {"stage": "x", "notebook": "99_missing.ipynb"},
        {"stage": "y", "notebook": "04_preference.ipynb", "grid": {"beta": 0.1}}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as e:
        grids.load_grid(path)
    msg = str(e.value)
    for needle in ("unknown key 'colour'", "unknown parameter 'max_stepz'", "seed='zero' should be a int",
                   "'@nope' refers to no earlier stage", "no notebook", "must be a non-empty list", "nothing was run"):
        assert needle in msg, needle
    path.write_text(yaml.safe_dump({"name": "b2", "stages": [
        {"stage": "dpo", "notebook": "04_preference.ipynb", "params": {"beta": -1.0}}]}))
    with pytest.raises(ValueError, match="beta must be > 0"):
        grids.load_grid(path)


def test_a_setting_no_stage_takes_is_refused_with_close_matches():
    """``--set`` of a key that no stage's notebook has would be dropped without a word: refused, naming the key and
    the close matches; a key that some stage takes is accepted."""
    with pytest.raises(ValueError, match=r"--set learning_rat: no stage of this grid takes 'learning_rat'; "
                                         r"did you mean learning_rate"):
        grids.load_grid(REPO / "grids" / "ci.yaml", {"learning_rat": 1e-4})
    _, jobs = grids.load_grid(REPO / "grids" / "ci.yaml", {"learning_rate": 1e-4})
    assert jobs


def test_a_users_setting_replaces_the_defaults_says_where_a_stage_keeps_its_own_and_reaches_one_stage_by_name(capsys):
    """``--set n_train=128`` reaches every stage that takes n_train and names none of its own; a stage that names its
    own (a smaller proxy's 96, "@gold-pairs" wiring) keeps it and a line says so; ``proxy.max_steps`` sets one stage
    over its own params; a key a stage sweeps as a grid axis, a stage the grid lacks, or a key the stage does not
    take, is refused; ``--set report_to=...`` reaches every training stage."""
    grid = REPO / "grids" / "main.yaml"
    _, jobs = grids.load_grid(grid, {"n_train": 128, "data_source": "/my/data", "proxy.max_steps": 3})
    said = capsys.readouterr().err
    by = {j.stage: j for j in jobs}
    stages = {st["stage"]: st for st in yaml.safe_load(grid.read_text())["stages"]}
    for j in jobs:  # the user's value where the stage names none of its own, the stage's where it does
        if "n_train" in grids.notebook_parameters(j.notebook):
            own = stages[j.stage].get("params") or {}
            assert j.params["n_train"] == own.get("n_train", 128), j.stage
    assert by["sft"].params["data_source"] == "/my/data" and by["sft"].params["n_train"] == 64
    assert by["proxy-small"].params["n_train"] == 96 and by["kto"].params["data_source"] == "@gold-pairs"
    assert "--set n_train=128 replaces the grid's default; kept by the stage(s) that name their own: " in said
    assert "proxy-small (96)" in said and "kto ('@gold-pairs')" in said
    assert by["proxy"].params["max_steps"] == 3 and by["proxy-small"].params["max_steps"] != 3
    _, scoped = grids.load_grid(grid, {"kto.data_source": "/my/kto.jsonl"})
    assert {j.stage: j for j in scoped}["kto"].params["data_source"] == "/my/kto.jsonl"
    _, tracked = grids.load_grid(grid, {"report_to": "tensorboard"})  # a tracker for every training stage
    training = [j for j in tracked if "report_to" in grids.notebook_parameters(j.notebook)]
    assert len(training) >= 10 and all(j.params["report_to"] == "tensorboard" for j in training)
    with pytest.raises(ValueError, match=r"--set method: stage 'preference' sweeps method over \['dpo', 'ipo'\]"):
        grids.load_grid(grid, {"method": "dpo"})
    with pytest.raises(ValueError, match=r"--set prxy.max_steps: no stage 'prxy'"):
        grids.load_grid(grid, {"prxy.max_steps": 3})
    with pytest.raises(ValueError, match=r"stage 'proxy' does not take 'beta'"):
        grids.load_grid(grid, {"proxy.beta": 0.1})

# ----------------------------------------------------------------------------------------------------------
# The CI sweep, end to end


def _state(root):
    return sweep.read_state(root / "sweeps" / "ci")


KILL_SEEDS = (1, 2)  # seeds of the random moments of the second and third kill


@pytest.fixture(scope="module")
def ci_sweep(tiny_model_dir, hh_dir, tmp_path_factory):
    """grids/ci.yaml on the tiny model, killed with SIGKILL (sweep, papermill and kernel) three times: once two jobs
    are done, then twice at a random moment after a restart (seeded: ``KILL_SEEDS``); then resumed to the end."""
    cwd = tmp_path_factory.mktemp("sweep")
    root = cwd / "runs" / "ci"
    overrides = {"model": str(tiny_model_dir), "data_source": str(hh_dir)}
    cmd = [sys.executable, "-m", "workbench", "sweep", str(REPO / "grids" / "ci.yaml"), "--runs-dir", str(root)]
    cmd += [f"--set={k}={v}" for k, v in overrides.items()]

    def start():
        return subprocess.Popen(cmd, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    proc = start()
    deadline = time.time() + 300
    while sum(e["status"] == "done" for e in _state(root).values()) < 2:
        assert proc.poll() is None and time.time() < deadline, "the sweep stopped or stalled before it was interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep, papermill and the kernel, mid-job
    proc.wait()
    before = _state(root)
    for seed in KILL_SEEDS:  # anywhere: mid-job, between a run's end and its state, in the evaluation
        proc = start()
        time.sleep(random.Random(seed).uniform(5, 40))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = sweep.run_sweep(REPO / "grids" / "ci.yaml", overrides, runs_dir=str(root))
    finally:
        os.chdir(old)
    return root, before, result


def test_sweep_resumes_after_a_kill_without_losing_or_repeating_runs(ci_sweep):
    root, before, result = ci_sweep
    after = _state(root)
    for job_id, entry in before.items():  # what had finished was kept as it was, not run again
        if entry["status"] == "done":
            assert after[job_id] == entry
    runs = [p for p in root.iterdir() if is_complete(p)]
    keys = [p.name.rsplit("__", 1)[0] for p in runs]
    assert len(keys) == len(set(keys)), f"a run was repeated: {sorted(keys)}"
    assert sorted(k.split("__")[0] for k in keys) == ["dpo", "dpo", "ipo", "online-dpo", "ppo", "reward", "reward", "rloo", "sft"]
    adopted_incomplete = {Path(e["run"]).name for e in after.values() if e.get("adopted") and "notebook_incomplete" in e}
    for p in runs:  # each run folder holds its executed notebook, or says plainly that it could not
        nb = json.loads((p / "notebook.ipynb").read_text())
        if p.name in adopted_incomplete:  # a kernel from before the kill finished it after papermill's last save
            assert "incomplete" in nb["metadata"]["workbench"]["incomplete"]
        else:
            assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), p.name
            assert "workbench" not in nb["metadata"] or "incomplete" not in nb["metadata"]["workbench"]


def test_an_adopted_runs_notebook_without_its_outputs_says_it_is_incomplete(tmp_path):
    """A notebook papermill saved before the kill, lacking later cells' outputs, is copied with a note; a
    finished one is copied as it is."""
    from workbench.orchestration.sweep import _copy_adopted_notebook
    cells = [{"cell_type": "code", "source": "x = 1", "execution_count": 1, "outputs": [], "metadata": {}},
             {"cell_type": "code", "source": "print(x)", "execution_count": None, "outputs": [], "metadata": {}},
             {"cell_type": "code", "source": "  ", "execution_count": None, "outputs": [], "metadata": {}}]
    src = tmp_path / "saved.ipynb"
    src.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert not _copy_adopted_notebook(src, tmp_path / "a.ipynb")
    assert "killed" in json.loads((tmp_path / "a.ipynb").read_text())["metadata"]["workbench"]["incomplete"]
    cells[1]["execution_count"] = 2
    src.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert _copy_adopted_notebook(src, tmp_path / "b.ipynb")
    assert "workbench" not in json.loads((tmp_path / "b.ipynb").read_text())["metadata"]


def test_every_finished_job_has_exactly_one_run_folder_named_by_its_id(ci_sweep, tiny_model_dir, hh_dir):
    """After three kills: every complete run folder is the one folder of a finished job (named by the job's id),
    none is missing or extra; the partial folders killed jobs left were replaced."""
    root, _, result = ci_sweep
    _, jobs = grids.load_grid(REPO / "grids" / "ci.yaml", {"model": str(tiny_model_dir), "data_source": str(hh_dir)})
    state = _state(root)
    complete = {str(p) for p in root.iterdir() if is_complete(p)}
    runs = {e["run"] for e in state.values() if e["status"] == "done" and e.get("run")}
    assert complete == runs
    for job in jobs:
        entry = state[job.id]
        if entry.get("run"):
            assert Path(entry["run"]).name.endswith("__" + grids.job_run_id(job))
    assert not [p for p in root.iterdir() if p.name.endswith(".partial")]


_KERNEL_FROM_BEFORE = """
import sys, time
from pathlib import Path
from workbench.modeling.runs import _hold_writer_lock
partial = Path(sys.argv[1])
lock = _hold_writer_lock(partial)
print("writing", flush=True)
time.sleep(3)
(partial / ".writer.lock").unlink()
partial.rename(sys.argv[2])
"""


def test_a_run_that_finished_before_its_state_was_written_is_adopted(ci_sweep, tiny_model_dir, hh_dir, capfd):
    """Killed after the run, before its state; and the resume begins while the job's kernel, which outlives the
    killed sweep by a second or two, still finishes the run: the sweep waits for it, then adopts the run."""
    root, _, _ = ci_sweep
    state = _state(root)
    job_id, entry = next((k, v) for k, v in state.items() if v.get("run") and "dpo__" in v["run"])
    (root / "sweeps" / "ci" / "jobs" / f"{job_id}.json").unlink()  # as if killed after the run, before its state
    folder = Path(entry["run"])
    partial = folder.with_name(folder.name + ".partial")
    folder.rename(partial)  # ... and the kernel from before still writes it
    kernel = subprocess.Popen([sys.executable, "-c", _KERNEL_FROM_BEFORE, str(partial), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert kernel.stdout.readline().strip() == "writing"
    n_before = len([p for p in root.iterdir() if is_complete(p)]) + 1
    overrides = {"model": str(tiny_model_dir), "data_source": str(hh_dir)}
    old = os.getcwd()
    os.chdir(root.parent.parent)  # where the sweep ran: the grid's relative figures_dir resolves there
    try:
        result = sweep.run_sweep(REPO / "grids" / "ci.yaml", overrides, runs_dir=str(root), retry_failed=False)
    finally:
        os.chdir(old)
    assert kernel.wait() == 0
    assert f"(pid {kernel.pid}) still writes {folder.name}; waiting for it" in capfd.readouterr().err
    assert _state(root)[job_id]["run"] == entry["run"] and _state(root)[job_id]["adopted"]
    assert len([p for p in root.iterdir() if is_complete(p)]) == n_before, "adopted, not run again"
    assert len(result.done) == 12


def test_sweep_isolates_the_failing_job_and_keeps_its_notebook(ci_sweep):
    root, _, result = ci_sweep
    assert [label for label, _, _ in result.failed] == ["broken"]
    label, nb, err = result.failed[0]
    assert "FileNotFoundError" in err and "/nonexistent/hh-rlhf" in err
    assert Path(nb).exists() and "FileNotFoundError" in Path(nb).read_text()
    assert len(result.done) == 12 and not result.skipped  # everything after the failure still ran
    assert "FAILED" in result.report()


def test_sweep_ends_with_the_table_the_figures_and_a_paper(ci_sweep, tmp_path):
    root, _, result = ci_sweep
    table = result.table
    assert sorted(table["method"]) == ["dpo", "dpo", "ipo", "online-dpo", "ppo", "reward", "reward", "rloo", "sft"]
    assert table[table["method"] != "reward"]["eval/gold"].notna().all()
    policies = table[table["method"] != "reward"]  # the AI judge's agreement, beside the reward models' accuracy
    assert policies["pairs/judge_accuracy"].between(0, 1).all() and policies["pairs/judge_accuracy"].nunique() == 1
    from workbench.reporting import widgets

    online = widgets.InspectorModel(root).online  # the inspector shows online DPO's pairs with their round
    assert len(online) and set(online["round"]) == {1} and (online["label_gap"] > 0).all()
    (rlaif,) = [p for p in root.iterdir() if is_complete(p) and p.name.startswith("dpo__rlaif__")]  # AI feedback
    labels = [json.loads(line) for line in (rlaif / "records" / "judge_labels.jsonl").read_text().splitlines()]
    summary = json.loads((rlaif / "summary.json").read_text())
    assert len(labels) == summary["labels/n_pairs"] == 4 and {r["label"] for r in labels} <= {"kept", "swapped", "tie"}
    assert summary["train/pairs"] == 4 - summary["labels/ties"]
    figs = sorted(p.name for p in (root.parent.parent / "runs" / "ci" / "figures").iterdir())
    assert {f"{n}.{ext}" for n in ("frontier", "overoptimization", "win_rates", "accuracy", "cost")
            for ext in ("pdf", "svg", "png")} <= set(figs)
    draft = paper.build(table, tmp_path / "draft.md", root.parent.parent / "runs" / "ci" / "figures")
    text = draft.read_text()
    assert "{{" not in text and "| dpo |" in text and "frontier.png" in text and "seed(s)" in text


def test_the_sweeps_grid_shares_the_main_jobs_stages_word_for_word():
    """grids/gold-sweeps.yaml adopts the main job's runs and evaluations: its sft, gold-pairs, proxy and evaluate
    stages must be the main grid's (another evaluation setting would meet the main job's evaluations as 'under other
    settings' and stop), and its online DPO by the gold trains as the main job's online DPO, its labeller aside."""
    main, sweeps = ({s["stage"]: s for s in yaml.safe_load((REPO / "grids" / name).read_text())["stages"]}
                    for name in ("main.yaml", "gold-sweeps.yaml"))
    for stage in ("sft", "gold-pairs", "proxy", "evaluate"):
        assert sweeps[stage] == main[stage], stage
    online, by_gold = main["online"]["params"], sweeps["online-gt"]["params"]
    assert {k: v for k, v in by_gold.items() if k not in ("reward_model", "run_name")} == {
        k: v for k, v in online.items() if k != "reward_model"}


def test_use_vllm_set_on_a_sweep_reaches_the_arms_that_generate_through_trl_only():
    """``--set use_vllm=true`` on the GPU study: TRL's GRPO and RLOO jobs take it (in their notebook's overrides),
    our PPO, online DPO, the preference arms and the evaluation keep their own sampler."""
    _, jobs = grids.load_grid(REPO / "grids" / "gpu.yaml", overrides={"use_vllm": True})
    took = {(j.stage, j.params.get("method")): (j.params.get("overrides") or {}).get("use_vllm") for j in jobs}
    assert {k for k, v in took.items() if v} == {("rl", "rloo"), ("rl", "grpo"), ("rlaifreward", "grpo")}
