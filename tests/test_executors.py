"""Sweeps on executors: jobs side by side on this machine (``local``: packed by their cpus and GPUs, threads and
devices passed to the kernel, gone when the sweep is killed); the CI grid on Ray with two jobs at once, killed at random moments and resumed (one complete
run folder per finished job, none lost, the failing job isolated); GPUs assigned per job by Ray (fake GPUs on a CPU
machine) and inherited by the notebook's kernel; jobs Ray could never place refused before anything runs; Slurm
through submitit's local executor, in order and resumed; per-job state files."""

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.orchestration import executors, sweep
from workbench.orchestration import grid as grids
from workbench.modeling.runs import is_complete

REPO = Path(__file__).resolve().parents[1]
RAY_KILL_SEEDS = (1, 0)  # seeds of the random moments the Ray sweep is killed at (19 s and 40 s)


def _env_notebook(path: Path) -> Path:
    """A two-cell notebook: parameters (``tag``, ``out_dir``), then a cell that writes the kernel's
    CUDA_VISIBLE_DEVICES and its start and end times to ``<tag>.json`` beside the notebook, after a short sleep."""
    cells = [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [],
         "source": ['tag = "x"\n', 'after = ""\n', 'out_dir = ""\n']},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
         "source": ["import json, os, time\n", "t0 = time.time()\n", "time.sleep(3)\n",
                    "json.dump({'devices': os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': t0, 'end': time.time(), "
                    "'threads': os.environ.get('OMP_NUM_THREADS')}, open(os.path.join(out_dir, tag + '.json'), 'w'))\n"]}]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}}
    path.write_text(json.dumps(nb))
    return path


def _grid(tmp_path, resources=None, **extra) -> Path:
    nb = _env_notebook(tmp_path / "env.ipynb")
    stage_a = {"stage": "a", "notebook": str(nb), "params": {"out_dir": str(tmp_path)}, "grid": {"tag": ["a0", "a1"]}}
    if resources:
        stage_a["resources"] = resources
    stage_b = {"stage": "b", "notebook": str(nb), "params": {"out_dir": str(tmp_path), "tag": "b"}, "always": True}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "env", "runs_dir": str(tmp_path / "runs"), "stages": [stage_a, stage_b],
                                    **extra}))
    return path


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.fixture
def fake_gpu_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def two_cpu_two_gpu_local(monkeypatch):
    """The local executor on a machine of 2 CPUs and 2 (fake) GPUs, whatever this one has."""
    monkeypatch.setattr(executors, "Local", functools.partial(executors.Local, cpus=2, gpus=2))


def test_local_runs_jobs_side_by_side_with_their_threads_and_gpus(tmp_path, two_cpu_two_gpu_local):
    grid = _grid(tmp_path, resources={"cpus": 1, "gpus": 1}, executor="local")  # the grid names its executor
    result = sweep.run_sweep(grid)
    assert len(result.done) == 3 and not result.failed
    a0, a1, b = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("a0", "a1", "b"))
    assert _overlap(a0, a1), "two jobs of one CPU each fit the two CPUs at once"
    assert {a0["devices"], a1["devices"]} == {"0", "1"} and a0["threads"] == a1["threads"] == "1"
    assert b["start"] >= max(a0["end"], a1["end"]) and b["devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    state = sweep.read_state(tmp_path / "runs" / "sweeps" / "env")
    assert all(e["status"] == "done" and e["seconds"] > 0 for e in state.values())


def test_local_packs_jobs_by_their_cpus_and_refuses_what_cannot_fit(tmp_path, two_cpu_two_gpu_local):
    grid = _grid(tmp_path, resources={"cpus": 2})
    result = sweep.run_sweep(grid, executor="local")
    a0, a1 = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("a0", "a1"))
    assert len(result.done) == 3 and not _overlap(a0, a1), "two jobs of 2 CPUs each run one after the other"
    assert a0["threads"] == a1["threads"] == "2"
    (tmp_path / "bad").mkdir()
    for res, needle in (({"cpus": 3}, "(cpus 3, gpus 0)"), ({"gpus": 3}, "(cpus 1, gpus 3)")):
        with pytest.raises(ValueError, match=r"2 job\(s\) need more than this machine has \(2 CPUs, 2 GPUs\)") as e:
            sweep.run_sweep(_grid(tmp_path / "bad", resources=res), executor="local")
        assert needle in str(e.value)


