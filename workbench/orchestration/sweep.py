"""Sweeps: a grid file (``grid.py``) expands into papermill executions of the notebooks, one run folder per job.

Nothing finished is lost or run twice, even under ``kill -9``. A training job owns one run folder, named from its
config and its job id (``run_id``, passed into the notebook), so its name is known before the job starts
(``job_folder``). Each job's state is its own file, ``<runs_dir>/sweeps/<name>/jobs/<job id>.json``, written
atomically by the job itself (``queued``, ``running``, ``done``/``failed``), so parallel workers never overwrite each
other (``read_state`` reads them all). On resume a job whose folder is complete is adopted, even when the sweep was
killed after the run finished and before its state was written, and an interrupted job starts again from the
beginning (its ``.partial`` folder never counts and is replaced), once no process from before the interruption
still writes it (a notebook's kernel can outlive a killed sweep: ``runs.wait_for_writer``). A successful job's
executed notebook is copied into its run folder as ``notebook.ipynb``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import console
from ..modeling.runs import default_root, is_complete, wait_for_writer, write_json
from . import executors
from .grid import Job, evaluates, job_deps, job_folder, job_run_id, load_grid, notebook_parameters, resolve_refs

log = console.logger(__name__)


@dataclass
class SweepResult:
    state_dir: Path
    done: list = field(default_factory=list)  # (label, run folder or None)
    failed: list = field(default_factory=list)  # (label, executed notebook, error)
    skipped: list = field(default_factory=list)  # (label, why)
    table: object = None  # the results table, when the sweep evaluated its runs

    def report(self) -> str:
        lines = [f"[sweep] {len(self.done)} done, {len(self.failed)} failed, {len(self.skipped)} skipped; state in {self.state_dir}"]
        lines += [f"  FAILED  {label}: {err}\n          notebook: {nb}" for label, nb, err in self.failed]
        lines += [f"  skipped {label}: {why}" for label, why in self.skipped]
        return "\n".join(lines)


def read_state(state_dir: Path) -> dict:
    """{job id: state entry} of a sweep: one JSON file per job under ``<state_dir>/jobs/`` (a sweep's state from
    before per-job files, ``state.json``, is split into them on first read)."""
    jobs_dir = Path(state_dir) / "jobs"
    legacy = Path(state_dir) / "state.json"
    if legacy.exists() and not jobs_dir.exists():
        jobs_dir.mkdir(parents=True)
        for job_id, entry in json.loads(legacy.read_text()).items():
            write_json(jobs_dir / f"{job_id}.json", entry)
        legacy.rename(legacy.with_suffix(".json.migrated"))
    if not jobs_dir.exists():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(jobs_dir.glob("*.json"))}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _progress(jobs: list[Job], state: dict, ended: set, running: dict, t_sweep: float, parallel: int = 1) -> str:
    """One line: how many jobs ended how, which are running (for how long), and an ETA from finished jobs' times
    (the mean of the job's stage, else of all; divided by ``parallel``, the most jobs the sweep has run at once, not
    by those running this moment, which made the estimate jump whenever one job ended before the next started)."""
    status = [state.get(j.id, {}).get("status") if j.id in ended else None for j in jobs]
    took = {}
    for j in jobs:
        if j.id in ended and state.get(j.id, {}).get("seconds") is not None:
            took.setdefault(j.stage, []).append(state[j.id]["seconds"])
    every = [t for ts in took.values() for t in ts]
    left = [j for j in jobs if j.id not in ended]
    # a job whose state already says it ended is still running until its process is reaped: not "queued"
    started = [j for j in running.values() if state.get(j.id, {}).get("status") in ("running", "done", "failed")]
    line = (f"[sweep] {len(ended)}/{len(jobs)} ended ({status.count('done')} done, {status.count('failed')} failed)"
            f", {len(started)} running, {len(running) - len(started)} queued, {len(left) - len(running)} waiting"
            f"; {_minutes(time.time() - t_sweep)} so far")
    if started:
        now = time.time()
        line += "; running: " + ", ".join(f"{j.label} ({_minutes(now - state[j.id]['started'])})" for j in started)
    if left and every:  # each job left: its stage's mean time, less what a running one has already run
        now = time.time()
        mean = lambda j: sum(took.get(j.stage, every)) / len(took.get(j.stage, every))  # noqa: E731
        est = sum(max(0.0, mean(j) - (now - state[j.id]["started"])) if j in started else mean(j) for j in left)
        over = [j.label for j in started if now - state[j.id]["started"] > mean(j)]  # past what the estimate allows
        if over and est < 1:
            line += f"; ETA unknown ({', '.join(over)} past the estimate from the jobs before)"
        else:
            line += f"; ETA ~{_minutes(est / max(1, parallel))}" + (f" or more ({', '.join(over)} past its estimate)"
                                                                  if over else "")
    return line


class _Progress:
    """Prints the sweep's status line when what it says changed (jobs ended, started, queued) or once a minute,
    not at every wake of the scheduler (which printed the same line up to 8 times in a row)."""

    def __init__(self, every: float = 60.0):
        self.every, self.said, self.at = every, None, 0.0

    def __call__(self, line: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        what = re.sub(r"[\d.]+ (s|min)\b", "", line)  # the line without its times
        if what == self.said and now - self.at < self.every:
            return False
        log.info(line)
        self.said, self.at = what, now
        return True


def run_sweep(grid_path, overrides: dict | None = None, runs_dir: str | None = None, retry_failed: bool = True,
              kernel_name: str = "python3", seeds: list[int] | None = None, executor: str | None = None,
              address: str | None = None, slurm_cluster: str | None = None) -> SweepResult:
    """Run (or resume) the sweep of a grid file and return what happened, with the results table when it has one.
    ``seeds``: run every seeded stage once per seed (``load_grid``); finished jobs of earlier seeds are kept.
    ``executor``: where jobs run (``workbench.orchestration.executors``; default: the grid's ``executor``, else serial): ``serial``
    (here, one at a time), ``local`` (side by side on this machine, by the stages' resources), ``ray`` (``address``
    joins a running cluster) or ``slurm`` (``slurm_cluster="local"``: submitit's local processes, for tests). A job
    starts as soon as the jobs it needs have ended (an ``always`` stage: every earlier stage), not stage by stage."""
    grid, jobs = load_grid(grid_path, overrides, seeds)
    root = Path(runs_dir or grid.get("runs_dir") or default_root()).resolve()
    state_dir = root / "sweeps" / grid["name"]
    (state_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    state = read_state(state_dir)
    (state_dir / "jobs").mkdir(exist_ok=True)
    ex = executors.make(executor or grid.get("executor") or "serial", state_dir, address=address, slurm=grid.get("slurm"),
                        slurm_cluster=slurm_cluster)
    try:
        return _schedule(jobs, state, root, state_dir, ex, retry_failed, kernel_name)
    finally:
        ex.close()


NOTEBOOK_INCOMPLETE = ("incomplete: the sweep was killed while its kernel finished the run, so the notebook "
                       "papermill last saved lacks the later cells' outputs; the run folder itself is complete")


def _copy_adopted_notebook(out_nb: Path, dest: Path) -> bool:
    """Copy the notebook papermill last saved for an adopted run; return whether it holds every code cell's
    outputs. When it does not, the copy says so in its metadata (``workbench.incomplete``), so a reader of the
    run folder is not misled."""
    nb = json.loads(out_nb.read_text())
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    done = bool(code) and all(c.get("execution_count") is not None for c in code if "".join(c.get("source", "")).strip())
    if not done:
        nb.setdefault("metadata", {}).setdefault("workbench", {})["incomplete"] = NOTEBOOK_INCOMPLETE
    dest.write_text(json.dumps(nb, indent=1))
    return done


def _schedule(jobs, state, root, state_dir, ex, retry_failed, kernel_name) -> SweepResult:
    result = SweepResult(state_dir)
    t_sweep, progress, parallel = time.time(), _Progress(), 1
    number = {j.id: i for i, j in enumerate(jobs, start=1)}
    deps = {j.id: job_deps(j, jobs) for j in jobs}
    folders = {j.id: job_folder(j, root) for j in jobs}  # each builds the job's config: once, not on every pass
    ex.check([(j.label, j.resources) for j in jobs])
    pending, running, ended = list(jobs), {}, set()

    def tag(job):
        return f"[sweep {number[job.id]}/{len(jobs)}] {job.label}"

    def record(job, entry):
        state[job.id] = entry
        write_json(state_dir / "jobs" / f"{job.id}.json", entry)

    def end(job, outcome, *what):
        ended.add(job.id)
        getattr(result, outcome).append((job.label, *what))

    def adopt(job, folder):  # its run folder is complete, but its end was not recorded: the sweep was interrupted
        out_nb = state_dir / "notebooks" / f"{job.id}.ipynb"
        entry = {"status": "done", "label": job.label, "run": str(folder), "notebook": str(out_nb), "adopted": True}
        if out_nb.exists() and not (folder / "notebook.ipynb").exists():
            if not _copy_adopted_notebook(out_nb, folder / "notebook.ipynb"):
                entry["notebook_incomplete"] = NOTEBOOK_INCOMPLETE
        record(job, entry)
        log.info(f"{tag(job)}: finished before the interruption, adopted -> {folder}"
                 + (f" (its notebook.ipynb is {NOTEBOOK_INCOMPLETE})" if "notebook_incomplete" in entry else ""))
        pending.remove(job)
        end(job, "done", str(folder))

    def task(job, params, folder):
        return {"id": job.id, "label": job.label, "notebook": str(job.notebook), "params": params,
                "out_nb": str(state_dir / "notebooks" / f"{job.id}.ipynb"), "kernel_name": kernel_name,
                "cwd": str(Path.cwd()), "folder": str(folder) if folder else None,
                "state_file": str(state_dir / "jobs" / f"{job.id}.json")}

    while pending or running:
        for job in list(pending):
            if not deps[job.id] <= ended:
                continue
            entry = state.get(job.id, {})
            folder = folders[job.id]
            if entry.get("status") == "done" and not job.always and (entry.get("run") is None or is_complete(entry["run"])):
                log.info(f"{tag(job)}: done before, skipped")
                pending.remove(job)
                end(job, "done", entry.get("run"))
            elif entry.get("status") == "failed" and not retry_failed:
                pending.remove(job)
                end(job, "failed", entry["notebook"], entry["error"])
            elif folder is not None and is_complete(folder) and not job.always:  # finished, killed before its state
                adopt(job, folder)
            elif (params_why := resolve_refs(job, state, jobs))[1]:
                log.info(f"{tag(job)}: skipped, {params_why[1]}")
                pending.remove(job)
                end(job, "skipped", params_why[1])
            elif (handle := ex.reattach(entry, task(job, {}, folder))) is not None:
                log.info(f"{tag(job)}: still running from before the interruption, waiting for it")
                pending.remove(job)
                running[handle] = job
            elif ex.has_room(running, job.resources):
                if folder is not None and wait_for_writer(folder, lambda pid: log.info(
                        f"{tag(job)}: a process from before the interruption (pid {pid}) still writes {folder.name}; "
                        "waiting for it")) and is_complete(folder) and not job.always:
                    adopt(job, folder)
                    continue
                params = params_why[0]
                if "runs_dir" in notebook_parameters(job.notebook):
                    params["runs_dir"] = str(root)
                if folder is not None:
                    params["run_id"] = job_run_id(job)
                log.info(f"{tag(job)}: running {job.notebook.name} ({ex.name}) ...")
                pending.remove(job)
                record(job, {"status": "queued", "label": job.label, "queued": time.time()})
                running[ex.submit(task(job, params, folder), job.resources)] = job
        if not running:
            if pending:  # cannot happen: every dependency is an earlier job, which has ended
                raise RuntimeError(f"sweep scheduler stalled on {[j.label for j in pending]}")
            break
        finished = ex.wait(running, timeout=60.0)
        for handle, entry in finished:
            job = running.pop(handle)
            record(job, entry)
            if entry["status"] == "done":
                run = entry.get("run")
                log.info(f"{tag(job)}: done in {entry['seconds']:.0f} s" + (f" -> {run}" if run else ""))
                end(job, "done", run)
            else:
                log.warning(f"{tag(job)}: FAILED after {entry.get('seconds', 0):.0f} s ({entry['error'].splitlines()[0][:120]})"
                         f"; notebook kept: {entry['notebook']}")
                end(job, "failed", entry["notebook"], entry["error"])
        for job in running.values():  # what the workers have written since: started, on which devices
            if (state_dir / "jobs" / f"{job.id}.json").exists():
                state[job.id] = json.loads((state_dir / "jobs" / f"{job.id}.json").read_text())
        parallel = max(parallel, len(running))
        progress(_progress(jobs, state, ended, running, t_sweep, parallel))
    result.table = _results(jobs, state)
    log.info(result.report() + f"\n[sweep] {time.time() - t_sweep:.0f} s in all")
    return result


def _results(jobs: list[Job], state: dict):
    """The results table of the sweep's finished runs, under the evaluation its evaluate stage ran (if any)."""
    from ..measurement.results import results_table

    evals = [j for j in jobs if evaluates(j.notebook) and state.get(j.id, {}).get("status") == "done"]
    if not evals:
        return None
    name = evals[-1].params.get("name") or notebook_parameters(evals[-1].notebook)["name"]
    runs = [state[j.id]["run"] for j in jobs if state.get(j.id, {}).get("run")]
    return results_table(runs, name)
