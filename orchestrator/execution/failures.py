"""What a failed Ray Train run says about its workers: their own exceptions, whether a restart can
fix them, and one line merged over ranks."""

from __future__ import annotations

from orchestrator.errors import OrchError


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
