"""Experiment trackers for every arm: ``report_to`` (``tensorboard``, ``wandb``, ``trackio``, ``mlflow``, ... or a
list of them, as ``transformers`` accepts it) drives transformers' own reporting integrations from the run's log
(``runs.Run.log``), so PPO and online DPO report exactly as TRL's arms do, under the same metric names
(``objective/kl``, ``rewards/margins``, ...; transformers' TensorBoard writer files them under ``train/``).

TRL's trainers are built with ``report_to="none"`` and their logs reach the trackers through the run (one path for
every arm; no tracker twice). TensorBoard's event files go into the run folder (``<run>/logs/tensorboard``), kept
with the run; so do wandb's (``<run>/logs/wandb``, unless ``WANDB_DIR`` says otherwise; ``WANDB_MODE=offline`` keeps
the run there for ``wandb sync``), its run finished before the folder is renamed. The tracker's run name is the run
folder's name (method, run name, seed, id).
"""

from __future__ import annotations

import os
from pathlib import Path


def names(report_to) -> list[str]:
    """``report_to`` as a list of integrations: None and "none" mean none; a string may list several with commas."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    return [x.strip() for item in items for x in str(item).split(",") if x.strip() and x.strip() != "none"]


def check(report_to) -> None:
    """Fail before training when a tracker is unknown to transformers or its package is missing."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names(report_to):
        if name == "all":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"report_to: {name!r} is not a tracker transformers knows "
                             f"({', '.join(sorted(INTEGRATION_TO_CALLBACK))}).")


class Trackers:
    """transformers' reporting callbacks for ``report_to``, fed one log at a time (``log``) and closed once."""

    def __init__(self, report_to, log_dir: Path, run_name: str):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks

        check(report_to)
        wanted = names(report_to)
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(wanted if wanted != ["all"] else "all")]
        for cb in self.callbacks:
            if isinstance(cb, TensorBoardCallback):  # into the run folder, kept with it
                cb.logging_dir = str(Path(log_dir) / "tensorboard")
        self.args = TrainingArguments(output_dir=str(log_dir), run_name=run_name, report_to="none")
        self.state, self.control = TrainerState(), TrainerControl()
        self.started = False
        # wandb's files into the run folder too, unless the user's WANDB_DIR says where: wandb reads the variable when
        # its run starts (transformers passes it no dir); set for the trackers' life only, then restored
        self.wandb = "wandb" in wanted or wanted == ["all"]
        self._wandb_dir = os.environ.get("WANDB_DIR")
        if self.wandb and self._wandb_dir is None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            os.environ["WANDB_DIR"] = str(log_dir)

    def log(self, metrics: dict, step: int) -> None:
        self.state.global_step = int(step)
        if not self.started:
            for cb in self.callbacks:
                cb.on_train_begin(self.args, self.state, self.control)
            self.started = True
        logs = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        for cb in self.callbacks:
            cb.on_log(self.args, self.state, self.control, logs=logs)

    def close(self) -> None:
        """End every tracker's run: its files are complete before the run folder is renamed (transformers' wandb
        callback leaves its run open, so it is finished here)."""
        if self.started:
            for cb in self.callbacks:
                cb.on_train_end(self.args, self.state, self.control)
            if self.wandb:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
        self.started = False
        if self.wandb and self._wandb_dir is None:
            os.environ.pop("WANDB_DIR", None)