def test_a_killed_sweep_leaves_no_local_job_running(tmp_path):
    """The sweep's process is SIGKILLed while a job runs: the job's process and its notebook's kernel end too, so a
    resumed sweep never races a job left over from before."""
    nb = _env_notebook(tmp_path / "slow.ipynb")
    cells = json.loads(nb.read_text())
    cells["cells"][1]["source"] = ["import os, time\n", "open(os.path.join(out_dir, tag + '.pid'), 'w').write(str(os.getpid()))\n",
                                   "time.sleep(120)\n"]
    nb.write_text(json.dumps(cells))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "slow", "runs_dir": str(tmp_path / "runs"), "executor": "local", "stages": [
        {"stage": "a", "notebook": str(nb), "params": {"out_dir": str(tmp_path), "tag": "a"}}]}))
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "sweep", str(grid)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = tmp_path / "a.pid"
    for _ in range(120):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.5)
    kernel = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(60):
        if not _alive(kernel):
            break
        time.sleep(0.5)
    else:
        os.kill(kernel, signal.SIGKILL)
        pytest.fail("the notebook's kernel outlived the killed sweep by 30 s")


def test_ray_gives_each_job_its_own_gpu_and_the_kernel_inherits_it(tmp_path, fake_gpu_ray):
    grid = _grid(tmp_path, resources={"cpus": 1, "gpus": 1})
    result = sweep.run_sweep(grid, executor="ray")
    assert len(result.done) == 3 and not result.failed
    a0, a1, b = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("a0", "a1", "b"))
    assert {a0["devices"], a1["devices"]} == {"0", "1"}, "two jobs at once, one fake GPU each, seen by the kernel"
    assert _overlap(a0, a1), "the two jobs of stage a ran at the same time"
    assert b["start"] >= max(a0["end"], a1["end"]) and b["devices"] is None  # b (always) waited for stage a; no GPU
    state = sweep.read_state(tmp_path / "runs" / "sweeps" / "env")
    assert sorted(e["devices"] or "-" for e in state.values()) == ["-", "0", "1"]
    assert all(e["status"] == "done" and e["seconds"] > 0 for e in state.values())
    # a resumed sweep runs nothing again but the always stage
    first_a0 = (tmp_path / "a0.json").read_text()
    again = sweep.run_sweep(grid, executor="ray")
    assert len(again.done) == 3 and (tmp_path / "a0.json").read_text() == first_a0
    assert json.loads((tmp_path / "b.json").read_text())["start"] > b["end"]


def test_ray_refuses_jobs_no_node_can_hold_before_anything_runs(tmp_path, fake_gpu_ray):
    grid = _grid(tmp_path, resources={"gpus": 4})
    with pytest.raises(ValueError, match=r"2 job\(s\) need more than any Ray node has \(2 CPUs / 2 GPUs\)"):
        sweep.run_sweep(grid, executor="ray")
    assert not list(tmp_path.glob("a*.json"))


def test_slurm_through_submitit_runs_stages_in_order_and_resumes(tmp_path):
    pytest.importorskip("submitit")
    grid = _grid(tmp_path, resources={"cpus": 1, "time_min": 10}, slurm={"partition": "gpu"})
    result = sweep.run_sweep(grid, executor="slurm", slurm_cluster="local")
    assert len(result.done) == 3 and not result.failed
    a0, a1, b = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("a0", "a1", "b"))
    assert b["start"] >= max(a0["end"], a1["end"])
    state_dir = tmp_path / "runs" / "sweeps" / "env"
    assert len(list((state_dir / "slurm").glob("*/*_submitted.pkl"))) == 3  # one submitit job per sweep job
    again = sweep.run_sweep(grid, executor="slurm", slurm_cluster="local")
    assert len(again.done) == 3 and len(list((state_dir / "slurm").glob("*/*_submitted.pkl"))) == 4  # b runs again


