"""Sweeps: a grid file expands into papermill executions of the notebooks, one run folder per job.

A grid file (YAML)::

    name: main-cpu                      # the sweep's state lives in <runs_dir>/sweeps/<name>/
    runs_dir: runs/main                 # where the run folders go (relative to the current directory)
    defaults: {model: ..., n_train: 32} # parameters of every job (only where the notebook has the parameter)
    stages:                             # run in order; a stage may refer to an earlier one's run folders
      - stage: sft
        notebook: 01_sft.ipynb
        params: {max_steps: 4}          # parameters of every job of this stage
        grid: {seed: [0, 1, 2]}         # the cartesian product of these lists: one job each
      - stage: dpo
        notebook: 04_preference.ipynb
        params: {sft_run: "@sft"}       # the run folder of stage sft's job with the same seed
        grid: {method: [dpo, ipo], beta: [0.1, 0.5], seed: [0, 1, 2]}
      - stage: ppo
        notebook: 03_rl.ipynb
        params: {reward_model: "@reward[half=a]"}   # a job of stage reward with half = a (same seed if several)
      - stage: evaluate
        notebook: 05_evaluate.ipynb     # its metadata says {"workbench": {"evaluates": true}}: the sweep's results
        always: true                    # table is read under its evaluation name; it runs again on every resume

Before anything runs, every job is checked against its notebook's ``parameters`` cell (unknown names, values of
another type) and, for the training notebooks, built into its config (``arms.make_config``); all problems are
listed in one error. Jobs run one at a time. A job whose notebook fails is recorded as failed, its executed
notebook kept and listed, and the sweep goes on (jobs that need its run folder are skipped and listed).

Nothing finished is lost or run twice, even under ``kill -9``. A training job owns one run folder, named from its
config and its job id (``run_id``, passed into the notebook), so its name is known before the job starts
(``job_folder``). Progress is written to ``state.json`` after every job, atomically; on resume a job whose folder is
complete is adopted, even when the sweep was killed after the run finished and before its state was written, and an
interrupted job starts again from the beginning (its ``.partial`` folder never counts and is replaced). A
successful job's executed notebook is copied into its run folder as ``notebook.ipynb``.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .runs import default_root, is_complete, write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GRID_KEYS = {"name", "description", "runs_dir", "defaults", "stages"}
STAGE_KEYS = {"stage", "notebook", "params", "grid", "always"}
_REF = re.compile(r"^@([A-Za-z0-9_-]+)(?:\[(.*)\])?$")


def evaluates(path: Path) -> bool:
    """Does the notebook evaluate runs (its metadata: ``{"workbench": {"evaluates": true}}``)? The sweep reads its
    results table under that notebook's evaluation ``name``."""
    return bool(json.loads(Path(path).read_text()).get("metadata", {}).get("workbench", {}).get("evaluates"))


def notebook_parameters(path: Path) -> dict:
    """The literals of a notebook's ``parameters`` cell, as {name: value}."""
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: needs exactly one cell tagged 'parameters' (found {len(cells)}).")
    out = {}
    for node in ast.parse("".join(cells[0]["source"])).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: the parameters cell may hold only `name = literal` lines.")
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


@dataclass
class Job:
    stage: str
    notebook: Path
    params: dict  # as written in the grid (references "@stage[...]" unresolved)
    always: bool = False

    @property
    def id(self) -> str:
        key = json.dumps({"stage": self.stage, "notebook": self.notebook.name, "params": self.params}, sort_keys=True)
        return f"{self.stage}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if k in self.grid_keys}
        return " ".join([self.stage, *(f"{k}={v}" for k, v in shown.items())])

    grid_keys: tuple = ()


def _expand(stage: dict, defaults: dict, overrides: dict, nb_params: dict) -> list[Job]:
    grid = stage.get("grid") or {}
    keys = list(grid)
    jobs = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        params = {k: v for k, v in {**defaults, **overrides}.items() if k in nb_params}  # overrides replace defaults
        params.update(stage.get("params") or {})
        params.update(dict(zip(keys, values)))
        jobs.append(Job(stage["stage"], NOTEBOOKS / stage["notebook"], params, bool(stage.get("always")), tuple(keys)))
    return jobs


def _check_job(job: Job, nb_params: dict, stages_before: list[str]) -> list[str]:
    """Problems of one job: unknown parameters, wrong types, bad references, a config that cannot be built."""
    where = f"stage '{job.stage}' ({job.notebook.name})"
    problems = []
    for k, v in job.params.items():
        if k not in nb_params:
            problems.append(f"{where}: unknown parameter '{k}' (the notebook has: {', '.join(nb_params)})")
            continue
        default = nb_params[k]
        ref = _REF.match(v) if isinstance(v, str) else None
        if ref and ref.group(1) not in stages_before:
            problems.append(f"{where}: {k}={v!r} refers to no earlier stage (earlier: {', '.join(stages_before) or 'none'})")
        elif not ref and default is not None and v is not None and not (
                isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))):
            problems.append(f"{where}: {k}={v!r} should be a {type(default).__name__} like the notebook's {default!r}")
    if "method" in nb_params and not problems:  # a training notebook: its config must build
        try:
            job_config(job)
        except (ValueError, TypeError) as e:
            problems.append(f"{where} {job.label}: {e}")
    return problems


