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
        resources: {gpus: 1, cpus: 8}   # per job, for the local, ray and slurm executors (workbench/orchestration/executors.py)
    executor: local                     # where jobs run unless --executor says otherwise (default: serial)
    slurm: {partition: gpu}             # extra sbatch parameters for --executor slurm

Before anything runs, every job is checked against its notebook's ``parameters`` cell (unknown names, values of
another type) and, for the training notebooks, built into its config (``arms.make_config``); all problems are
listed in one error. Jobs run on an executor (``serial``, the default: here, one at a time; ``local``: side by side
on this machine; ``ray``; ``slurm``). A
job starts as soon as the jobs whose run folders it references have ended (an ``always`` stage: every job of the
stages before it). A job whose notebook fails is recorded as failed, its executed notebook kept and listed, and the
sweep goes on (jobs that need its run folder are skipped and listed). While jobs run, a progress line says how
many ended, which are running and for how long, and an ETA from the finished jobs' times.

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

import ast
import difflib
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core import console, settings
from ..modeling.runs import default_root, is_complete, wait_for_writer, write_json
from . import executors

log = console.logger(__name__)

NOTEBOOKS = settings.REPO / "notebooks"
GRID_KEYS = {"name", "description", "runs_dir", "defaults", "stages", "executor", "slurm"}
STAGE_KEYS = {"stage", "notebook", "params", "grid", "always", "resources"}
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
    grid_keys: tuple = ()
    resources: dict = field(default_factory=dict)  # the stage's, defaults filled in (executors.resources)

    @property
    def id(self) -> str:
        key = json.dumps({"stage": self.stage, "notebook": self.notebook.name, "params": self.params}, sort_keys=True)
        return f"{self.stage}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if k in self.grid_keys}
        return " ".join([self.stage, *(f"{k}={v}" for k, v in shown.items())])


def _user_settings(stage: dict, overrides: dict, nb_params: dict) -> dict:
    """The user's settings (``--set``) that reach one stage: ``key=value`` for every stage whose notebook takes
    ``key``, ``<stage>.key=value`` for that stage alone (it wins over the plain one)."""
    plain = {k: v for k, v in overrides.items() if "." not in k}
    scoped = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.split(".", 1)[0] == stage.get("stage") and "." in k}
    return {k: v for k, v in {**plain, **scoped}.items() if k in nb_params}


def stage_takes(nb_params: dict, method: str | None) -> set:
    """What a stage's jobs take: its notebook's parameters, and for a training notebook with an ``overrides``
    parameter every field of its arm's own config (``arms.config_fields``, TRL's options included), passed in that
    dict: a new config field reaches the command line, the grids and the notebooks with no other edit. The model's
    and the data's settings are not among them: a notebook names those that apply to its arms (a gold-labelled
    dataset takes no ``n_train``), so a plain ``--set n_train=...`` reaches those stages only."""
    if "overrides" not in nb_params or not isinstance(method, str) or _REF.match(method):
        return set(nb_params)
    from ..training.arms import DATA_PARAMS, MODEL_PARAMS, arm_of, config_fields

    try:
        arm_of(method)
    except ValueError:  # an unknown method: the job's own check says so
        return set(nb_params)
    return set(nb_params) | (set(config_fields(method)) - set(MODEL_PARAMS) - set(DATA_PARAMS))


def _stage_takes_any(stage: dict, nb_params: dict) -> set:
    """What any job of ``stage`` takes (``stage_takes`` over the methods its grid sweeps, else its one method)."""
    methods = (stage.get("grid") or {}).get("method") or [(stage.get("params") or {}).get("method", nb_params.get("method"))]
    return set().union(*(stage_takes(nb_params, m) for m in methods))


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-")


def _expand(stage: dict, defaults: dict, overrides: dict, nb_params: dict) -> list[Job]:
    grid = stage.get("grid") or {}
    keys = list(grid)
    jobs = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        # the user's plain --set replaces the grid's defaults; what a stage names in its own params is part of the
        # study's design (a smaller proxy's n_train, a reward model's backbone, "@stage" wiring) and stays, unless the
        # user names that stage ("proxy.n_train=..."); load_grid says which settings a stage kept. A stage's grid
        # axis is what it sweeps (a clash is an error). A training notebook takes its own parameters and, through its
        # ``overrides`` dict, every other field of its arm's config (``stage_takes``)
        method = dict(zip(keys, values)).get("method", (stage.get("params") or {}).get("method", nb_params.get("method")))
        takes = stage_takes(nb_params, method)
        plain = {k: v for k, v in overrides.items() if "." not in k}
        # the grid's defaults reach the parameters a notebook names; the user's --set any field the stage takes
        params = {**{k: v for k, v in defaults.items() if k in nb_params}, **{k: v for k, v in plain.items() if k in takes}}
        params.update(stage.get("params") or {})
        params.update({k: v for k, v in _user_settings(stage, overrides, takes).items() if f"{stage['stage']}.{k}" in overrides})
        params.update(dict(zip(keys, values)))
        extra = {k: params.pop(k) for k in list(params) if k not in nb_params and k in takes}
        if extra:  # config fields the notebook does not name: into its one ``overrides`` dict, checked against the schema
            params["overrides"] = {**(params.get("overrides") or {}), **extra}
        named = [k for k in keys if k not in ("method", "seed")]  # method and seed are in a run folder's name anyway
        if named and "run_name" in nb_params and "run_name" not in params:  # "beta0.05", not "default"
            params["run_name"] = "-".join(f"{k}{_slug(params[k])}" for k in named)
        jobs.append(Job(stage["stage"], NOTEBOOKS / stage["notebook"], params, bool(stage.get("always")), tuple(keys),
                        executors.resources(stage.get("resources"))))
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
    from ..modeling.runs import run_name
    from ..training.arms import method_label

    if "run_id" not in notebook_parameters(job.notebook) or "method" not in notebook_parameters(job.notebook):
        return None
    arm, cfg = job_config(job)
    return Path(root) / run_name(method_label(arm, cfg), cfg.run_name, cfg.seed, job_run_id(job))


