"""One exception class per failure mode, and the classes of a worker group's failures.

Each carries a one-line, user-facing message: what failed, the value, the fix. The CLI prints
that line and exits with `exit_code`; a traceback only with `--debug`.
"""

import enum


class FailureClass(str, enum.Enum):
    """What made a worker group fail (orchestrator.execution.failures.classify), most telling first;
    the keys of trainer.max_restarts_per_class."""

    USER = "user"  # user code or config: an OrchError no restart can fix (the job fails at once)
    STALL = "stall"  # the runner's watchdog found no progress and killed the stuck rank
    PREEMPTED = "preempted"  # its node was drained (a preemption)
    NODE_LOST = "node_lost"
    OOM = "oom"  # out of memory
    WORKER_CRASH = "worker_crash"  # the worker's process died
    STORAGE = "storage"  # a retryable storage or checkpoint error
    WORKER_ERROR = "worker_error"  # any other exception (often a collective aborted by a peer's death)


class OrchError(Exception):
    """Base class. `exit_code` 2 is a usage/config/input error; 1 is a runtime failure."""

    exit_code = 1
    # Can a restart of the worker group fix it? Ray Train retries a failed group only for these
    # (orchestrator.execution.ray_train.FailFast): a bad config, a corrupt shard or revoked credentials fail
    # the job at once instead of using up its restarts.
    retryable = True

    def __init__(self, *args: object, retryable: bool | None = None):
        super().__init__(*args)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(OrchError):
    """A config key, value or override is invalid."""

    exit_code = 2
    retryable = False


class StorageError(OrchError):
    """The object store cannot be reached or used (missing bucket, bad credentials, missing object).
    Not retryable unless raised with `retryable=True` (an endpoint that does not answer now)."""

    exit_code = 2
    retryable = False


class DatasetError(OrchError):
    """A dataset is missing, corrupt, or does not match the job (tokenizer, sequence length)."""

    exit_code = 2
    retryable = False


class CheckpointError(OrchError):
    """A checkpoint is missing, partial or corrupt."""

    exit_code = 2


class JobNotFound(OrchError):
    """A job id names no job in the state folder."""

    exit_code = 2


class JobFailed(OrchError):
    """A job ended in FAILED (or was BLOCKED by a failed dependency)."""

    exit_code = 1


class ClusterError(OrchError):
    """The Ray cluster cannot be reached or cannot fit what was asked for."""

    exit_code = 2


class ReportError(OrchError):
    """A report cannot be made: no job has a metrics history yet, or its store cannot be read."""

    exit_code = 2
    retryable = False
