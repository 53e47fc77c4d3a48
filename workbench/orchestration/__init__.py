"""Orchestration: many runs, here or on a cluster.

``grid`` (grid files read and checked before anything runs: stages, jobs, their run folders), ``sweep`` (the jobs
run as papermill executions, resumable), ``executors`` (serial, local, Ray, Slurm),
``pipeline`` (the main job: the study's sweep, then the paper). The top layer below the command line
(``workbench/__main__.py``).
"""

__all__ = ["grid", "sweep", "executors", "pipeline"]