def job_config(job: Job):
    """(arm, config) of a training notebook's job, built as the notebook builds it: the notebook's parameters with
    the job's over them, through ``arms.make_config`` (references to other stages' run folders stand as "<ref>"
    until the sweep resolves them)."""
    from ..training import arms

    merged = {**notebook_parameters(job.notebook), **job.params}
    extra = merged.pop("overrides", None) or {}
    merged = {**merged, **extra}  # the notebook passes make_config(..., **overrides)
    merged = {k: ("<ref>" if isinstance(v, str) and _REF.match(v) else v) for k, v in merged.items()}
    return arms.make_config(merged.pop("method"), **merged)


def load_grid(path, overrides: dict | None = None, seeds: list[int] | None = None) -> tuple[dict, list[Job]]:
    """(grid, jobs) from a grid file, validated; ``overrides`` (the user's ``--set``) replace the grid's ``defaults``
    for every stage whose notebook takes them; a stage that names the key in its own ``params`` keeps its value (it
    is the study's design: a smaller proxy's ``n_train``, a reward model's backbone, ``"@stage"`` wiring), and a line
    says so; ``"proxy.max_steps"`` sets that stage alone, over its own params. A key that no stage takes, a stage
    that does not exist, or a key a stage sweeps as a ``grid`` axis is an error. ``seeds`` makes every stage that is not
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
    if grid.get("executor", "serial") not in executors.EXECUTORS:
        problems.append(f"'executor' must be one of {', '.join(executors.EXECUTORS)} (got {grid['executor']!r})")
    if not isinstance(grid.get("slurm", {}), dict):
        problems.append("'slurm' must be a mapping of submitit's slurm_* parameters without the prefix, e.g. {partition: gpu}")
    jobs, seen, accepted = [], [], set()
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
        problems += executors.check_resources(stage.get("resources"), f"stages[{i}] ('{stage['stage']}')")
        nb_params = notebook_parameters(nb)
        accepted |= _stage_takes_any(stage, nb_params)
        for job in _expand(stage, grid.get("defaults") or {}, overrides or {}, nb_params):
            problems += _check_job(job, nb_params, seen)
            jobs.append(job)
        seen.append(stage["stage"])
    stages = {st.get("stage"): st for st in grid.get("stages") or [] if isinstance(st, dict)}
    for key in overrides or {}:  # a setting no stage takes would be dropped without a word
        name, _, field_ = key.rpartition(".")
        if name and name not in stages:
            problems.append(f"--set {key}: no stage '{name}' in this grid (stages: {', '.join(stages)})")
            continue
        if name:
            takes = _stage_takes_any(stages[name], notebook_parameters(NOTEBOOKS / stages[name]["notebook"]))
        else:
            takes = accepted
        if takes and field_ not in takes:
            close = difflib.get_close_matches(field_, sorted(takes), n=3)
            problems.append(f"--set {key}: no stage of this grid takes '{field_}'" if not name else
                            f"--set {key}: stage '{name}' does not take '{field_}'")
            problems[-1] += f"; did you mean {', '.join(close)}?" if close else f" (they take: {', '.join(sorted(takes))})"
        for st in ([stages[name]] if name else stages.values()):  # a grid axis is the stage's sweep: not overridden
            if field_ in (st.get("grid") or {}) and not (field_ == "seed" and seeds is not None):
                problems.append(f"--set {key}: stage '{st['stage']}' sweeps {field_} over {st['grid'][field_]}; change "
                                "its grid in the grid file instead")
    for key, value in (overrides or {}).items():  # nothing silent: where a plain --set stops
        kept = [f"{st['stage']} ({st['params'][key]!r})" for st in stages.values()
                if "." not in key and key in (st.get("params") or {}) and st["params"][key] != value]
        if kept:
            log.info(f"[sweep] --set {key}={value!r} replaces the grid's default; kept by the stage(s) that name their own: "
                     f"{', '.join(kept)} (set STAGE.{key}=... to change one)")
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


def _deps(job: Job, jobs: list[Job]) -> set[str]:
    """Ids of the jobs that must end before ``job`` may start: those its ``@stage`` references name and, for an
    ``always`` stage (an evaluation over the runs directory), every job of an earlier stage."""
    if job.always:
        stages = list(dict.fromkeys(j.stage for j in jobs))
        return {j.id for j in jobs if stages.index(j.stage) < stages.index(job.stage)}
    out = set()
    for v in job.params.values():
        m = _REF.match(v) if isinstance(v, str) else None
        if m:
            want = dict(kv.split("=", 1) for kv in m.group(2).split(",")) if m.group(2) else {}
            out |= {j.id for j in jobs if j.stage == m.group(1) and all(str(j.params.get(a)) == b for a, b in want.items())}
    return out


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
    deps = {j.id: _deps(j, jobs) for j in jobs}
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
            elif (params_why := _resolve(job, state, jobs))[1]:
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
