"""What a failed Ray Train run says about its workers: their own exceptions, whether a restart can
fix them, and one line merged over ranks; the class of each failure (the taxonomy) and whether the
job may restart once more (per-class budgets, no restart storm).

The classes (`orchestrator.errors.FailureClass`), most telling first (when ranks fail differently,
the group's failure is the first class any rank has; the ranks named are those of that class):
user code/config (an `OrchError` that no restart can fix: the job fails at once), stall (the
runner's watchdog killed a stuck rank), preempted (its node was drained), node lost, out of
memory, worker crash (the process died), storage (a retryable storage or checkpoint error), worker
error (any other exception: often a collateral of a peer's death, a collective that aborted, so it
is retried; a bug repeats at the same step and is stopped by the same-failure rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import CheckpointError, FailureClass, OrchError, StorageError

_ORDER = list(FailureClass)  # most telling first


def worker_causes(exc: BaseException) -> list[BaseException]:
    """The workers' own exceptions inside a Ray Train failure (none for a controller failure)."""
    return [getattr(err, "cause", None) or err for err in (getattr(exc, "worker_failures", None) or {}).values()]


def own_error(exc: BaseException) -> BaseException:
    """The error a Ray task raised itself (a `RayTaskError`'s cause) when it is an `OrchError`, whose
    one line names the value and the fix; else `exc` (Ray's text, with the task's traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, OrchError) else exc


def retryable(exc: BaseException) -> bool:
    """False when a worker raised an error no restart can fix (an `OrchError` with `retryable=False`:
    a corrupt shard, revoked credentials, a full disk)."""
    return all(getattr(c, "retryable", True) for c in worker_causes(exc))


def worker_error_message(exc: BaseException) -> str:
    """One line from a Ray Train failure: the workers' own errors, merged over ranks."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        text = [line for line in str(exc).strip().splitlines() if line.strip()]
        return text[-1] if text else type(exc).__name__
    by_msg: dict[str, list[int]] = {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, OrchError):
            msg = str(cause)
        else:
            text = str(cause).strip().splitlines()
            msg = f"{type(cause).__name__}: " + next((line for line in reversed(text) if line.strip()),
                                                     type(cause).__name__)
        by_msg.setdefault(msg, []).append(rank)
    return "; ".join(f"rank {', '.join(map(str, ranks))}: {msg}" for msg, ranks in by_msg.items())


def error_class(err: BaseException) -> FailureClass:
    """The class of one rank's error (see the module docstring)."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    # Ray Train's WorkerHealthCheckFailedError (Ray 2.60: a worker whose process died, e.g. `kill -9`,
    # found by the health check) holds the actor's own error in `health_check_failure`
    err = getattr(err, "health_check_failure", None) or err
    if isinstance(err, OrchError) and not err.retryable:
        return FailureClass.USER
    if isinstance(err, RayActorError):
        if err.preempted:
            return FailureClass.PREEMPTED
        return FailureClass.NODE_LOST if re.search(r"node (has )?died|node .* (is )?dead", str(err), re.I) \
            else FailureClass.WORKER_CRASH
    if isinstance(err, OutOfMemoryError) or type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
        return FailureClass.OOM
    if isinstance(err, (StorageError, CheckpointError)):
        return FailureClass.STORAGE
    return FailureClass.WORKER_ERROR


def _node_of(err: BaseException) -> str | None:
    found = re.search(r"\bip: (\S+)", str(err))
    return found.group(1) if found else None


@dataclass(frozen=True)
class Failure:
    """One failure of a worker group, classified."""

    cls: FailureClass
    ranks: tuple[int, ...]  # the ranks of that class
    nodes: tuple[str, ...]  # their nodes, where known
    step: int | None  # the step in progress when it failed, where known
    line: str  # one line: the ranks' own errors
    node_ids: tuple[str, ...] = ()  # their nodes' Ray ids, where known (a node's blame: orchestrator.jobs.quarantine)

    @property
    def retryable(self) -> bool:
        return self.cls is not FailureClass.USER

    def to_json(self, at: float) -> dict:
        return {"at": at, "class": self.cls.value, "ranks": list(self.ranks), "nodes": list(self.nodes),
                "step": self.step, "line": self.line, "node_ids": list(self.node_ids)}


def classify(exc: BaseException, steps: dict[int, int] | None = None, nodes: dict[int, str] | None = None,
             stalled: Failure | None = None, node_ids: dict[int, str] | None = None) -> Failure:
    """The failure of a Ray Train run: `stalled` when the runner's watchdog caused it, else the most
    telling class of the ranks' errors. `steps`, `nodes`: each rank's step in progress and node as its
    heartbeats said (`node_ids`: their Ray node ids); the failure's step is its ranks' (the furthest),
    else the furthest rank's."""
    if stalled is not None:
        return stalled
    steps = steps or {}
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return Failure(error_class(exc), (), (), max(steps.values(), default=None), worker_error_message(exc))
    by_rank = {rank: error_class(getattr(err, "cause", None) or err) for rank, err in failures.items()}
    cls = min(by_rank.values(), key=_ORDER.index)
    ranks = tuple(sorted(r for r, c in by_rank.items() if c is cls))
    known = nodes or {}
    where = {r: known.get(r) or _node_of(getattr(failures[r], "cause", None) or failures[r]) for r in ranks}
    step = max((steps[r] for r in ranks if r in steps), default=max(steps.values(), default=None))
    ids = tuple(sorted({(node_ids or {}).get(r) for r in ranks} - {None}))
    return Failure(cls, ranks, tuple(sorted({n for n in where.values() if n})), step, worker_error_message(exc), ids)


@dataclass(frozen=True)
class RestartBudget:
    """How many restarts each class may use (trainer.max_restarts_per_class; a class not named: only
    the job's max_failures), and how many times the same failure at the same step stops the job."""

    per_class: dict[str, int]
    same_failure_limit: int

    def refusal(self, seen: list[Failure], new: Failure) -> str | None:
        """Why the job must not restart after `new` (one line), or None: Ray Train's own budget
        (max_failures) then decides. `seen`: the job's earlier failures, oldest first."""
        if not new.retryable:
            return None  # (FailFast raises it as it is: its own one line)
        same = 1
        for old in reversed(seen):
            if (old.cls, old.step) != (new.cls, new.step):
                break
            same += 1
        if self.same_failure_limit and same >= self.same_failure_limit and new.step is not None:
            return (f"the same failure ({new.cls.value}) at step {new.step} {same} times in a row, not restarting "
                    f"again (trainer.same_failure_limit={self.same_failure_limit}): {new.line}")
        budget = self.per_class.get(new.cls.value)  # (None: no limit of its own)
        used = sum(1 for f in seen if f.cls is new.cls) + 1
        if budget is not None and used > budget:
            return (f"{used} failures of class {new.cls.value}, over its budget "
                    f"(trainer.max_restarts_per_class: {new.cls.value}: {budget}): {new.line}")
        return None
