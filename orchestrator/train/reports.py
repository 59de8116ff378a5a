"""What rank 0 tells its job's runner: typed reports, one frozen class per kind.

Rank 0 of each worker group (`orchestrator.train.loop`) sends these to the job's runner actor
(`JobRunner.report`), which turns each into one of its own typed events for the controller
(`orchestrator.jobs.events`; the table is `orchestrator.execution.runner.REPORT_EVENTS`). Every
field is read there: what the runner would not read is not sent (a save's blocking time goes to
the metrics history, `ckpt/blocking_s`; a requested stop is seen by the runner in the committed
checkpoint the group ended on). Plain data: no Ray, no torch, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineReady:
    """The worker group built its engine: fresh, or restored from a committed checkpoint."""

    resumed_from: str | None = None  # URI of the checkpoint restored (None: a fresh start)
    step: int | None = None  # the step it resumed at (None: a fresh start)
    skipped: tuple[str, ...] = ()  # newer checkpoints passed over as corrupt
    universal: bool = False  # loaded as a DeepSpeed universal checkpoint (another world size or ZeRO stage)


@dataclass(frozen=True)
class CheckpointCommitted:
    """A checkpoint's commit marker is in the store (sent from rank 0's upload thread)."""

    uri: str
    step: int


@dataclass(frozen=True)
class Progress:
    """A logged step (every trainer.log_interval steps). The names are the job record's metric keys
    (`orchestrator.jobs.lifecycle.PROGRESS_METRICS`)."""

    step: int
    loss: float  # mean over ranks of this step's micro-batch losses
    first_loss: float  # the job's first step's loss (kept across resumes: saved with every checkpoint)
    tokens: int  # tokens trained on so far
    tokens_per_s: float
    step_time_s: float
    mfu: float | None  # None where the device's peak FLOPs are unknown


@dataclass(frozen=True)
class Evaluated:
    """A validation pass ended (every trainer.eval_interval steps, and after the last step)."""

    eval_loss: float


@dataclass(frozen=True)
class StragglerFound:
    """A rank persistently slower than the others (orchestrator.train.stragglers); the runner adds its node."""

    rank: int
    ratio: float  # its compute time over the other ranks' median, over the window
    step: int
    window: int  # logged intervals compared


# (the runner dispatches on the class)
Report = EngineReady | CheckpointCommitted | Progress | Evaluated | StragglerFound
REPORTS: tuple[type, ...] = (EngineReady, CheckpointCommitted, Progress, Evaluated, StragglerFound)
