"""Where a sweep's jobs run: in this process one after another (``serial``), side by side as processes of this
machine (``local``), as Ray tasks (``ray``), or as Slurm jobs through submitit (``slurm``). The sweep
(``workbench.orchestration.sweep``) decides *what* runs and when a job may start; an executor only runs the job it is given and
reports how it ended.

A job travels as a plain dict (a *task*: its notebook, parameters, executed-notebook path, run folder and state
file), and runs through ``run_job`` wherever it lands: it writes its own state file (``running``, then ``done`` or
``failed``) atomically, so parallel workers never write the same file and a sweep killed while a job finishes still
finds the job's end on disk.

Resources are declared per stage in the grid (``resources: {cpus: 4, gpus: 1, mem_gb: 32, time_min: 240}``):

- **serial** ignores them (one job at a time, in this process: what CI's main path uses);
- **local** starts as many jobs at once as this machine's cores (and GPUs) hold by their ``cpus`` (and ``gpus``),
  each in its own process; the job's kernel gets ``OMP_NUM_THREADS`` = its ``cpus`` and, when it declares GPUs, its own
  ``CUDA_VISIBLE_DEVICES`` (a job that declares none sees the machine's, as under serial). No servers, nothing beyond
  the standard library: the main job's executor on one machine. A job's process ends when the sweep's does (on
  Linux even when the sweep is killed), so a resumed sweep never finds one still running;
- **ray** gives each job a task with ``num_cpus``/``num_gpus``/``memory``; Ray sets ``CUDA_VISIBLE_DEVICES`` per task
  and the notebook's kernel inherits it, so jobs on one node use distinct GPUs. Without an address a local Ray
  starts with this machine's CPUs and CUDA GPUs (dashboard off; note that Ray 2.58's own servers still listen on
  every interface: ``_node_ip_address="127.0.0.1"`` is resolved back to the machine's address); ``address`` joins a
  running cluster; a Ray already initialised in this process (e.g. with fake GPUs in a test) is used as it is. Tasks are never retried by Ray: a job that
  dies is recorded as failed, like any other failure, and is run again on resume.
- **slurm** submits one sbatch job per sweep job with ``cpus_per_task``, ``gpus_per_node``, ``mem_gb`` and
  ``timeout_min`` from the resources, plus the grid's ``slurm`` mapping (e.g. ``{partition: gpu, account: lab}``,
  submitit's ``slurm_*`` parameters without the prefix). A job still queued or running when the sweep is killed is
  found again on resume (its Slurm job id is in its state file) and waited for, never submitted twice.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from ..modeling.runs import is_complete, write_json

EXECUTORS = ("serial", "local", "ray", "slurm")
RESOURCE_KEYS = {"cpus": 1, "gpus": 0, "mem_gb": None, "time_min": 24 * 60}  # and their defaults


def resources(declared: dict | None) -> dict:
    """A stage's resources with the defaults filled in (one CPU, no GPU, no memory limit, one day)."""
    return {**RESOURCE_KEYS, **(declared or {})}


def check_resources(declared, where: str) -> list[str]:
    """Problems of a stage's ``resources`` mapping."""
    if declared is None:
        return []
    if not isinstance(declared, dict):
        return [f"{where}: resources must be a mapping like {{cpus: 4, gpus: 1}}"]
    problems = [f"{where}: unknown resource '{k}' (known: {', '.join(RESOURCE_KEYS)})" for k in declared
                if k not in RESOURCE_KEYS]
    for k, v in declared.items():
        if k in RESOURCE_KEYS and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            problems.append(f"{where}: resources.{k}={v!r} must be a number >= 0")
    if isinstance(declared.get("cpus"), (int, float)) and declared["cpus"] <= 0:
        problems.append(f"{where}: resources.cpus must be > 0")
    return problems


