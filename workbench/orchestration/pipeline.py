"""The main job, ``python -m workbench main``: the whole study on the embedded default.

``run_study``: the sweep of ``grids/main.yaml`` (data → SFT → proxy and gold reward models → PPO → DPO, IPO, KTO →
evaluation of every run → figures), then the paper draft filled from the results table; it prints where
everything is.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core import console, settings

log = console.logger(__name__)


MAIN_GRID = settings.REPO / "grids" / "main.yaml"


def run_study(grid: str | Path = MAIN_GRID, runs_dir: str | None = None, figures_dir: str = "figures",
              paper_path: str = "papers/draft.md", seeds: list[int] | None = None, overrides: dict | None = None,
              executor: str | None = None):
    """Run (or resume) the study's sweep, then fill the paper draft; returns the sweep's result. ``seeds``: the
    same study once per seed (the grid's own seed otherwise); the table and figures then show intervals across
    seeds. ``overrides`` replace the grid's defaults (``sweep.run_sweep``); ``figures_dir`` is one of them, so the
    evaluate stage exports the figures where the draft links them. ``executor``: where the jobs run (default: the
    grid's; ``sweep.run_sweep``)."""
    from ..reporting import paper
    from .sweep import run_sweep

    t0 = time.time()
    result = run_sweep(grid, overrides={**(overrides or {}), "figures_dir": str(figures_dir)}, runs_dir=runs_dir,
                       seeds=seeds, executor=executor)
    if result.table is None or result.table.empty:
        raise RuntimeError(f"The study produced no evaluated runs; see the job states in {result.state_dir}/jobs/.\n{result.report()}")
    draft = paper.build(result.table, paper_path, figures_dir)
    _step("done. Where everything is:", t0)
    log.info(f"    run folders      {result.state_dir.parent.parent}\n"
             f"    executed notebooks in each run folder (notebook.ipynb) and {result.state_dir / 'notebooks'}\n"
             f"    results table    {len(result.table)} runs (python -m workbench evaluate {result.state_dir.parent.parent} "
             f"reprints it)\n    figures          {Path(figures_dir).resolve()}\n    paper draft      {Path(draft).resolve()}")
    if result.failed:
        log.info(f"    {len(result.failed)} job(s) FAILED; see above")
    return result


def _step(msg: str, t0: float) -> None:
    log.info(f"[main {time.time() - t0:6.1f}s] {msg}")
