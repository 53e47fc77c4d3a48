"""Run folders: the one contract between training, evaluation, sweeps, tables, widgets and figures.

    runs/<method>__<name>__s<seed>__<timestamp or run id>/
        config.json      everything needed to reproduce the run (seed included)
        env.json         git commit, Python and package versions, device; no secrets
        metrics.jsonl    one JSON object per logged step: {"step": ..., "<metric>": ...}
        records/*.jsonl  per-sample records (one JSON object per sample; per-token arrays as lists)
        adapter/         the LoRA adapter, when the run trained one
        checkpoints/step-<n>/adapter   the adapter part-way through training (``snapshots``), for the frontier
        notebook.ipynb   the executed notebook, when run from one
        summary.json     final metrics; written last

A run is written into ``<folder>.partial`` and renamed to its final name only when it finished, so a crash
never leaves a folder that looks complete. A failed run is renamed to ``<folder>.failed`` with the traceback in
``error.txt``. ``list_runs`` reads complete folders only. While a named run (``run_id``) is written, its process
holds a lock on ``<folder>.partial/.writer.lock`` (released when the process ends, however it ends), so a sweep that
resumes while a process from before its interruption still writes the folder waits for it instead of writing it twice
(``wait_for_writer``).

The public surface, used by every other module (none reads or writes a run folder by hand):

    writing   Run, write_json, write_jsonl, atomic_folder, to_jsonable, set_seed, environment, wait_for_writer
    reading   is_complete, run_paths (a runs root, one run folder or a list: the folders), list_runs, load_run,
              run_info (method, seed, β, reference of a run), read_eval (an evaluation folder), read_jsonl
    naming    default_root ($WORKBENCH_RUNS, else ./runs), run_name, parse_run_name
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import malloc, methods, settings


def process_rank() -> int:
    """This process's rank under torchrun / accelerate (``RANK``), 0 when alone. Only rank 0 writes the run folder."""
    return int(os.environ.get("RANK", 0))


