"""A job's durable record: identity, frozen config, state, history and latest progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from orchestrator.jobs.state import JobState


@dataclass
class JobRecord:
    id: str
    pipeline_id: str
    name: str  # the job's name inside its pipeline (pretrain, finetune, ...)
    kind: str  # pretrain | finetune | eval
    state: JobState
    priority: int
    depends_on: list[str]  # job ids
    config: dict  # the frozen, resolved JobConfig (no secrets: it is built from conf/ alone)
    created_at: float
    seq: int = 0  # submission order (FIFO among equal priorities)
    metrics: dict = field(default_factory=dict)  # latest step, loss, first loss, eval loss, tokens
    checkpoint: str | None = None  # URI of the latest committed checkpoint
    export: str | None = None  # URI of the exported weights (set when the job succeeded)
    failure_reason: str | None = None  # one line
    failure_detail: str | None = None  # the traceback behind it (`orch --debug` prints it)
    restarts: int = 0
    history: list[dict] = field(default_factory=list)  # [{"state", "at", "reason"}]
    wandb: dict = field(default_factory=dict)  # run id, group, mode, offline folder or URL
    requested: dict | None = None  # a user action in progress: {"action": "cancel"} or {"action": "scale", ...}
    launches: int = 0  # runners started for this job (a new one after a lost runner)
    last_event_seq: int = 0  # the last event of the current runner the controller applied (exactly once)
    attempt: dict = field(default_factory=dict)  # the current worker group: {"number", "reason", "world_size"}
    sweep: dict = field(default_factory=dict)  # of a sweep's pipeline: {"id", "index", "count", "overrides"}
    user: str = ""  # who submitted it: what the submitter said (--user, ORCH_USER, the OS user); not authenticated
    queue: str = "default"  # the queue (team) whose quota and fair share it counts against
    preemptions: int = 0  # times it was stopped to make room for another job (the restart ledger's preempted)
    # started by a checkpoint trigger (orchestrator.jobs.triggers): {"trigger", "source", "step"}
    triggered: dict = field(default_factory=dict)
    # the worker-group failures seen, oldest first: {"at", "class", "line", "ranks", "nodes", "step", ...}
    failures: list[dict] = field(default_factory=list)
    # every restart after a failure: {"at", "class", "ranks", "nodes", "failed_at_step", "resumed_from_step",
    # "steps_lost", "seconds_lost"} (the last two once the new group is ready)
    restart_log: list[dict] = field(default_factory=list)
    stragglers: list[dict] = field(default_factory=list)  # ranks found persistently slow: {"at", "rank", "node", ...}

    @property
    def workers(self) -> int:
        return int(self.config["workers"])

    def to_json(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> JobRecord:
        """The record `to_json` gave `d` (the state back from its name to a `JobState`)."""
        return cls(**{**d, "state": JobState(d["state"])})

    def latest_run(self) -> list[dict]:
        """The history entries of the job's latest run: those after the last terminal state it left
        (`orch retry`, `orch run --resume`, a dependency retried), or all of them. A restart
        inside a run (RESTARTING, a scale) does not start a new run."""
        start = 0
        for i, h in enumerate(self.history[:-1]):
            if JobState(h["state"]).terminal:
                start = i + 1
        return self.history[start:]

    def started_at(self) -> float | None:
        """When the latest run was admitted (its STARTING); None while it waits to be."""
        return next((h["at"] for h in reversed(self.latest_run()) if JobState(h["state"]) is JobState.STARTING),
                    None)

    def ended_at(self) -> float | None:
        """When the latest run ended; None while it has not."""
        run = self.latest_run()
        return run[-1]["at"] if run and JobState(run[-1]["state"]).terminal else None


def wandb_group(record: JobRecord) -> str:
    """The job's W&B group: set at submit (a job queued `--after` another joins its group), else its pipeline."""
    return record.wandb.get("group") or record.pipeline_id
