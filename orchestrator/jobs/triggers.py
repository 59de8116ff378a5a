"""Jobs started by another job's committed checkpoints, not only by its end.

A job that depends on `pretrain@every:200` (or `@step:400`) is a *trigger*: it never runs itself.
Each committed checkpoint of its source whose step matches starts one job made from it (its
*instance*), with the weights of exactly that checkpoint (`init_from` = the checkpoint's URI). An
instance's id is the trigger's id and the step (`p1a2b3c-eval-s200`), so however often the
controller looks (after a restart, after the source resumed from an older commit and committed
the same step again, after a second look at the same listing) a step starts one job: creating an
id that exists is a no-op. Instances run below their source's priority unless the trigger says
lower still, so they use room the source leaves and never delay it.

The checkpoints a trigger still needs are kept from retention by a *pin* in the source's run
folder (`runs/<source>/pins/<trigger id>.json`: the rule, and the steps already released): the
source's checkpointer keeps every committed step a pin matches and has not released
(`protected_steps`). The controller releases a step when its instance has ended, and removes the
pin when the trigger has ended and every instance with it.

Pure functions of records and step lists; the controller (orchestrator.jobs.controller) acts.
"""

from __future__ import annotations

from orchestrator.config.schema import trigger_matches
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.resources import Decision
from orchestrator.jobs.state import JobState


def instance_id(trigger_id: str, step: int) -> str:
    return f"{trigger_id}-s{step}"


def is_trigger(record: JobRecord) -> bool:
    return bool(record.config.get("trigger"))


def steps_to_start(trigger: JobRecord, committed: list[int], existing: set[str]) -> list[int]:
    """The committed steps of the source that match and have no instance yet, oldest first."""
    rule = trigger.config["trigger"]
    return [s for s in sorted(set(committed))
            if trigger_matches(rule, s) and instance_id(trigger.id, s) not in existing]


def instance(trigger: JobRecord, source: JobRecord, step: int, checkpoint: str, now: float) -> JobRecord:
    """The job a committed checkpoint starts: the trigger's config from exactly those weights, no
    dependency left to wait for, below its source's priority."""
    config = dict(trigger.config, init_from=checkpoint, trigger=None, depends_on=[], name=f"{trigger.name}-s{step}")
    if config["data"].get("kind") == "sft" and not config["data"].get("tokenizer_uri"):
        config["data"] = dict(config["data"], tokenizer_uri=checkpoint)  # (every checkpoint carries its tokenizer)
    priority = min(trigger.priority, source.priority - 1)
    config["priority"] = priority
    return JobRecord(id=instance_id(trigger.id, step), pipeline_id=trigger.pipeline_id, name=config["name"],
                     kind=trigger.kind, state=JobState.QUEUED, priority=priority, depends_on=[], config=config,
                     created_at=now, wandb=dict(trigger.wandb), sweep=dict(trigger.sweep), user=trigger.user,
                     queue=trigger.queue, triggered={"trigger": trigger.id, "source": source.id, "step": step})


def trigger_end(trigger: JobRecord, source: JobRecord, started: list[int]) -> Decision | None:
    """A trigger ends after its source (the controller asks once every matching committed step has
    its instance, `started`, and every instance has ended): SUCCEEDED; BLOCKED if the source failed
    before any checkpoint matched."""
    if not source.state.terminal:
        return None
    steps = ", ".join(str(s) for s in started)
    if started:
        return Decision(trigger.id, JobState.SUCCEEDED,
                        f"{source.id} {source.state.value.lower()}: started {len(started)} job(s), at step {steps}")
    if source.state is JobState.SUCCEEDED:
        return Decision(trigger.id, JobState.SUCCEEDED, f"{source.id} succeeded without a matching checkpoint "
                        f"({trigger.config['trigger']}); nothing to start")
    return Decision(trigger.id, JobState.BLOCKED, f"dependency {source.id} is {source.state.value} "
                    f"before a matching checkpoint")