def job_run_id(job: Job) -> str:
    """The run id a job's run folder is named with: its job id, in the characters a run id allows."""
    return re.sub(r"[^A-Za-z0-9+-]+", "-", job.id)


def job_folder(job: Job, root: Path) -> Path | None:
    """The one run folder a training job writes (``<root>/<method>__<name>__s<seed>__<run id>``), known before it
    runs; None for a notebook that writes none (or takes no ``run_id``)."""
    from .arms import method_label
    from .runs import run_name

    if "run_id" not in notebook_parameters(job.notebook) or "method" not in notebook_parameters(job.notebook):
        return None
    arm, cfg = job_config(job)
    return Path(root) / run_name(method_label(arm, cfg), cfg.run_name, cfg.seed, job_run_id(job))


def job_config(job: Job):
    """(arm, config) of a training notebook's job, built as the notebook builds it: the notebook's parameters with
    the job's over them, through ``arms.make_config`` (references to other stages' run folders stand as "<ref>"
    until the sweep resolves them)."""
    from . import arms

    merged = {**notebook_parameters(job.notebook), **job.params}
    merged = {k: ("<ref>" if isinstance(v, str) and _REF.match(v) else v) for k, v in merged.items()}
    return arms.make_config(merged.pop("method"), **merged)


def load_grid(path, overrides: dict | None = None, seeds: list[int] | None = None) -> tuple[dict, list[Job]]:
    """(grid, jobs) from a grid file, validated; ``overrides`` replace the grid's ``defaults`` (a stage's own
    ``params`` and ``grid`` still win), e.g. a tiny model for tests. ``seeds`` makes every stage that is not
    ``always`` and whose notebook takes a ``seed`` run once per seed (its ``seed`` grid axis, replacing any), so
    ``@stage`` references pair the jobs of one seed; a stage whose own ``params`` fix the seed keeps it (the reward
    models of a study: one proxy and one gold judge for every seed, so all runs are evaluated by the same judges).
    Every problem is listed in one ValueError."""
    path = Path(path)
    grid = yaml.safe_load(path.read_text())
    if not isinstance(grid, dict):
        raise ValueError(f"{path}: a grid file is a YAML mapping with keys {sorted(GRID_KEYS)}.")
    if seeds is not None:
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0 (got {seeds!r}).")
        for stage in grid.get("stages") or []:
            nb = NOTEBOOKS / str(stage.get("notebook"))
            fixed = "seed" in (stage.get("params") or {})
            if not stage.get("always") and not fixed and nb.exists() and "seed" in notebook_parameters(nb):
                stage["grid"] = {**(stage.get("grid") or {}), "seed": list(seeds)}
    problems = [f"unknown key '{k}' (known: {', '.join(sorted(GRID_KEYS))})" for k in grid if k not in GRID_KEYS]
    if not grid.get("name") or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(grid.get("name"))):
        problems.append("'name' is required: letters, digits, '_', '.', '-'")
    jobs, seen = [], []
    for i, stage in enumerate(grid.get("stages") or []):
        bad = [k for k in stage if k not in STAGE_KEYS]
        if bad or "stage" not in stage or "notebook" not in stage:
            problems.append(f"stages[{i}]: needs 'stage' and 'notebook'; unknown keys {bad} (known: {sorted(STAGE_KEYS)})")
            continue
        nb = NOTEBOOKS / stage["notebook"]
        if not nb.exists():
            problems.append(f"stages[{i}] ('{stage['stage']}'): no notebook {nb}")
            continue
        if not all(isinstance(v, list) and v for v in (stage.get("grid") or {}).values()):
            problems.append(f"stages[{i}] ('{stage['stage']}'): every grid entry must be a non-empty list")
            continue
        nb_params = notebook_parameters(nb)
        for job in _expand(stage, grid.get("defaults") or {}, overrides or {}, nb_params):
            problems += _check_job(job, nb_params, seen)
            jobs.append(job)
        seen.append(stage["stage"])
    if not jobs and not problems:
        problems.append("no stages")
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s), nothing was run:\n  - " + "\n  - ".join(problems))
    return grid, jobs


# ----------------------------------------------------------------------------------------------------------
# Running


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


def _resolve(job: Job, state: dict, jobs: list[Job]) -> tuple[dict, str | None]:
    """Job parameters with "@stage[k=v,...]" replaced by that stage's run folder; (params, why not) if impossible."""
    out = {}
    for k, v in job.params.items():
        m = _REF.match(v) if isinstance(v, str) else None
        if not m:
            out[k] = v
            continue
        want = dict(kv.split("=", 1) for kv in m.group(2).split(",")) if m.group(2) else {}
        cands = [j for j in jobs if j.stage == m.group(1)
                 and all(str(j.params.get(a)) == b for a, b in want.items())]
        if len(cands) > 1:
            cands = [j for j in cands if j.params.get("seed") == job.params.get("seed")]
        if len(cands) != 1:
            return {}, f"{k}={v} matches {len(cands)} jobs; narrow it with [key=value]"
        entry = state.get(cands[0].id, {})
        if entry.get("status") != "done" or not entry.get("run"):
            return {}, f"needs {cands[0].label}, which has not finished ({entry.get('status', 'not run')})"
        out[k] = entry["run"]
    return out, None


