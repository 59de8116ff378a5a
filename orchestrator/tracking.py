"""Experiment tracking: a W&B tracker on rank 0 and a null tracker with the same methods elsewhere.

The W&B key, if any, comes from WANDB_API_KEY in the environment; configs logged here never hold
secrets (they are built from conf/, which holds none). Runs are always finished in `finally`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from orchestrator.config.schema import TrackingConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    run_id: str | None
    run_dir: str | None

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Does nothing; what non-zero ranks (and tracking=none) get."""

    run_id = None
    run_dir = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """One W&B run per job; `run_id` is stable so a resumed job continues the same run."""

    def __init__(self, cfg: TrackingConfig, *, run_id: str, name: str, group: str, job_type: str,
                 config: dict, root_dir: str):
        import wandb  # (slow to import; only rank 0 of a tracked run needs it)

        directory = cfg.dir or root_dir
        os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            dir=directory,
            id=run_id,
            name=name,
            group=group,
            job_type=job_type,
            tags=list(cfg.tags),
            config=config,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.run_id = self._run.id
        self.run_dir = os.path.dirname(self._run.dir)  # .../wandb/offline-run-<time>-<id>

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self._run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)


def make_tracker(cfg: TrackingConfig, rank: int, **kwargs) -> Tracker:
    if rank != 0 or cfg.backend == "none" or cfg.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, **kwargs)
