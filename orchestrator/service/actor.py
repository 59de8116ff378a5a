"""The persistent controller: one named, detached Ray actor that owns the job queue.

It wraps `Controller` (state machine + pure policies + launcher) with a loop thread and the calls
the `orch` client makes: submit, status, logs, cancel, scale, retry. Ray restarts it when it dies
(`max_restarts=-1`); the new instance reopens the SQLite store in the state folder on the head
node and re-attaches to the jobs' runners (named, detached actors) or restarts the jobs whose
runner is gone from their last committed checkpoint. Calls hold one lock, so a user action and a
loop step never interleave.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import traceback

import ray

from orchestrator.config.compose import compose_root, job_config_from_dict
from orchestrator.config.typed import to_dict
from orchestrator.errors import OrchError
from orchestrator.execution.launcher import new_controller
from orchestrator.execution.preflight import preflight
from orchestrator.joblogs import EventLog, read_events
from orchestrator.jobs.store import JobStore
from orchestrator.raycluster.connect import capacity

log = logging.getLogger(__name__)

CONTROLLER_NAME = "orch-controller"
NAMESPACE = "orch"
HEAD_RESOURCE = "node:__internal_head__"
# Where the actor's class lives, said by ping: a detached controller started by another layout of
# orch (its class under another module path) is refused in one line by the client, not met later
# as a pickle traceback when it restarts.
CONTROLLER_LAYOUT = "orchestrator.service.actor.ControllerService"


def _answer(fn=None, *, locked: bool = True):
    """Return {"ok": value} or {"error": message, "kind": class name}: OrchErrors cross the actor
    boundary as one line, not as a remote traceback. `locked` calls wait for the loop's step (they
    change what it acts on); reads (status, logs) do not: the job store is safe to read any time."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            try:
                if not locked:
                    return {"ok": fn(self, *args, **kwargs)}
                with self.lock:
                    return {"ok": fn(self, *args, **kwargs)}
            except OrchError as e:
                return {"error": str(e), "kind": type(e).__name__}

        return wrapper

    return wrap(fn) if fn is not None else wrap


class ControllerService:
    def __init__(self, state_dir: str, poll_s: float = 1.0):
        self.state_dir = os.path.abspath(os.path.expanduser(state_dir))
        self.poll_s = poll_s
        self.events = EventLog(self.state_dir)  # logs/controller.log and logs/<job id>.log
        self.lock = threading.RLock()
        self.store = JobStore(self.state_dir)
        self.started_at = time.time()
        node_id = ray.get_runtime_context().get_node_id()
        self.controller = new_controller(self.store, capacity, self._say, queues=default_queues(self._say),
                                         detached=True, namespace=NAMESPACE,
                                         node_id=node_id, ray_storage=os.path.join(self.state_dir, "ray_results"))
        self._say(f"controller started (pid {os.getpid()}, state in {self.state_dir})")
        with self.lock:
            self.controller.recover()
        self.thread = threading.Thread(target=self._loop, name="orch-controller-loop", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------------------------- logs
    def _say(self, msg: str) -> None:
        self.events.write(msg)

    def _loop(self) -> None:
        while True:
            polls: list = []
            try:
                with self.lock:
                    ids = [r.id for r in self.store.list() if not r.state.terminal]
                    if ids:
                        self.controller.step(ids)
                    polls = self.controller.polls()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad step; the log says why
                self._say("controller step failed:\n" + traceback.format_exc())
            try:
                self.controller.wait(self.poll_s, polls)  # (unlocked: commands go on meanwhile)
            except Exception:  # noqa: BLE001 - a runner gone between two passes: the next pass says so
                time.sleep(self.poll_s)

    # ---------------------------------------------------------------------------------- calls
    def ping(self) -> dict:
        return {"pid": os.getpid(), "state_dir": self.state_dir, "started_at": self.started_at,
                "layout": CONTROLLER_LAYOUT}

    @_answer
    def submit(self, job_dicts: list[dict], after: list[str], owner: dict | None = None) -> list[str]:
        """`owner`: {"user", "queue"} as the submitter gave them."""
        jobs = [job_config_from_dict(d) for d in job_dicts]
        preflight(jobs)
        records = self.controller.submit(jobs, after=list(after), **(owner or {}))
        self._said_submitted(records)
        return [r.id for r in records]

    @_answer
    def submit_sweep(self, pipelines: list[list[dict]], after: list[str], sweep: dict,
                     owner: dict | None = None) -> list[list[str]]:
        """A sweep's pipelines (one per combination of its overrides), all or none."""
        jobs = [[job_config_from_dict(d) for d in p] for p in pipelines]
        for p in jobs:
            preflight(p)
        out = self.controller.submit_sweep(jobs, after=list(after), sweep=sweep, **(owner or {}))
        for records in out:
            self._said_submitted(records)
        return [[r.id for r in records] for records in out]

    def _said_submitted(self, records) -> None:
        for r in records:
            deps = f" after {', '.join(r.depends_on)}" if r.depends_on else ""
            sweep = f", sweep {r.sweep['id']}: {' '.join(r.sweep['overrides'])}" if r.sweep else ""
            self._say(f"{r.id}: submitted by {r.user or '?'} to queue {r.queue} ({r.kind}, {r.workers} workers, "
                      f"priority {r.priority}{sweep}){deps}")

    @_answer
    def set_queues(self, config: dict) -> dict:
        """`orch queue set`: the queues in force from the next decision on."""
        return to_dict(self.controller.set_queues(config))

    @_answer(locked=False)
    def queues(self) -> dict:
        """`orch queue`: each queue's quota, use and share; why each waiting job waits."""
        return self.controller.queue_report()

    @_answer
    def retry(self, job_id: str) -> dict:
        return self.controller.retry(job_id).to_json()

    @_answer(locked=False)
    def status(self, job_id: str | None = None) -> list[dict]:
        records = [self.store.get(job_id)] if job_id else self.store.list()
        return [r.to_json() for r in records]

    @_answer
    def cancel(self, job_id: str, now: bool = False) -> dict:
        return self.controller.cancel(job_id, now=now).to_json()

    @_answer
    def scale(self, job_id: str, workers: int) -> dict:
        return self.controller.scale(job_id, workers).to_json()

    @_answer(locked=False)
    def nodes(self) -> list[dict]:
        """`orch nodes`: the nodes quarantined now (orchestrator.jobs.quarantine)."""
        return self.controller.quarantined()

    @_answer
    def release_node(self, name: str) -> dict:
        """`orch nodes release NODE`: the node takes workers again."""
        return self.controller.release_node(name)

    @_answer(locked=False)
    def logs(self, job_id: str, offset: int = 0) -> dict:
        """The job's events from byte `offset` of its event file on, and where to read next."""
        record = self.store.get(job_id)
        text, offset = read_events(self.state_dir, job_id, offset)
        return {"text": text, "offset": offset, "terminal": record.state.terminal, "state": record.state.value,
                "record": record.to_json()}


def default_queues(say):
    """The queues until `orch queue set` stores others: conf/'s `queues` group as composed by default
    (queues=default); the built-in single unlimited queue if conf/ cannot be composed here."""
    try:
        return compose_root().queues
    except OrchError as e:
        say(f"conf/ queues could not be composed ({e}); one queue 'default' without quota until `orch queue set`")
        return None


def start_controller(state_dir: str):
    """Create the controller actor (detached, restarted forever, on the head node)."""
    cls = ray.remote(ControllerService)
    return cls.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=3, max_concurrency=32, num_cpus=0,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(state_dir)
