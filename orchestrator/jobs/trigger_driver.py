"""What the controller does for checkpoint triggers (the rules: orchestrator.jobs.triggers): pin
the source's checkpoints at submit, start an instance for each matching committed checkpoint,
release a step once its instance ended (deleting what retention no longer keeps when the source
has ended), and end the trigger after its source and its instances.

The committed steps are read from the store (the source's run folder), not from the runner's
events: a runner lost right after a commit leaves no event, but the checkpoint is there. The
listing is read again only when the source's latest checkpoint or state changed, and once after a
controller restart; the instance ids make starting a step twice a no-op.
"""

from __future__ import annotations

import json
from typing import Callable

from orchestrator.checkpoint.layout import checkpoint_uri, list_checkpoints, run_uri
from orchestrator.checkpoint.retention import pin_uri, protected_steps, read_pins, to_delete
from orchestrator.constants import COMMIT_MARKER
from orchestrator.errors import OrchError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from orchestrator.jobs.triggers import instance, is_trigger, steps_to_start, trigger_end
from orchestrator.storage import ObjectStore, join_uri, open_store


def _store_of(record: JobRecord) -> ObjectStore:
    storage = record.config["storage"]
    return open_store(storage["root"], endpoint_url=storage.get("endpoint_url"), region=storage.get("region"))


def _run_of(record: JobRecord) -> str:
    return run_uri(record.config["storage"]["root"], record.id)


class TriggerDriver:
    """The controller's part for checkpoint triggers, on its job store and the runs' object stores."""

    def __init__(self, store: JobStore, say: Callable[[str], None], clock: Callable[[], float]):
        self.store, self.say, self.clock = store, say, clock
        self.seen: dict[str, tuple] = {}  # trigger id -> (source checkpoint, source state) last listed
        self.written: dict[str, list[int]] = {}  # trigger id -> the released steps its pin last said
        # which job ids were looked at, and which of them are triggers (a job's config never changes):
        # each pass reads the records of the triggers and of jobs new to it, not every job's again
        self.checked: set[str] = set()
        self.known: set[str] = set()

    def pin(self, records: list[JobRecord]) -> None:
        """At submit: each trigger's pin in its source's run folder, before the source commits."""
        for t in (r for r in records if is_trigger(r)):
            source = next((r for r in records if r.id == t.depends_on[0]), None) or self.store.get(t.depends_on[0])
            self._write_pin(t, source, [])

    def step(self, job_ids: list[str]) -> None:
        """One pass over the triggers among `job_ids`; the instances started join `job_ids`."""
        new = [i for i in job_ids if i not in self.checked]
        self.known |= {r.id for r in self.store.get_many(new) if is_trigger(r)}
        self.checked.update(new)
        for t in self.store.get_many([i for i in job_ids if i in self.known]):
            if t.state is not JobState.PENDING:
                continue
            try:
                source = self.store.get(t.depends_on[0])
            except OrchError:
                continue  # (dependency_decisions blocks it and names the missing id)
            mine = {r.id: r for r in self.store.list(t.pipeline_id) if r.triggered.get("trigger") == t.id}
            key = (source.checkpoint, source.state.value)
            if self.seen.get(t.id) != key:
                self._start(t, source, mine)
                self.seen[t.id] = key
            job_ids.extend(i for i in mine if i not in job_ids)
            self._release(t, source, mine)

    def _start(self, t: JobRecord, source: JobRecord, mine: dict[str, JobRecord]) -> None:
        store, run = _store_of(source), _run_of(source)
        committed = [r.step for r in list_checkpoints(store, run) if r.committed]
        for step in steps_to_start(t, committed, set(mine)):
            rec = instance(t, source, step, checkpoint_uri(run, step), self.clock())
            self.store.add([rec])
            mine[rec.id] = rec
            self.say(f"{rec.id}: QUEUED (checkpoint step {step} of {source.id} committed; {t.id})")

    def _release(self, t: JobRecord, source: JobRecord, mine: dict[str, JobRecord]) -> None:
        released = sorted(r.triggered["step"] for r in mine.values() if r.state.terminal)
        if released != self.written.get(t.id):
            self._write_pin(t, source, released)
            if source.state.terminal:
                self._retain(source)
        if source.state.terminal and len(released) == len(mine):  # (every instance ended: `released` is all)
            decision = trigger_end(t, source, released)
            if decision is not None:
                self.store.transition(t.id, decision.state, decision.reason)
                self.say(f"{t.id}: {decision.state.value} ({decision.reason})")
                _store_of(source).delete(pin_uri(_run_of(source), t.id))
                self._retain(source)

    def _write_pin(self, t: JobRecord, source: JobRecord, released: list[int]) -> None:
        body = {"trigger": t.config["trigger"], "released": released, "job": t.id}
        _store_of(source).put(pin_uri(_run_of(source), t.id), json.dumps(body).encode())
        self.written[t.id] = released

    def _retain(self, source: JobRecord) -> None:
        """An ended source's retention, now that a step was released (a running source's own next
        commit applies it): what its keep_last / keep_every and the remaining pins do not keep."""
        store, run = _store_of(source), _run_of(source)
        refs = list_checkpoints(store, run)
        committed = [r.step for r in refs if r.committed]
        if not committed:
            return
        cfg = source.config["checkpoint"]
        pinned = protected_steps(read_pins(store, run), committed)
        for ref in to_delete(refs, cfg["keep_last"], cfg.get("keep_every") or 0, committed[-1], pinned):
            if ref.committed:  # (an ended run's uncommitted leftovers are its own retention's)
                store.delete(join_uri(ref.uri, COMMIT_MARKER))
                store.delete_prefix(ref.uri + "/")
                self.say(f"{source.id}: checkpoint step {ref.step} deleted (released by its triggered jobs)")

