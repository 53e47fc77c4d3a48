"""Orchestration: many runs, here or on a cluster.

``sweep`` (grid files into papermill executions, validated, resumable), ``executors`` (serial, local, Ray, Slurm),
``pipeline`` (the main job: the study's sweep, then the paper). The top layer below the command line
(``workbench/__main__.py``).
"""

__all__ = ["sweep", "executors", "pipeline"]
