"""Measurement: what a trained run is worth, from run folders only.

``evaluate`` (one evaluation protocol for every arm: ``EvalConfig``, ``evaluate_run``, ``evaluate_runs``), ``results``
(the results table and its aggregates across seeds), ``findings`` (the draft's tables and findings, every sentence a
number with its interval). Imports ``core``, ``modeling`` and ``training``; nothing below imports it.
"""

__all__ = ["plan", "measure", "evaluate", "results", "findings"]