def test_slurm_without_sbatch_and_address_without_ray_are_refused(tmp_path):
    if shutil.which("sbatch"):
        pytest.skip("this machine has sbatch: the refusal is for machines without Slurm")
    grid = _grid(tmp_path)
    for args, needle in ((["--executor", "slurm"], "no `sbatch` on this machine"),
                         (["--address", "auto"], "--address joins a Ray cluster: it needs --executor ray")):
        proc = subprocess.run([sys.executable, "-m", "workbench", "sweep", str(grid), *args], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_stage_resources_are_validated_with_the_grid(tmp_path):
    grid = yaml.safe_load(_grid(tmp_path).read_text())
    grid["stages"][0]["resources"] = {"gpu": 1, "cpus": 0}
    grid["slurm"] = "gpu"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError) as e:
        grids.load_grid(path)
    for needle in ("unknown resource 'gpu'", "resources.cpus must be > 0", "'slurm' must be a mapping"):
        assert needle in str(e.value), needle


def test_a_sweep_state_from_before_per_job_files_is_read_and_split(tmp_path):
    state_dir = tmp_path / "sweeps" / "old"
    state_dir.mkdir(parents=True)
    old = {"sft-1": {"status": "done", "run": None}, "dpo-2": {"status": "failed", "error": "x", "notebook": "n"}}
    (state_dir / "state.json").write_text(json.dumps(old))
    assert sweep.read_state(state_dir) == old
    assert sorted(p.name for p in (state_dir / "jobs").iterdir()) == ["dpo-2.json", "sft-1.json"]
    assert sweep.read_state(state_dir) == old and not (state_dir / "state.json").exists()


def test_progress_names_running_jobs_and_estimates_from_finished_ones():
    jobs = [grids.Job("sft", Path("x.ipynb"), {"seed": s}, grid_keys=("seed",)) for s in range(4)]
    now = time.time()
    state = {jobs[0].id: {"status": "done", "seconds": 100.0}, jobs[1].id: {"status": "done", "seconds": 200.0},
             jobs[2].id: {"status": "running", "started": now - 30}, jobs[3].id: {"status": "queued"}}
    line = sweep._progress(jobs, state, {jobs[0].id, jobs[1].id}, {"h2": jobs[2], "h3": jobs[3]}, now - 300)
    assert "2/4 ended (2 done, 0 failed), 1 running, 1 queued, 0 waiting" in line
    # the jobs left: 150 s each (the finished ones' mean), less the 30 s the running one has run; one at a time
    assert "running: sft seed=2 (30 s)" in line and "ETA ~4.5 min" in line
    state[jobs[2].id]["started"] = now - 120  # later into the same job, the estimate moves toward zero
    line = sweep._progress(jobs, state, {jobs[0].id, jobs[1].id}, {"h2": jobs[2], "h3": jobs[3]}, now - 390)
    assert "ETA ~3.0 min" in line
    # two at a time (the most the sweep has run at once), whether or not two are running this moment
    assert "ETA ~90 s" in sweep._progress(jobs, state, {jobs[0].id, jobs[1].id}, {"h2": jobs[2], "h3": jobs[3]},
                                          now - 390, parallel=2)
    # a job that has written its end but whose process is not reaped yet is still running, not queued
    ending = {**state, jobs[2].id: {"status": "done", "started": now - 30, "seconds": 30.0}}
    assert "1 running, 1 queued" in sweep._progress(jobs, ending, {jobs[0].id, jobs[1].id},
                                                   {"h2": jobs[2], "h3": jobs[3]}, now - 390)
    # a last job running longer than the jobs before it took: no made-up "~0 s"
    state[jobs[3].id] = {"status": "running", "started": now - 400}
    state[jobs[2].id] = {"status": "done", "seconds": 150.0}
    line = sweep._progress(jobs, state, {j.id for j in jobs[:3]}, {"h3": jobs[3]}, now - 800)
    assert "ETA unknown (sft seed=3 past the estimate from the jobs before)" in line and "~0 s" not in line


