"""Grid files: a sweep's stages and their jobs, read and checked before anything runs (``load_grid``).

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

A job's run folder is named from its config and its job id (``job_run_id``, ``job_folder``), known before it runs;
``resolve_refs`` and ``job_deps`` read its ``@stage`` references. ``sweep.py`` runs the jobs.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core import console, settings
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


def _referenced(ref: re.Match, jobs: list[Job]) -> list[Job]:
    """The jobs an "@stage[k=v,...]" reference names: that stage's, with those parameters."""
    want = dict(kv.split("=", 1) for kv in ref.group(2).split(",")) if ref.group(2) else {}
    return [j for j in jobs if j.stage == ref.group(1) and all(str(j.params.get(a)) == b for a, b in want.items())]


def resolve_refs(job: Job, state: dict, jobs: list[Job]) -> tuple[dict, str | None]:
    """Job parameters with "@stage[k=v,...]" replaced by that stage's run folder (from the sweep's ``state``);
    (params, why not) if impossible."""
    out = {}
    for k, v in job.params.items():
        m = _REF.match(v) if isinstance(v, str) else None
        if not m:
            out[k] = v
            continue
        cands = _referenced(m, jobs)
        if len(cands) > 1:
            cands = [j for j in cands if j.params.get("seed") == job.params.get("seed")]
        if len(cands) != 1:
            return {}, f"{k}={v} matches {len(cands)} jobs; narrow it with [key=value]"
        entry = state.get(cands[0].id, {})
        if entry.get("status") != "done" or not entry.get("run"):
            return {}, f"needs {cands[0].label}, which has not finished ({entry.get('status', 'not run')})"
        out[k] = entry["run"]
    return out, None


def job_deps(job: Job, jobs: list[Job]) -> set[str]:
    """Ids of the jobs that must end before ``job`` may start: those its ``@stage`` references name and, for an
    ``always`` stage (an evaluation over the runs directory), every job of an earlier stage."""
    if job.always:
        stages = list(dict.fromkeys(j.stage for j in jobs))
        return {j.id for j in jobs if stages.index(j.stage) < stages.index(job.stage)}
    out = set()
    for v in job.params.values():
        m = _REF.match(v) if isinstance(v, str) else None
        if m:
            out |= {j.id for j in _referenced(m, jobs)}
    return out
