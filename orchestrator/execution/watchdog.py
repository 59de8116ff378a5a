"""The job runner's watchdog: from every rank's heartbeat (`orchestrator.train.heartbeat`) to a
named stall. Pure: the caller passes the time (the runner's clock, at which each beat arrived), so
the tests step it with a fake clock.

Progress is any rank entering a new phase or step. No progress anywhere for the stall timeout is a
**stall**; the timeout is `trainer.stall_timeout_s`, or else the larger of `trainer.stall_floor_s`
and `trainer.stall_factor` x the job's median step time (a job whose steps take minutes is not
hung after one), and at least `checkpoint.commit_timeout_s` while a rank saves a checkpoint (a
40-minute save of a large model is no hang). The ranks to blame are those that went silent (a
stopped process, a wedged interpreter: their heartbeat thread stopped too), else those behind the
step and phase the others wait in.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from orchestrator.train.heartbeat import CHECKPOINT, DONE, PHASES, Beat

STEP_TIMES_KEPT = 200  # the median step time is over the job's last this many (rank, step) times


@dataclass(frozen=True)
class StallPolicy:
    """When no progress is a stall (trainer.stall_*; checkpoint.commit_timeout_s)."""

    timeout_s: float | None  # fixed; None: max(floor_s, factor x median step time)
    floor_s: float
    factor: float
    checkpoint_timeout_s: float  # while a rank saves a checkpoint, at least this
    silence_s: float  # a rank whose last beat is older than this is silent (a few heartbeat intervals)

    def timeout(self, median_step_s: float | None, saving: bool) -> float:
        base = self.timeout_s if self.timeout_s is not None else max(self.floor_s, self.factor * (median_step_s or 0.0))
        return max(base, self.checkpoint_timeout_s) if saving else base


@dataclass(frozen=True)
class RankSeen:
    """What the watchdog knows of one rank at a stall."""

    rank: int
    node: str
    node_id: str
    pid: int
    step: int
    phase: str
    quiet_s: float  # seconds since its last beat arrived
    in_phase_s: float  # seconds since it entered its phase (the runner's clock)


@dataclass(frozen=True)
class Stall:
    group: str
    stuck: tuple[RankSeen, ...]  # the ranks to blame (all of them when none is behind the others)
    waiting: tuple[RankSeen, ...]  # the others
    missing: tuple[int, ...]  # ranks never heard of in this group
    idle_s: float  # seconds without progress
    timeout_s: float

    silence_s: float = 0.0  # (the policy's: a rank quieter than this is silent)

    @property
    def ranks(self) -> tuple[RankSeen, ...]:
        return tuple(sorted(self.stuck + self.waiting, key=lambda r: r.rank))

    @property
    def step(self) -> int:
        """The step the job was at: the furthest rank's (a silent rank's last beat may be older)."""
        return max(r.step for r in self.ranks)

    def line(self) -> str:
        """`rank 1 on node 10.0.0.3 stopped in forward/backward of step 371; ranks 0, 2, 3 waited in
        collective of step 371 for 94 s`; a silent rank: `... went silent (last heartbeat 95 s ago, in
        forward/backward of step 371)` (its last beat may be up to a heartbeat interval old)."""
        parts = [f"{_ranks(g)} on node {g[0].node} " + (
                 f"went silent (last heartbeat {g[0].quiet_s:.0f} s ago, in {g[0].phase} of step {g[0].step})"
                 if g[0].quiet_s > self.silence_s else f"stopped in {g[0].phase} of step {g[0].step}")
                 for g in _grouped(self.stuck)]
        parts += [f"{_ranks(g)} waited in {g[0].phase} of step {g[0].step} for {g[0].in_phase_s:.0f} s"
                  for g in _grouped(self.waiting, by_node=False)]
        if self.missing:
            parts.append(f"rank {', '.join(map(str, self.missing))} never reported")
        return (f"no progress for {self.idle_s:.0f} s (stall timeout {self.timeout_s:.0f} s): " + "; ".join(parts))


def _ranks(group: list[RankSeen]) -> str:
    return ("rank " if len(group) == 1 else "ranks ") + ", ".join(str(r.rank) for r in group)


def _grouped(ranks: tuple[RankSeen, ...], by_node: bool = True) -> list[list[RankSeen]]:
    """Ranks with the same (node,) step and phase, together, in rank order."""
    out: dict[tuple, list[RankSeen]] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        out.setdefault((r.node if by_node else "", r.step, r.phase), []).append(r)
    return list(out.values())


def _order(r: RankSeen) -> tuple[int, int]:
    return r.step, PHASES.index(r.phase) if r.phase in PHASES else len(PHASES)


class Watchdog:
    """Fed every beat as it arrives (`beat`), asked every second or so (`check`). Watches one worker
    group at a time: a beat of a new group starts watching it; `disarm` (the group ended or is
    being restarted, or its stall was handled) stops until the next group's first beat."""

    def __init__(self, policy: StallPolicy):
        self.policy = policy
        self.group: str | None = None
        self.armed = False
        self.latest: dict[int, tuple[Beat, float, float]] = {}  # rank -> (beat, arrived, phase entered)
        self.progress_at = 0.0
        self.step_times: deque[float] = deque(maxlen=STEP_TIMES_KEPT)
        self.ended: set[str] = set()  # groups no longer watched (their late beats are ignored)

    def beat(self, b: Beat, now: float) -> None:
        if b.group != self.group:
            if b.group in self.ended:
                return  # a late beat of a group already handled
            self.group, self.armed, self.latest, self.progress_at = b.group, True, {}, now
        prev = self.latest.get(b.rank)
        moved = prev is None or (prev[0].step, prev[0].phase, prev[0].phase_since) != (b.step, b.phase, b.phase_since)
        if moved:
            self.progress_at = now
            if prev is not None and b.step != prev[0].step and b.step_time_s:
                self.step_times.append(b.step_time_s)
        self.latest[b.rank] = (b, now, now if moved else prev[2])

    def disarm(self) -> None:
        """Stop watching the current group (it ended, is restarted, or its stall was handled)."""
        if self.group is not None:
            self.ended.add(self.group)
        self.armed = False

    def last_seen(self) -> tuple[dict[int, int], dict[int, str]]:
        """Each rank's step in progress and node, in the group watched last (from its last beat)."""
        return {r: v[0].step for r, v in self.latest.items()}, {r: v[0].node for r, v in self.latest.items()}

    def node_ids(self) -> dict[int, str]:
        """Each rank's Ray node id, in the group watched last (the quarantine blames nodes by it)."""
        return {r: v[0].node_id for r, v in self.latest.items()}

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    def check(self, now: float) -> Stall | None:
        """A stall of the current group, or None."""
        if not self.armed or not self.latest:
            return None
        watched = {r: v for r, v in self.latest.items() if v[0].phase != DONE}
        if not watched:
            return None
        saving = any(b.phase == CHECKPOINT for b, _, _ in watched.values())
        timeout = self.policy.timeout(self.median_step_s(), saving)
        idle = now - self.progress_at
        if idle < timeout:
            return None
        seen = [RankSeen(b.rank, b.node, b.node_id, b.pid, b.step, b.phase, now - at, now - entered)
                for b, at, entered in watched.values()]
        silent = [r for r in seen if r.quiet_s > self.policy.silence_s]
        if silent and len(silent) < len(seen):
            stuck = silent
        else:
            low = min(_order(r) for r in seen)
            stuck = [r for r in seen if _order(r) == low]
        world = next(iter(watched.values()))[0].world_size
        missing = tuple(r for r in range(world) if r not in self.latest)
        waiting = [r for r in seen if r not in stuck]
        return Stall(self.group, tuple(stuck), tuple(waiting), missing, idle, timeout, self.policy.silence_s)
