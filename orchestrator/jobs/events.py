"""What a job's runner tells the controller: typed, sequence-numbered events.

A runner (one per launch of a job) appends events with increasing sequence numbers; the controller
applies each one exactly once (it persists the last applied number with the change it caused, see
`orchestrator.jobs.lifecycle`), so a controller that restarts between two events neither skips nor
repeats one. Plain data: no Ray, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EventKind(str, enum.Enum):
    LOG = "log"  # a line for the job's log: {"line"}
    ATTEMPT_STARTED = "attempt_started"  # a worker group starts: {"attempt", "reason", "world_size"}
    ENGINE_READY = "engine_ready"  # it built (and restored) its engine: {"attempt", "resumed_from", "step", ...}
    WORKER_GROUP_PLACED = "worker_group_placed"  # its placement group: {"placement_group": hex id}
    # the run's request to Ray's AutoscalingCoordinator ({"requester": "train-<run id>"}): cancelled when the
    # job is stopped at once, so that it does not hold its workers' room until it expires
    COORDINATOR_REQUEST = "coordinator_request"
    CHECKPOINT_COMMITTED = "checkpoint_committed"  # {"uri", "step"}
    PROGRESS = "progress"  # {"metrics": {...}} and/or {"wandb": {...}}
    # Ray Train decided to restart the worker group after a failure (the job is RESTARTING from now,
    # before the new group starts): {"class", "ranks", "nodes"} of the failure, as classified
    RESTART_DECIDED = "restart_decided"
    # a worker group failed, classified (orchestrator.errors.FailureClass):
    # {"at", "class", "ranks", "nodes", "node_ids", "step", "line"}
    WORKER_FAILED = "worker_failed"
    # a stall: {"line", "ranks", "nodes", "node_ids", "step", "phase", "dumps": the folder of every rank's stacks,
    # "killed"}
    STALLED = "stalled"
    # a rank persistently slower than the others: {"rank", "node", "node_id", "ratio", "step", "window"}
    STRAGGLER = "straggler"
    STOPPED = "stopped"  # stopped on request (cancel) after committing a checkpoint: {"checkpoint"}
    SUCCEEDED = "succeeded"  # trained to max_steps and exported: {"export", "checkpoint", "metrics"}
    FAILED = "failed"  # {"reason", "retryable", "traceback"}


class AttemptReason(str, enum.Enum):
    """Why a worker group starts. Only FAILURE counts against the job's `max_failures`."""

    FIRST = "first"  # the job's first worker group
    RELAUNCH = "relaunch"  # a new runner after the previous one was lost (counted by the controller, if at all)
    FAILURE = "failure"  # Ray Train restarts the group after a worker failed
    RESIZE = "resize"  # Ray Train grows or shrinks an elastic group (no failure)
    SCALE = "scale"  # the user's `orch scale`: a new group at the new size
    RESUME = "resume"  # a job launched again after it ended (`orch retry`, `orch run --resume`)


class Action(str, enum.Enum):
    """A user request the runner acts on (kept in the record's `requested` until it took effect)."""

    CANCEL = "cancel"  # commit a checkpoint of the current step, then stop
    SCALE = "scale"  # commit a checkpoint, then a new worker group at `workers`
    PREEMPT = "preempt"  # commit a checkpoint of the current step, then stop (the job is queued again)


class RunnerStatus(str, enum.Enum):
    """What polling a runner found (not an event: the runner cannot report its own death)."""

    ALIVE = "alive"
    BUSY = "busy"  # it did not answer in time: ask again later
    LOST = "lost"  # its actor is dead (its worker group went with it)


@dataclass(frozen=True)
class RunnerEvent:
    seq: int  # 1, 2, ... within one runner (one launch of the job)
    kind: EventKind
    data: dict = field(default_factory=dict)
    at: float = 0.0  # wall-clock time the runner recorded it


@dataclass(frozen=True)
class RunnerPoll:
    """One poll of a runner: its status and the events after the sequence number asked for."""

    status: RunnerStatus
    events: tuple[RunnerEvent, ...] = ()
    reason: str | None = None  # why it is LOST