def test_a_status_line_is_printed_when_it_changes_or_once_a_minute(capsys):
    say = sweep._Progress()
    line = "[sweep] 0/9 ended (0 done, 0 failed), 1 running, 0 queued, 8 waiting; {} so far; running: proxy ({})"
    assert say(line.format("1.9 min", "1.9 min"), now=0.0)
    assert not say(line.format("1.9 min", "1.9 min"), now=1.0)  # the scheduler woke, nothing changed
    assert not say(line.format("2.3 min", "2.3 min"), now=30.0)  # only the times moved
    assert say(line.replace("0/9 ended (0", "1/9 ended (1").format("2.4 min", "12 s"), now=31.0)  # a job ended
    assert say(line.replace("0/9 ended (0", "1/9 ended (1").format("3.4 min", "72 s"), now=91.0)  # a minute on
    assert len(capsys.readouterr().err.splitlines()) == 3


# ----------------------------------------------------------------------------------------------------------
# The CI grid on Ray, killed and resumed


def test_ci_grid_on_ray_runs_two_jobs_at_once_and_survives_kills(tiny_model_dir, hh_dir, tmp_path):
    """grids/ci.yaml on the tiny model with ``--executor ray`` (a local Ray with 2 CPUs: two one-CPU jobs at once),
    killed with SIGKILL (sweep, Ray and every kernel) at two random moments (seeded: ``RAY_KILL_SEEDS``), then resumed
    to the end: one complete run folder per finished job, none lost, no partial left, the failing job isolated."""
    pytest.importorskip("ray")
    root = tmp_path / "runs" / "ci"
    overrides = {"model": str(tiny_model_dir), "data_source": str(hh_dir)}
    cmd = [sys.executable, "-m", "workbench", "sweep", str(REPO / "grids" / "ci.yaml"), "--runs-dir", str(root),
           "--executor", "ray", *(f"--set={k}={v}" for k, v in overrides.items())]
    for seed in RAY_KILL_SEEDS:
        proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(random.Random(seed).uniform(15, 45))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = sweep.read_state(root / "sweeps" / "ci")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = sweep.run_sweep(REPO / "grids" / "ci.yaml", overrides, runs_dir=str(root), executor="ray")
    finally:
        os.chdir(old)
    state = sweep.read_state(root / "sweeps" / "ci")
    _, jobs = grids.load_grid(REPO / "grids" / "ci.yaml", overrides)
    for job_id, entry in killed.items():  # what had finished before a kill was kept, not run again
        if entry["status"] == "done" and not next(j for j in jobs if j.id == job_id).always:
            assert state[job_id] == entry
    complete = {str(p) for p in root.iterdir() if is_complete(p)}
    assert complete == {e["run"] for e in state.values() if e["status"] == "done" and e.get("run")}
    assert len(complete) == 9 and not [p for p in root.iterdir() if p.name.endswith(".partial")]
    assert [label for label, _, _ in result.failed] == ["broken"] and len(result.done) == 12
    assert sorted(result.table["method"]) == ["dpo", "dpo", "ipo", "online-dpo", "ppo", "reward", "reward", "rloo", "sft"]
    # two jobs at once: some pair of training jobs of the final sweep overlapped in time
    ran = [e for e in state.values() if "started" in e and "ended" in e]
    assert any(a["started"] < b["ended"] and b["started"] < a["ended"] for a in ran for b in ran if a is not b), \
        "no two jobs ran at the same time"


def test_a_job_kernel_talks_over_private_sockets_without_the_tcp_warning(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}, "language_info": {"name": "python"}})
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("import os\nprint('x is', x)")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    task = {"notebook": str(tmp_path / "in.ipynb"), "out_nb": str(tmp_path / "out.ipynb"), "params": {"x": 2},
            "kernel_name": "python3", "cwd": str(tmp_path), "label": "t", "state_file": str(tmp_path / "state.json"),
            "folder": None}
    assert executors.run_job(task)["status"] == "done"
    assert "x is 2" in (tmp_path / "out.ipynb").read_text()
    assert "without encryption" not in "".join(capfd.readouterr())
