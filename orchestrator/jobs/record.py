"""A job's durable record: identity, frozen config, state, history and latest progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from orchestrator.jobs.state import JobState


@dataclass
class JobRecord:
    id: str
    pipeline_id: str
    name: str  # the job's name inside its pipeline (pretrain, finetune, ...)
    kind: str  # pretrain | finetune
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

    def started_at(self) -> float | None:
        return next((h["at"] for h in self.history if h["state"] == JobState.STARTING.value), None)

    def ended_at(self) -> float | None:
        return next((h["at"] for h in self.history if JobState(h["state"]).terminal), None)


def wandb_group(record: JobRecord) -> str:
    """The job's W&B group: set at submit (a job queued `--after` another joins its group), else its pipeline."""
    return record.wandb.get("group") or record.pipeline_id
