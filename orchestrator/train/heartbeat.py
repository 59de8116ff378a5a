"""Every rank's heartbeat: which step and phase it is in, sent to the job's runner off the training
thread, so that a rank that stops without crashing (a wedged collective, a hung filesystem call, a
process stopped by a signal) is seen and named by the runner's watchdog
(`orchestrator.execution.watchdog`).

The training thread only sets `phase(...)` and `stepped(...)`: two attribute writes, no lock, no
call out of the process. A daemon thread sends the latest state to the runner actor every
`trainer.heartbeat_interval_s`, fire-and-forget (an actor call is a message on Ray's own RPC, which
reaches the runner on whichever node it lives: no shared filesystem, no port of our own). A process
that is stopped, or whose interpreter is wedged, stops beating: that silence is itself the signal.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

# The phases a rank reports, in the order a step goes through them (the watchdog compares ranks by
# (step, phase order) to name the rank the others wait for).
DATA, FORWARD_BACKWARD, OPTIMIZER_STEP, COLLECTIVE, EVAL, CHECKPOINT = (
    "data", "forward/backward", "optimizer step", "collective", "eval", "checkpoint save")
PHASES = (DATA, FORWARD_BACKWARD, OPTIMIZER_STEP, COLLECTIVE, EVAL, CHECKPOINT)
DONE = "done"  # the rank left its loop (its last beat): not watched any more


@dataclass(frozen=True)
class Beat:
    """One rank's state, as its heartbeat thread sends it. Plain data: no Ray, no torch."""

    group: str  # the worker group (the name its logs and hang dumps are filed under)
    rank: int
    world_size: int
    node: str  # the node's IP address
    node_id: str  # Ray's node id (where the runner runs py-spy and signals the process)
    pid: int
    step: int  # the optimizer step in progress (1-based; the last one during the final eval and save)
    phase: str  # one of PHASES: what the rank is doing now
    phase_since: float  # wall-clock time the rank entered this phase
    step_time_s: float | None  # the last step's wall time on this rank (None before the first)
    sent: float  # wall-clock time of sending


class Heartbeat:
    """The rank's current step and phase (set by the training thread), and the thread that sends them."""

    def __init__(self, runner, ident: dict, interval_s: float):
        self.runner, self.interval_s = runner, interval_s
        self.ident = ident  # group, rank, world_size, node, node_id, pid (Beat's fields that never change)
        self.step, self.current, self.since, self.step_time_s = 0, DATA, time.time(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orch-heartbeat", daemon=True)

    @classmethod
    def of_this_worker(cls, runner, group: str, rank: int, world_size: int, interval_s: float) -> Heartbeat:
        """The heartbeat of this Ray worker process (its node and pid from Ray)."""
        import ray

        ident = dict(group=group, rank=rank, world_size=world_size, node=ray.util.get_node_ip_address(),
                     node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid())
        return cls(runner, ident, interval_s)

    def start(self, step: int) -> Heartbeat:
        self.step = step
        if self.runner is not None:
            self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """The training thread enters phase `name` (one of PHASES)."""
        self.current, self.since = name, time.time()

    def stepped(self, step: int, step_time_s: float) -> None:
        self.step, self.step_time_s = step, step_time_s

    def beat(self) -> Beat:
        return Beat(**self.ident, step=self.step, phase=self.current, phase_since=self.since,
                    step_time_s=self.step_time_s, sent=time.time())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.runner.heartbeat.remote(self.beat())  # not waited for
            except Exception:  # noqa: BLE001 - the runner is gone: Ray Train ends this group
                pass

    def close(self) -> None:
        """Stop beating, with a last beat that says the rank is done (the watchdog stops watching it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.phase(DONE)
            try:
                self.runner.heartbeat.remote(self.beat())
            except Exception:  # noqa: BLE001 - the runner is gone
                pass
