"""The job lifecycle in one place: (record, runner events) -> state transitions and field updates.

A pure function of the durable record and the events its runner emitted since the last one the
controller applied. It decides; `Controller` persists each change (with the event's sequence
number, in one write) and then acts on it. Nothing here touches Ray, files or the clock.

    STARTING --ENGINE_READY--> RUNNING --ATTEMPT_STARTED(failure)--> RESTARTING --ENGINE_READY--> RUNNING
    RUNNING --ATTEMPT_STARTED(resize)--> RUNNING        (an elastic resize is no failure)
    RESTARTING (scale requested) --ATTEMPT_STARTED(scale), ENGINE_READY--> RUNNING at the new size
    any active --SUCCEEDED | STOPPED | FAILED--> SUCCEEDED | CANCELLED | FAILED
    any active (preempt requested) --STOPPED--> PREEMPTED   (waits for room again; resumes from the commit)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from orchestrator.errors import FailureClass
from orchestrator.jobs.events import Action, AttemptReason, EventKind, RunnerEvent
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState, allowed

# What a PROGRESS event carries into the record's metrics (rank 0's latest logged row): `orch status`
# shows them; step_time_s (the mean over the last log interval) gives the ETA.
PROGRESS_METRICS = ("step", "loss", "first_loss", "eval_loss", "tokens", "tokens_per_s", "step_time_s", "mfu")
_METRIC_KEYS = (*PROGRESS_METRICS, "world_size")
FAILURES_KEPT = 50  # the record keeps the job's last this many failures and restarts


@dataclass(frozen=True)
class Change:
    """What applying one event does to a job: persisted together with `seq`."""

    seq: int  # the event's sequence number (the record's last_event_seq once applied)
    state: JobState | None = None  # the new state, or None to keep it
    reason: str = ""  # why (the state history's entry)
    fields: dict = field(default_factory=dict)  # record fields to set (metrics and wandb: merged whole)
    say: str | None = None  # a line for the job's log

    @property
    def ends(self) -> bool:
        return self.state is not None and self.state.terminal


def apply_events(record: JobRecord, events: list[RunnerEvent] | tuple[RunnerEvent, ...]) -> list[Change]:
    """The changes `events` make to `record`, in order. Events at or below the record's
    `last_event_seq` were applied before and are skipped; nothing follows a terminal change."""
    changes = []
    for event in sorted(events, key=lambda e: e.seq):
        if event.seq <= record.last_event_seq:
            continue
        change = on_event(record, event)
        changes.append(change)
        record = preview(record, change)
        if change.ends:
            break
    return changes


def preview(record: JobRecord, change: Change) -> JobRecord:
    """The record as it will be once `change` is applied (no history entry)."""
    fields = dict(change.fields, last_event_seq=change.seq)
    if change.state is not None:
        fields["state"] = change.state
    return dataclasses.replace(record, **fields)


def on_event(record: JobRecord, event: RunnerEvent) -> Change:
    """The change one event makes (see the module docstring for the lifecycle)."""
    handler = _HANDLERS[event.kind]
    change = handler(record, event)
    if change.state is not None and not allowed(record.state, change.state):
        return Change(event.seq, say=change.say)  # e.g. a late event after the user cancelled
    return change


def _merged(record: JobRecord, metrics: dict) -> dict:
    return {**record.metrics, **{k: v for k, v in metrics.items() if v is not None}}


def _log(record: JobRecord, e: RunnerEvent) -> Change:
    return Change(e.seq, say=e.data.get("line"))


def _attempt_started(record: JobRecord, e: RunnerEvent) -> Change:
    reason = AttemptReason(e.data.get("reason", AttemptReason.FAILURE))
    size = e.data.get("world_size")
    attempt = {"number": e.data.get("attempt"), "reason": reason.value, "world_size": size}
    fields: dict = {"attempt": attempt}
    if size:
        fields["metrics"] = _merged(record, {"world_size": size})
    if reason is AttemptReason.FAILURE:
        restarts = record.restarts + 1
        entry = restart_entry(record, e.at)
        fields.update(restarts=restarts, restart_log=[*record.restart_log, entry][-FAILURES_KEPT:])
        state = JobState.RESTARTING if record.state is not JobState.RESTARTING else None
        ranks = ", ".join(map(str, entry["ranks"]))
        why = f"after a {entry['class']}" + (f" of rank {ranks}" if ranks else "")
        return Change(e.seq, state, f"worker group failed ({entry['class']}); restarting from the last checkpoint",
                      fields, say=f"RESTARTING {why} (restart {restarts} of {record.config.get('max_failures', '?')})")
    if reason is AttemptReason.RESIZE:
        before = record.attempt.get("world_size")
        return Change(e.seq, None, "", fields,
                      say=f"resized by Ray Train from {before} to {size} workers (elastic {record.workers}-"
                          f"{record.config.get('max_workers')}); continuing from the last checkpoint")
    return Change(e.seq, None, "", fields)


def restart_entry(record: JobRecord, at: float) -> dict:
    """The restart ledger's entry for a failure restart starting at `at`: the failure seen last, if it
    was seen after the previous restart (else a worker crash Ray Train saw before any classification)."""
    last = record.failures[-1] if record.failures else None
    previous = record.restart_log[-1]["restart_at"] if record.restart_log else float("-inf")
    failure = last if last and last["at"] > previous else {}
    return {"at": failure.get("at", at), "restart_at": at,
            "class": failure.get("class", FailureClass.WORKER_CRASH.value),
            "ranks": failure.get("ranks", []), "nodes": failure.get("nodes", []),
            "failed_at_step": failure.get("step", record.metrics.get("step")),
            "resumed_from_step": None, "steps_lost": None, "seconds_lost": None}


def _resumed(record: JobRecord, e: RunnerEvent) -> dict:
    """The ledger with its last restart completed by the new group's ENGINE_READY: the step it resumed
    from, the steps to train again, and the seconds lost (from the failure to the group's start, plus
    those steps at the job's step time)."""
    if not record.restart_log or record.restart_log[-1]["resumed_from_step"] is not None:
        return {}
    entry = dict(record.restart_log[-1])
    resumed = e.data.get("step") or 0
    lost = max(0, (entry["failed_at_step"] or resumed) - resumed)
    step_s = record.metrics.get("step_time_s") or 0.0
    entry.update(resumed_from_step=resumed, steps_lost=lost, seconds_lost=round(e.at - entry["at"] + lost * step_s, 1))
    return {"restart_log": [*record.restart_log[:-1], entry]}


def _restart_decided(record: JobRecord, e: RunnerEvent) -> Change:
    """Ray Train restarts the worker group: RESTARTING at once (the new group's start, which counts
    the restart, comes seconds later)."""
    cls = e.data.get("class") or FailureClass.WORKER_CRASH.value
    ranks = ", ".join(map(str, e.data.get("ranks") or []))
    why = f"{cls}" + (f" of rank {ranks}" if ranks else "")
    return Change(e.seq, JobState.RESTARTING, f"worker group failed ({why}); restarting from the last checkpoint",
                  say=f"worker group failed ({why}): restarting from the last checkpoint")


def _resume_note(data: dict) -> str:
    if not data.get("resumed_from"):
        return ""
    note = f", resumed from {data['resumed_from']}"
    if data.get("universal"):
        note += " as a universal checkpoint"
    if data.get("skipped"):
        note += f" (skipped corrupt {', '.join(data['skipped'])})"
    return note


def _engine_ready(record: JobRecord, e: RunnerEvent) -> Change:
    note = _resume_note(e.data)
    workers = record.attempt.get("world_size") or record.workers
    if record.state is JobState.STARTING:
        return Change(e.seq, JobState.RUNNING, "worker group started" + note, say=f"RUNNING on {workers} workers{note}")
    if record.state is not JobState.RESTARTING:
        return Change(e.seq, fields=_resumed(record, e),
                      say=f"training again on {workers} workers{note}" if note else None)
    scaling = (record.requested or {}).get("action") == Action.SCALE
    if not scaling:
        return Change(e.seq, JobState.RUNNING, "worker group restarted" + note, _resumed(record, e),
                      say=f"RUNNING again{note}")
    if record.attempt.get("reason") == AttemptReason.SCALE.value:  # the new-size group trains
        return Change(e.seq, JobState.RUNNING, f"restarted at {record.workers} workers" + note, {"requested": None},
                      say=f"RUNNING on {record.workers} workers{note}")
    return Change(e.seq)  # the old group, restarted by Ray Train before the scale took effect


def _checkpoint_committed(record: JobRecord, e: RunnerEvent) -> Change:
    return Change(e.seq, fields={"checkpoint": e.data["uri"]})


def _progress(record: JobRecord, e: RunnerEvent) -> Change:
    fields: dict = {}
    metrics = {k: v for k, v in (e.data.get("metrics") or {}).items() if k in _METRIC_KEYS}
    if metrics:
        fields["metrics"] = _merged(record, metrics)
    if e.data.get("wandb"):
        fields["wandb"] = {**record.wandb, **e.data["wandb"]}
    say = None
    step, loss = metrics.get("step"), metrics.get("loss")
    if step is not None and loss is not None and step != record.metrics.get("step"):
        say = f"step {step}/{record.config.get('trainer', {}).get('max_steps', '?')} loss {loss:.4f}"
    return Change(e.seq, fields=fields, say=say)


def _stalled(record: JobRecord, e: RunnerEvent) -> Change:
    """A stall the runner's watchdog handled: a failure of class `stall`, named in the job's log."""
    d = e.data
    failure = {"at": e.at, "class": "stall", "line": d.get("line"), "ranks": d.get("ranks", []),
               "nodes": d.get("nodes", []), "node_ids": d.get("node_ids", []), "step": d.get("step"),
               "phase": d.get("phase"), "dumps": d.get("dumps")}
    return Change(e.seq, fields={"failures": [*record.failures, failure][-FAILURES_KEPT:]},
                  say=f"STALLED: {d.get('line')}; every rank's stacks in {d.get('dumps')}")


def _worker_failed(record: JobRecord, e: RunnerEvent) -> Change:
    """A failure of the worker group, classified by the runner: kept in the record, named in the log."""
    d = e.data
    failure = {"at": d.get("at", e.at), "class": d.get("class"), "line": d.get("line"), "ranks": d.get("ranks", []),
               "nodes": d.get("nodes", []), "node_ids": d.get("node_ids", []), "step": d.get("step")}
    where = "".join([f" of rank {', '.join(map(str, failure['ranks']))}" if failure["ranks"] else "",
                     f" on {', '.join(failure['nodes'])}" if failure["nodes"] else "",
                     f" at step {failure['step']}" if failure["step"] is not None else ""])
    return Change(e.seq, fields={"failures": [*record.failures, failure][-FAILURES_KEPT:]},
                  say=f"failure ({failure['class']}){where}: {failure['line']}")


def _straggler(record: JobRecord, e: RunnerEvent) -> Change:
    """A rank persistently slower than the others (rank 0 found it; the runner added its node)."""
    d = {"at": e.at, **{k: e.data.get(k) for k in ("rank", "node", "node_id", "ratio", "step", "window")}}
    return Change(e.seq, fields={"stragglers": [*record.stragglers, d][-FAILURES_KEPT:]},
                  say=straggler_line(d))


def straggler_line(d: dict) -> str:
    return (f"straggler: rank {d['rank']} on node {d.get('node') or '?'} computes {d['ratio']:.2f}x as long as the "
            f"other ranks (their median) over {d['window']} logged steps, at step {d['step']}")


def _stopped(record: JobRecord, e: RunnerEvent) -> Change:
    checkpoint = e.data.get("checkpoint") or record.checkpoint
    if (record.requested or {}).get("action") == Action.PREEMPT:
        why = f"preempted for {record.requested.get('for', 'another job')} after a checkpoint ({checkpoint})"
        return Change(e.seq, JobState.PREEMPTED, why, {"checkpoint": checkpoint, "requested": None,
                                                        "preemptions": record.preemptions + 1},
                      say=f"PREEMPTED: {why}; it waits at its place in the queue and resumes from there")
    return Change(e.seq, JobState.CANCELLED, f"cancelled by the user after a checkpoint ({checkpoint})",
                  {"checkpoint": checkpoint, "failure_reason": "cancelled by the user", "requested": None},
                  say=f"CANCELLED: cancelled by the user after a checkpoint ({checkpoint})")


def _succeeded(record: JobRecord, e: RunnerEvent) -> Change:
    fields = {"export": e.data.get("export"), "metrics": _merged(record, e.data.get("metrics") or {}),
              "requested": None}
    if e.data.get("checkpoint"):
        fields["checkpoint"] = e.data["checkpoint"]
    why = "evaluated" if record.kind == "eval" else "training finished"
    return Change(e.seq, JobState.SUCCEEDED, why, fields, say=JobState.SUCCEEDED.value)


def _failed(record: JobRecord, e: RunnerEvent) -> Change:
    reason = e.data.get("reason") or "failed"
    return Change(e.seq, JobState.FAILED, reason,
                  {"failure_reason": reason, "failure_detail": e.data.get("traceback"), "requested": None},
                  say=f"FAILED: {reason}")


_HANDLERS = {
    EventKind.LOG: _log,
    EventKind.ATTEMPT_STARTED: _attempt_started,
    EventKind.ENGINE_READY: _engine_ready,
    EventKind.WORKER_GROUP_PLACED: _log,  # for the launcher (it frees the group of a lost runner)
    EventKind.COORDINATOR_REQUEST: _log,  # for the launcher (it cancels the request of a lost runner)
    EventKind.CHECKPOINT_COMMITTED: _checkpoint_committed,
    EventKind.PROGRESS: _progress,
    EventKind.STALLED: _stalled,
    EventKind.WORKER_FAILED: _worker_failed,
    EventKind.RESTART_DECIDED: _restart_decided,
    EventKind.STRAGGLER: _straggler,
    EventKind.STOPPED: _stopped,
    EventKind.SUCCEEDED: _succeeded,
    EventKind.FAILED: _failed,
}