def _ipc_kernel_manager(folder: str, stderr_log: str | None = None):
    """The kernel manager a job's notebook runs under: its kernel talks to this process over Unix-domain sockets in
    ``folder`` (``transport="ipc"``) instead of unencrypted TCP on localhost, which ipykernel warns about at every
    start (one warning per job on the console). The kernel process's own stderr (ipykernel's log, e.g. "KeyboardInterrupt
    caught in kernel" when it is stopped, native libraries' messages) goes to ``stderr_log``, not the sweep's console;
    what the notebook's code writes goes to the notebook as always, and its progress lines (``console.progress``) to stdout."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(folder, "k")

        async def _async_start_kernel(self, **kw):
            if stderr_log is not None and "stderr" not in kw:
                kw["stderr"] = open(stderr_log, "ab")  # noqa: SIM115 -- the kernel process holds it; closed with it
            return await super()._async_start_kernel(**kw)

        start_kernel = _async_start_kernel

    return IPCKernelManager


def run_job(task: dict) -> dict:
    """Execute one job's notebook with papermill and return its state entry (also written to ``task["state_file"]``:
    ``running`` when it starts, ``done`` or ``failed`` when it ends). Every exception of the job is its failure."""
    import papermill as pm

    entry = {"status": "running", "label": task["label"], "notebook": task["out_nb"],
             "host": socket.gethostname(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time()}
    write_json(Path(task["state_file"]), entry)
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="wb-kernel-") as sockets:
            pm.execute_notebook(task["notebook"], task["out_nb"], parameters=task["params"],
                                kernel_name=task["kernel_name"], progress_bar=False, cwd=task["cwd"],
                                kernel_manager_class=_ipc_kernel_manager(sockets, str(task["state_file"]) + ".stderr"))
    except Exception as e:  # noqa: BLE001 -- a failing notebook, a dead kernel: the job failed, the sweep goes on
        err = (f"{e.ename}: {e.evalue}" if isinstance(e, pm.PapermillExecutionError) else f"{type(e).__name__}: {e}")
        if not isinstance(e, pm.PapermillExecutionError):  # a dead kernel: what it wrote last, and where
            err += f" (the kernel's stderr: {task['state_file']}.stderr; out of memory kills a kernel without a word)"
        entry.update(status="failed", error=err.strip()[:500])
    else:
        run = task["folder"] if task["folder"] and is_complete(task["folder"]) else None
        if run:
            shutil.copy(task["out_nb"], Path(run) / "notebook.ipynb")
        entry.update(status="done", run=run)
    entry.update(seconds=round(time.time() - t0, 1), ended=time.time())
    write_json(Path(task["state_file"]), entry)
    return entry


def _failed(task: dict, err: str) -> dict:
    """The state entry of a job whose worker died before it could write its own end."""
    entry = {"status": "failed", "label": task["label"], "notebook": task["out_nb"],
             "error": err.strip()[:500], "ended": time.time()}
    write_json(Path(task["state_file"]), entry)
    return entry


class Serial:
    """One job at a time, in this process (papermill starts the kernel here)."""

    name = "serial"

    def __init__(self):
        self._queue = {}

    def check(self, needs: list[tuple[str, dict]]) -> None:
        pass

    def has_room(self, running: dict, res: dict) -> bool:
        return not running

    def submit(self, task: dict, res: dict):
        key = task["id"]
        self._queue[key] = task
        return key

    def reattach(self, entry: dict, task: dict):
        return None

    def wait(self, running: dict, timeout: float) -> list:
        key = next(iter(running))
        return [(key, run_job(self._queue.pop(key)))]

    def close(self) -> None:
        pass


class Local:
    """Jobs side by side, each in a process of this machine, packed by their ``cpus`` and ``gpus`` into what the
    machine has (``cpus``, ``gpus``: what to use instead; ``gpus`` also fakes devices for tests, as Ray can)."""

    name = "local"

    def __init__(self, cpus: float | None = None, gpus: int | None = None):
        import multiprocessing

        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        self.cpus, self.gpus = cpus or os.cpu_count() or 1, list(range(gpus))
        self._spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from a notebook
        self._jobs = {}  # process -> (task, resources, GPU indices)

    def check(self, needs: list[tuple[str, dict]]) -> None:
        """Refuse, before anything runs, jobs this machine can never hold."""
        bad = [f"{label} (cpus {r['cpus']}, gpus {r['gpus']})" for label, r in needs
               if r["cpus"] > self.cpus or r["gpus"] > len(self.gpus)]
        if bad:
            raise ValueError(f"{len(bad)} job(s) need more than this machine has ({self.cpus:g} CPUs, {len(self.gpus)} "
                             f"GPUs): {'; '.join(bad[:5])}. Lower the stage's resources in the grid, or use --executor "
                             "ray or slurm.")

    def _free_gpus(self) -> list[int]:
        taken = {i for _, _, devices in self._jobs.values() for i in devices}
        return [i for i in self.gpus if i not in taken]

    def has_room(self, running: dict, res: dict) -> bool:
        used = sum(r["cpus"] for _, r, _ in self._jobs.values())
        return used + res["cpus"] <= self.cpus and res["gpus"] <= len(self._free_gpus())

    def submit(self, task: dict, res: dict):
        devices = self._free_gpus()[: int(res["gpus"])]
        threads = str(max(1, int(res["cpus"])))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        proc = self._spawn.Process(target=_run_local, args=(task, env, os.getpid()), name=task["label"][:100], daemon=True)
        proc.start()
        self._jobs[proc] = (task, res, devices)
        return proc

    def reattach(self, entry: dict, task: dict):
        return None  # a job's process ends with the sweep that started it (_run_local), so nothing is left to wait for

    def wait(self, running: dict, timeout: float) -> list:
        from multiprocessing.connection import wait

        wait([p.sentinel for p in running], timeout)
        out = []
        for proc in [p for p in running if not p.is_alive()]:
            proc.join()
            task, _, _ = self._jobs.pop(proc)
            entry = json.loads(Path(task["state_file"]).read_text())
            if entry.get("status") not in ("done", "failed"):  # the process died before the job could record its end
                entry = _failed(task, f"the job's process ended with exit code {proc.exitcode} before the job ended")
            out.append((proc, entry))
        return out

    def close(self) -> None:
        for proc in self._jobs:
            proc.terminate()
            proc.join(10)
        self._jobs.clear()


def _run_local(task: dict, env: dict, parent: int) -> None:
    """A local job's process: ends with the sweep (Linux: the kernel sends SIGTERM when the sweep's process dies, and
    the notebook's kernel follows its own parent), takes its threads and devices, runs the job."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: the job outlives a killed sweep, and resume runs it again
        pass
    if os.getppid() != parent:  # the sweep died before the line above
        return
    os.environ.update(env)
    run_job(task)


