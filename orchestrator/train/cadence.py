"""When the training loop checkpoints, and what each save's blocking time does to the schedule.

Wraps a CheckpointSchedule (every N steps, every T seconds, or Young/Daly) with the bookkeeping
around it: the time since the last save, the blocking times measured, the step last saved, and the
saves at a requested stop and at the end of training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable

from orchestrator.config.interval import CheckpointSchedule, parse_interval
from orchestrator.config.schema import CheckpointConfig

log = logging.getLogger("orchestrator.train")


class CheckpointCadence:
    """Decides when to save and saves through `ckpt` (a Checkpointer); `state` is a TrainerState."""

    def __init__(self, cfg: CheckpointConfig, ckpt, tracker, *, rank: int, step: int, max_steps: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.schedule = CheckpointSchedule(parse_interval(cfg.interval), cfg.mtbf_hours * 3600)
        self.ckpt, self.tracker, self.rank, self.max_steps, self.clock = ckpt, tracker, rank, max_steps, clock
        self.last_saved = step if step else None  # a resumed run's step is already in a checkpoint
        self.t_saved = clock()
        self.blocking: list[float] = []  # seconds each save held training up

    def due(self, step: int) -> bool:
        """This rank's vote: whether a checkpoint is due after `step` (never at the last step, whose
        save is the final one)."""
        return self.schedule.due(step, self.clock() - self.t_saved) and step < self.max_steps

    def save(self, engine, state) -> float:
        """The scheduled save: returns its blocking seconds, which interval=auto learns from."""
        blocked = self.ckpt.save(engine, state.step, asdict(state))
        self.blocking.append(blocked)
        self.schedule.measured(blocked)
        self.tracker.log({"ckpt/blocking_s": blocked, "ckpt/previous_upload_s": self.ckpt.last_upload_s,
                          "ckpt/interval_s": self.schedule.seconds}, step=state.step)
        if self.schedule.reason and self.rank == 0:
            log.info(self.schedule.reason)
        self.last_saved, self.t_saved = state.step, self.clock()
        return blocked

    def save_at_stop(self, engine, state) -> None:
        """A requested stop: commit this step (unless just saved) and wait for every upload."""
        if self.last_saved != state.step:
            self.ckpt.save(engine, state.step, asdict(state))
        self.ckpt.wait()

    def save_final(self, engine, state) -> None:
        """The end of training: the final checkpoint (the launcher exports it after the group ends),
        every upload done and committed, and the blocking summary."""
        if self.last_saved != state.step:
            self.blocking.append(self.ckpt.save(engine, state.step, asdict(state)))
        self.ckpt.wait()  # every upload done and committed before the worker group reports success
        if self.blocking:
            self.tracker.summary({"ckpt/blocking_s_mean": sum(self.blocking) / len(self.blocking),
                                  "ckpt/saves": len(self.blocking)})