def default_root() -> Path:
    """Where runs go unless told otherwise: $WORKBENCH_RUNS, else ./runs (read at each call, not at import)."""
    return Path(settings.get("WORKBENCH_RUNS") or "runs")


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")  # no "__" inside a part: it separates the parts
_ID_OK = re.compile(r"^[A-Za-z0-9](?:_?[A-Za-z0-9+-])*$")  # the last part: no ".", which marks .partial/.failed
_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "numpy", "pandas",
             "gguf", "plotly", "ipywidgets", "papermill", "workbench")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Called first thing in every run."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def to_jsonable(obj):
    """Config dataclasses, paths, tensors and NumPy values as plain JSON; NaN/inf become strings, not invalid JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch.Tensor, np.ndarray, NumPy scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)  # paths, dtypes, enums


def environment() -> dict:
    """What a reader needs to trust or rerun the numbers: code version, packages, hardware. No env variables
    or tokens are recorded."""
    import torch

    repo = settings.REPO

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    from .models import compute_dtype, native_bf16  # lazily: reading run folders needs no model code

    cuda = torch.cuda.is_available()
    native, hardware = native_bf16()
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        # what dtype="auto" resolves to here, and why (models.compute_dtype): the run's numbers depend on it
        "native_bf16": native,
        "hardware": hardware,
        "dtype_auto": str(compute_dtype("auto")).removeprefix("torch."),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": malloc.policy(),  # what the C allocator keeps (malloc.py); it changes speed, not results
        "variables": settings.in_effect(),  # the WORKBENCH_* environment variables set (settings.py)
    }


def run_name(method: str, name: str, seed: int, timestamp: str | None = None) -> str:
    """``<method>__<name>__s<seed>__<timestamp>``; parts are checked so the name parses back unambiguously.
    ``timestamp``: the last part, the time by default; a run id chosen by the caller (a sweep's job id) makes the
    folder's name known before the run starts."""
    for label, part in (("method", method), ("name", name)):
        if not _NAME_OK.fullmatch(part):  # fullmatch: '$' alone would accept a trailing newline
            raise ValueError(f"Run {label} '{part}' must be letters, digits, '.', '+' or '-' (no '_', no spaces).")
    if timestamp is not None and not _ID_OK.fullmatch(timestamp):
        raise ValueError(f"Run id '{timestamp}' must be letters, digits, '_', '+' or '-' (no '.', no '__').")
    timestamp = timestamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return f"{method}__{name}__s{int(seed)}__{timestamp}"


def parse_run_name(folder: str) -> dict:
    method, name, seed, timestamp = folder.split("__")
    return {"method": method, "name": name, "seed": int(seed.removeprefix("s")), "timestamp": timestamp}


class Run:
    """A run folder being written. Use as a context manager::

        with Run("dpo", "beta0.1", seed=0, config=cfg) as run:
            run.log({"loss": 0.69}, step=0)
            run.write_records("pairs", records)
        print(run.path)   # the final folder, after a clean exit

    ``config`` (a dataclass or dict) and ``env.json`` are written at once; the seed is set on entry.

    ``run_id`` names the folder instead of the time (a sweep passes its job id), so the one folder a job may write
    is known in advance: a complete one is never written again (an error: adopt it), and the ``.partial`` or
    ``.failed`` leftovers of an earlier attempt under that id are removed when the run starts again.

    With ``resume`` (and a ``run_id``), a ``.partial`` folder left by a killed attempt is kept, for the trainer to
    resume from its last checkpoint (``train.train`` with ``checkpoint_every``).

    Under several processes (torchrun) only rank 0 writes the run folder; the other ranks write into a scratch
    folder of their own that is removed when the run ends, so the training code is the same on every rank.
    """

    def __init__(self, method: str, name: str, seed: int, config, root: str | Path | None = None,
                 run_id: str | None = None, resume: bool = False):
        self.seed = int(seed)
        self.folder = run_name(method, name, self.seed, run_id)
        self.run_id, self.resume = run_id, resume
        self.root = Path(root) if root is not None else default_root()
        self.scratch = None
        if process_rank() > 0:  # not the writer: a private scratch root, removed at the end
            import tempfile

            self.scratch = self.root = Path(tempfile.mkdtemp(prefix=f"workbench-rank{process_rank()}-"))
        self.final_path = self.root / self.folder
        self.partial_path = self.root / (self.folder + ".partial")
        self.failed_path = self.root / (self.folder + ".failed")
        self._path = self.partial_path
        self.config = to_jsonable(config)
        if "seed" in self.config and self.config["seed"] != self.seed:
            # config.json, the folder name and list_runs must agree on the one seed that was set
            raise ValueError(f"config seed {self.config['seed']!r} differs from the run seed {self.seed}; pass the same seed.")
        self.summary: dict = {}
        self._metrics = None
        self.trackers = None  # experiment trackers fed every log (``trackers.Trackers``; set by ``train.train``)

    @property
    def path(self) -> Path:
        """Where the run is now: ``.partial`` while open, the final folder after a clean exit, ``.failed`` after an error."""
        return self._path

    def __enter__(self) -> "Run":
        self._lock = None
        if self.run_id is not None:
            if is_complete(self.final_path):
                raise FileExistsError(f"{self.final_path} is already complete: run id '{self.run_id}' is taken. "
                                      "Use that run, or give another run_id.")
            if (pid := _writer(self.partial_path)) is not None:
                raise RuntimeError(f"{self.partial_path} is being written by another process (pid {pid}): a run id is "
                                   "written by one process at a time. Wait for it to end (or stop it), or give "
                                   "another run_id.")
            keep = self.resume and self.partial_path.is_dir()  # a killed attempt to resume from its checkpoint
            for stale in (self.failed_path, self.final_path) if keep else (self.partial_path, self.failed_path,
                                                                           self.final_path):
                shutil.rmtree(stale, ignore_errors=True)  # an earlier attempt's leftovers
        set_seed(self.seed)
        self.partial_path.mkdir(parents=True, exist_ok=self.run_id is not None and self.resume)
        if self.run_id is not None and self.scratch is None:
            self._lock = _hold_writer_lock(self.partial_path)
        config = {"seed": self.seed, **self.config}
        write_json(self.partial_path / "config.json", config)
        write_json(self.partial_path / "env.json", environment())
        self._metrics = open(self.partial_path / "metrics.jsonl", "a", encoding="utf-8")
        return self

    def drop_metrics_after(self, step: int) -> None:
        """Forget metrics.jsonl lines after ``step`` (a resumed run logs them again from its checkpoint)."""
        self._metrics.close()
        path = self.partial_path / "metrics.jsonl"
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        write_jsonl(path, kept)
        self._metrics = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        """Append one line to metrics.jsonl (flushed, so a crash keeps what was logged), and hand it to the run's
        experiment trackers, if any."""
        self._metrics.write(json.dumps(to_jsonable({"step": step, **metrics})) + "\n")
        self._metrics.flush()
        if self.trackers is not None:
            self.trackers.log(to_jsonable(metrics), step)

    def write_records(self, name: str, records: list[dict]) -> Path:
        """Per-sample records as ``records/<name>.jsonl``; one JSON object per sample."""
        out = self.partial_path / "records" / f"{name}.jsonl"
        out.parent.mkdir(exist_ok=True)
        write_jsonl(out, records)
        return out

    def save_snapshot(self, model, step: int) -> Path:
        """A policy's adapter "default" part-way through training, as ``checkpoints/step-<step>/adapter``."""
        out = self.partial_path / "checkpoints" / f"step-{int(step)}" / "adapter"
        model.save_pretrained(out, selected_adapters=["default"])
        return out

    def write_json(self, name: str, obj) -> Path:
        out = self.partial_path / name
        write_json(out, obj)
        return out

    def __exit__(self, exc_type, exc, tb):
        self._metrics.close()
        if self.trackers is not None:  # their files (TensorBoard's events) are inside the folder about to be renamed
            self.trackers.close()
        if self.scratch is not None:  # another rank's copy: nothing to keep
            shutil.rmtree(self.scratch, ignore_errors=True)
            return False
        if exc_type is None:
            write_json(self.partial_path / "summary.json", self.summary)
            if self._lock is not None:
                (self.partial_path / _WRITER_LOCK).unlink()
            self.partial_path.rename(self.final_path)
            self._path = self.final_path
        else:
            (self.partial_path / "error.txt").write_text("".join(traceback.format_exception(exc_type, exc, tb)))
            self.partial_path.rename(self.failed_path)
            self._path = self.failed_path
        if self._lock is not None:  # released only now: a waiter finds the folder complete (or failed), never partial
            self._lock.close()
        return False  # an error is re-raised


_WRITER_LOCK = ".writer.lock"


def _hold_writer_lock(partial: Path):
    """Lock ``<partial>/.writer.lock`` for this process (its pid inside, for the message another process gives) and
    return the open file: the lock lasts while it is open and ends with the process, however it ends."""
    f = open(partial / _WRITER_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 -- held until the run ends
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _writer(partial: Path) -> str | None:
    """The pid of a living process that is writing the run folder ``partial`` (it holds its lock), else None."""
    try:
        with open(Path(partial) / _WRITER_LOCK, encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "?"
            return None
    except FileNotFoundError:
        return None


def wait_for_writer(folder, say=None) -> bool:
    """Wait until no process writes the run ``folder`` (given by its final name; its ``.partial`` holds the lock):
    e.g. a notebook's kernel that outlived the sweep that started it. ``say(pid)`` is called once if there is one.
    True if it waited."""
    partial = Path(folder).with_name(Path(folder).name + ".partial")
    if (pid := _writer(partial)) is None:
        return False
    if say is not None:
        say(pid)
    try:
        with open(partial / _WRITER_LOCK, encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # blocks until the writer's lock is released: its run ended, or it died
    except FileNotFoundError:  # it finished between the two looks
        pass
    return True


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (NaN/inf as strings, like every JSON the workbench writes)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(to_jsonable(r)) + "\n")


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (``to_jsonable``), atomically: written beside ``path`` and renamed over it, so a reader or a
    crash never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def atomic_folder(out: Path):
    """Write a folder atomically: yields ``<out>.partial`` (emptied first); on a clean exit it replaces ``out``, on
    an error it is left as it is for a look and ``out`` is untouched."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


# ----------------------------------------------------------------------------------------------------------
# Reading runs


def is_complete(p) -> bool:
    """Is ``p`` a finished run folder: a parsable name without .partial/.failed, and its summary.json written."""
    p = Path(p)
    return p.is_dir() and p.name.count("__") == 3 and "." not in p.name.rsplit("__", 1)[1] and (p / "summary.json").exists()


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist); a bad line is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); the file is corrupt or was edited by hand.") from None
    return rows


def run_paths(runs=None) -> list[Path]:
    """The run folders named by ``runs``: a runs root (its complete runs, sorted), one run folder, or a list of run
    folders (kept in order); None is the default root. Every function that takes a set of runs reads it here."""
    if runs is None or isinstance(runs, (str, os.PathLike)):
        root = Path(runs) if runs is not None else default_root()
        if (root / "config.json").exists():
            return [root]
        return sorted(p for p in root.iterdir() if is_complete(p)) if root.is_dir() else []
    return [Path(p) for p in runs]


def list_runs(root=None) -> pd.DataFrame:
    """One row per complete run under ``root`` (or per folder of a list, see ``run_paths``): method, name, seed,
    timestamp, path, the config (flattened as ``config.<key>``) and the summary metrics. Partial and failed runs
    are not listed."""
    rows = []
    for p in run_paths(root):
        if not is_complete(p):
            continue
        row = {**parse_run_name(p.name), "path": str(p)}
        config = json.loads((p / "config.json").read_text())
        row.update({f"config.{k}": v for k, v in pd.json_normalize(config, sep=".").iloc[0].items()})
        row.update(json.loads((p / "summary.json").read_text()))
        rows.append(row)
    cols = ["method", "name", "seed", "timestamp", "path"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)


@dataclasses.dataclass
class LoadedRun:
    path: Path
    config: dict
    env: dict
    summary: dict
    metrics: pd.DataFrame

    def records(self, name: str) -> pd.DataFrame:
        """``records/<name>.jsonl`` as a DataFrame."""
        path = self.path / "records" / f"{name}.jsonl"
        if not path.exists():
            have = sorted(x.stem for x in (self.path / "records").glob("*.jsonl"))
            raise FileNotFoundError(f"{path} does not exist; this run has records: {have or 'none'}.")
        return pd.DataFrame(read_jsonl(path))


def load_run(path: str | Path) -> LoadedRun:
    """Read a complete run folder."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete run folder (missing summary.json, or a .partial/.failed folder).")
    return LoadedRun(
        path=path,
        config=json.loads((path / "config.json").read_text()),
        env=json.loads((path / "env.json").read_text()),
        summary=json.loads((path / "summary.json").read_text()),
        metrics=pd.DataFrame(read_jsonl(path / "metrics.jsonl")),
    )


def run_info(run_path) -> dict:
    """What an evaluation or a table needs to know of a run: method, seed, β, the config, its reference."""
    run_path = Path(run_path)
    saved = json.loads((run_path / "config.json").read_text())
    method = parse_run_name(run_path.name)["method"]
    facts = methods.of(method)
    # the arm's own β (KL coefficient, IPO's τ, ORPO's λ, ...); SFT and reward models have none (TRL's SFTConfig
    # carries an unused beta)
    beta = saved.get("kl_coef", saved.get("beta")) if facts.has_beta else None
    return {"method": method, "seed": saved.get("seed"), "beta": beta, "config": saved,
            "reference": saved.get("sft_run") or "base", "is_reward_model": facts.role == "reward-model",
            # a run folder that holds a dataset (gold-pairs writes pairs.jsonl), not a model: nothing to evaluate
            "is_dataset": (run_path / "pairs.jsonl").is_file()}


def snapshots(run_path) -> list[tuple[int, Path]]:
    """[(step, adapter folder)] of a run's snapshots (``Run.save_snapshot``), by step."""
    found = [(int(p.name.split("-")[1]), p / "adapter") for p in (Path(run_path) / "checkpoints").glob("step-*")
             if (p / "adapter").is_dir()]
    return sorted(found)


def read_eval(run_path, name: str = "default") -> dict:
    """An evaluation folder ``<run>/eval/<name>/`` as {"config", "summary", "generations", "pairs"} (lists of dicts)."""
    out = Path(run_path) / "eval" / name
    if not (out / "summary.json").exists():
        raise FileNotFoundError(f"{out} is not a complete evaluation; run evaluate.evaluate_run({str(run_path)!r}) first.")
    return {"config": json.loads((out / "config.json").read_text()),
            "summary": json.loads((out / "summary.json").read_text()),
            "generations": read_jsonl(out / "generations.jsonl"), "pairs": read_jsonl(out / "pairs.jsonl")}