class Ray:
    """Each job a Ray task with its stage's resources; Ray queues what does not fit and starts it when it does."""

    name = "ray"

    def __init__(self, address: str | None = None):
        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                import torch

                ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
                         log_to_driver=False)
            self.started = True
        self.remote = ray.remote(max_retries=0)(run_job)
        self._tasks = {}

    def check(self, needs: list[tuple[str, dict]]) -> None:
        """Refuse, before anything runs, jobs no node of the cluster can ever hold (Ray would wait for them forever)."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        bad = [f"{label} (cpus {r['cpus']}, gpus {r['gpus']})" for label, r in needs
               if not any(n.get("CPU", 0) >= r["cpus"] and n.get("GPU", 0) >= r["gpus"] for n in nodes)]
        if bad:
            have = ", ".join(f"{n.get('CPU', 0):g} CPUs / {n.get('GPU', 0):g} GPUs" for n in nodes)
            raise ValueError(f"{len(bad)} job(s) need more than any Ray node has ({have}): {'; '.join(bad[:5])}. "
                             "Lower the stage's resources in the grid, or join a larger cluster with --address.")

    def has_room(self, running: dict, res: dict) -> bool:
        return True

    def submit(self, task: dict, res: dict):
        opts = {"num_cpus": res["cpus"], "num_gpus": res["gpus"], "name": task["label"][:100]}
        if res["mem_gb"]:
            opts["memory"] = int(res["mem_gb"] * 2**30)
        ref = self.remote.options(**opts).remote(task)
        self._tasks[ref] = task
        return ref

    def reattach(self, entry: dict, task: dict):
        return None  # a killed driver's tasks die with it (Ray ends a job's tasks when its driver exits)

    def wait(self, running: dict, timeout: float) -> list:
        ready, _ = self.ray.wait(list(running), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(running), num_returns=len(running), timeout=0)
        out = []
        for ref in ready:
            task = self._tasks.pop(ref)
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as e:  # noqa: BLE001 -- the worker died (out of memory, killed): the job failed
                out.append((ref, _failed(task, f"{type(e).__name__}: {e}")))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class Slurm:
    """Each job one sbatch job through submitit. ``cluster="local"`` runs them as local processes with submitit's
    ``LocalExecutor`` (for tests: it gives every job the same GPUs, so it is no GPU scheduler)."""

    name = "slurm"

    def __init__(self, folder: Path, params: dict | None = None, cluster: str | None = None):
        import submitit

        if cluster is None and not shutil.which("sbatch"):
            raise ValueError("--executor slurm: there is no `sbatch` on this machine; run the sweep from a Slurm "
                             "login node (or use --executor ray or serial here).")
        self.submitit = submitit
        self.folder = Path(folder)
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=cluster or "slurm")
        self.params = dict(params or {})
        self._tasks = {}

    def check(self, needs: list[tuple[str, dict]]) -> None:
        pass

    def has_room(self, running: dict, res: dict) -> bool:
        return True

    def submit(self, task: dict, res: dict):
        extra = {f"slurm_{k}": v for k, v in self.params.items()} if self.executor.cluster == "slurm" else {}
        kw = {"cpus_per_task": int(res["cpus"]), "timeout_min": int(res["time_min"]), "name": task["id"], **extra}
        if res["gpus"]:
            kw["gpus_per_node"] = int(res["gpus"])
        if res["mem_gb"]:
            kw["mem_gb"] = res["mem_gb"]
        self.executor.update_parameters(**kw)
        job = self.executor.submit(run_job, task)
        Path(task["state_file"]).with_suffix(".slurm").write_text(str(job.job_id))  # found again on resume
        self._tasks[job] = task
        return job

    def reattach(self, entry: dict, task: dict):
        """The Slurm job of an earlier sweep, if it is still queued or running (then it is waited for, not resubmitted)."""
        submitted = Path(task["state_file"]).with_suffix(".slurm")
        if entry.get("status") not in ("queued", "running") or not submitted.exists() or self.executor.cluster != "slurm":
            return None
        job = self.submitit.SlurmJob(self.folder / "%j", submitted.read_text().strip())
        if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
            self._tasks[job] = task
            return job
        return None

    def wait(self, running: dict, timeout: float) -> list:
        deadline = time.time() + timeout
        while True:
            ready = [job for job in running if job.done()]
            if ready or time.time() > deadline:
                break
            time.sleep(1.0)
        out = []
        for job in ready:
            task = self._tasks.pop(job)
            try:
                out.append((job, job.result()))
            except Exception as e:  # noqa: BLE001 -- timed out, cancelled, node failure: the job failed
                out.append((job, _failed(task, f"{type(e).__name__}: {e}")))
        return out

    def close(self) -> None:
        pass


def make(kind: str, state_dir: Path, address: str | None = None, slurm: dict | None = None,
         slurm_cluster: str | None = None):
    if kind == "serial":
        return Serial()
    if kind == "local":
        return Local()
    if kind == "ray":
        return Ray(address)
    if kind == "slurm":
        return Slurm(Path(state_dir) / "slurm", slurm, slurm_cluster)
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)} (got {kind!r})")
