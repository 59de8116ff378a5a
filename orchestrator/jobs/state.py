"""The job state machine: states, which are terminal, and which transitions are legal.

A terminal job leaves its state only one way: back to PENDING, when the user retries it (`orch
retry`, `orch run --resume`); it then continues from its last committed checkpoint. A SUCCEEDED job
is never run again.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    PENDING = "PENDING"  # waiting on dependencies
    QUEUED = "QUEUED"  # dependencies met, waiting for resources
    STARTING = "STARTING"  # admitted: preparing data, starting the worker group
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"  # the worker group failed and is being restarted from a checkpoint
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    BLOCKED = "BLOCKED"  # a dependency failed or was cancelled: this job will never run
    PREEMPTED = "PREEMPTED"  # stopped after a checkpoint to make room for another: waits at its old place

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def waiting(self) -> bool:
        """Waiting for room: its dependencies met (QUEUED), or stopped to make room (PREEMPTED)."""
        return self is JobState.QUEUED or self is JobState.PREEMPTED  # (identity: the policies ask 10^6 times)

    @property
    def active(self) -> bool:
        """Holding (or about to hold) cluster resources."""
        return self is JobState.RUNNING or self is JobState.STARTING or self is JobState.RESTARTING


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.BLOCKED})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    # (PENDING -> SUCCEEDED: a checkpoint trigger, which never runs itself, ends after its instances)
    JobState.PENDING: frozenset({JobState.QUEUED, JobState.BLOCKED, JobState.CANCELLED, JobState.SUCCEEDED}),
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.RESTARTING, JobState.FAILED, JobState.CANCELLED,
                                  JobState.SUCCEEDED, JobState.PREEMPTED}),
    JobState.RUNNING: frozenset({JobState.RESTARTING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                                 JobState.PREEMPTED}),
    JobState.RESTARTING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.SUCCEEDED,
                                    JobState.PREEMPTED}),
    # preempted: waits for room again at its original place in the queue (admitted like a QUEUED job)
    JobState.PREEMPTED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    # retried by the user (a BLOCKED job: its dependency was retried)
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.CANCELLED: frozenset({JobState.PENDING}),
    JobState.BLOCKED: frozenset({JobState.PENDING}),
}


class IllegalTransition(ValueError):
    pass


def allowed(current: JobState, new: JobState) -> bool:
    return new in _ALLOWED.get(current, frozenset())


def check_transition(current: JobState, new: JobState) -> None:
    if not allowed(current, new):
        raise IllegalTransition(f"job cannot go from {current.value} to {new.value}")