def run_sweep(grid_path, overrides: dict | None = None, runs_dir: str | None = None, retry_failed: bool = True,
              kernel_name: str = "python3", seeds: list[int] | None = None) -> SweepResult:
    """Run (or resume) the sweep of a grid file and return what happened, with the results table when it has one.
    ``seeds``: run every seeded stage once per seed (``load_grid``); finished jobs of earlier seeds are kept."""
    import papermill as pm

    grid, jobs = load_grid(grid_path, overrides, seeds)
    root = Path(runs_dir or grid.get("runs_dir") or default_root()).resolve()
    state_dir = root / "sweeps" / grid["name"]
    (state_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    result = SweepResult(state_dir)
    t_sweep = time.time()
    for i, job in enumerate(jobs, start=1):
        tag = f"[sweep {i}/{len(jobs)}] {job.label}"
        entry = state.get(job.id, {})
        if entry.get("status") == "done" and not job.always and (entry.get("run") is None or is_complete(entry["run"])):
            print(f"{tag}: done before, skipped", flush=True)
            result.done.append((job.label, entry.get("run")))
            continue
        if entry.get("status") == "failed" and not retry_failed:
            result.failed.append((job.label, entry["notebook"], entry["error"]))
            continue
        folder = job_folder(job, root)
        if folder is not None and is_complete(folder) and not job.always:  # finished, but killed before its state
            out_nb = state_dir / "notebooks" / f"{job.id}.ipynb"
            if out_nb.exists() and not (folder / "notebook.ipynb").exists():
                shutil.copy(out_nb, folder / "notebook.ipynb")
            state[job.id] = {"status": "done", "label": job.label, "run": str(folder), "notebook": str(out_nb),
                             "adopted": True}
            write_json(state_path, state)
            print(f"{tag}: finished before the interruption, adopted -> {folder}", flush=True)
            result.done.append((job.label, str(folder)))
            continue
        params, why = _resolve(job, state, jobs)
        if why:
            print(f"{tag}: skipped, {why}", flush=True)
            result.skipped.append((job.label, why))
            continue
        if "runs_dir" in notebook_parameters(job.notebook):
            params["runs_dir"] = str(root)
        if folder is not None:
            params["run_id"] = job_run_id(job)
        out_nb = state_dir / "notebooks" / f"{job.id}.ipynb"
        before = {p.name for p in root.iterdir()} if root.exists() else set()
        print(f"{tag}: running {job.notebook.name} ...", flush=True)
        t0 = time.time()
        try:
            pm.execute_notebook(str(job.notebook), str(out_nb), parameters=params, kernel_name=kernel_name,
                                progress_bar=False, cwd=str(Path.cwd()))
        except pm.PapermillExecutionError as e:
            err = f"{e.ename}: {e.evalue}".strip()[:500]
            state[job.id] = {"status": "failed", "label": job.label, "notebook": str(out_nb), "error": err}
            write_json(state_path, state)
            print(f"{tag}: FAILED after {time.time() - t0:.0f} s ({err.splitlines()[0][:120]}); notebook kept: {out_nb}",
                  flush=True)
            result.failed.append((job.label, str(out_nb), err))
            continue
        if folder is not None:
            run = str(folder) if is_complete(folder) else None
        else:  # a notebook that takes no run_id: the folder it made, if any
            new = sorted(p for p in root.iterdir() if p.name not in before and is_complete(p)) if root.exists() else []
            run = str(new[-1]) if new else None
        if run:
            shutil.copy(out_nb, Path(run) / "notebook.ipynb")
        state[job.id] = {"status": "done", "label": job.label, "run": run, "notebook": str(out_nb),
                         "seconds": round(time.time() - t0, 1)}
        write_json(state_path, state)
        print(f"{tag}: done in {time.time() - t0:.0f} s" + (f" -> {run}" if run else ""), flush=True)
        result.done.append((job.label, run))
    result.table = _results(jobs, state)
    print(result.report() + f"\n[sweep] {time.time() - t_sweep:.0f} s in all", flush=True)
    return result


def _results(jobs: list[Job], state: dict):
    """The results table of the sweep's finished runs, under the evaluation its evaluate stage ran (if any)."""
    from .results import results_table

    evals = [j for j in jobs if evaluates(j.notebook) and state.get(j.id, {}).get("status") == "done"]
    if not evals:
        return None
    name = evals[-1].params.get("name") or notebook_parameters(evals[-1].notebook)["name"]
    runs = [state[j.id]["run"] for j in jobs if state.get(j.id, {}).get("run")]
    return results_table(runs, name)
