"""Stragglers: a rank persistently slower than the others. Pure: fed each logged interval's compute
time per rank, it says which rank to report, once, until it keeps up again.

A rank's compute time is the time of its forward passes in a step: under ZeRO-1 and ZeRO-2 a forward
pass holds no collective, so a rank never waits there for a slower one (under ZeRO-3 the parameter
all-gathers are inside it: still comparable, less exact). Every rank waits for the slowest one in
the gradient reduction and the step's vote, so the step time alone cannot tell who is slow.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

MAX_RANK_COLUMNS = 64  # up to this world size, each rank's compute time is a metric of its own (W&B)


@dataclass(frozen=True)
class Straggler:
    """A rank slower than the median rank by `ratio` over the window (rank 0's report to the runner)."""

    rank: int
    ratio: float  # its mean compute time over the window / the median of the other ranks'
    step: int  # the step at which it was found
    window: int  # logged intervals it was slower in


class StragglerDetector:
    """Flags a rank whose mean compute time over the last `window` logged intervals is at least
    `factor` times the median of the other ranks' (over the same intervals), and was so in more than
    half of them: persistently, not one long pause. A rank is reported once until it keeps up."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.recent: deque[list[float]] = deque(maxlen=window)  # per interval: compute time per rank
        self.flagged: set[int] = set()

    @staticmethod
    def ratios(compute_s: list[float]) -> list[float]:
        """Each rank's compute time over the median of the other ranks' (with two ranks: the other's)."""
        out = []
        for r, c in enumerate(compute_s):
            median = statistics.median(compute_s[:r] + compute_s[r + 1:])
            out.append(c / median if median > 0 else 1.0)
        return out

    def add(self, step: int, compute_s: list[float]) -> list[Straggler]:
        """One logged interval's compute time per rank; the stragglers newly found."""
        if len(compute_s) < 2:
            return []
        if self.recent and len(self.recent[-1]) != len(compute_s):
            self.recent.clear()  # another world size: start again
        self.recent.append(list(compute_s))
        if len(self.recent) < self.window:
            return []
        world = len(compute_s)
        slow_in = [0] * world  # intervals each rank was slow in
        for c in self.recent:
            for r, x in enumerate(self.ratios(c)):
                slow_in[r] += x >= self.factor
        ratios = self.ratios([statistics.fmean(c[r] for c in self.recent) for r in range(world)])
        slow = {r for r in range(world) if ratios[r] >= self.factor and 2 * slow_in[r] > self.window}
        found = [Straggler(r, round(ratios[r], 2), step, self.window) for r in sorted(slow - self.flagged)]
        self.flagged = slow
        return found


class ForwardTimer:
    """This rank's forward time: wall time on a CPU; CUDA events on a GPU, where a launch returns
    before its kernels ran (read at a logged step only, after one wait for the last event)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.total, self.pending, self.began = 0.0, [], None

    def start(self) -> None:
        if self.cuda:
            import torch

            self.began = torch.cuda.Event(enable_timing=True)
            self.began.record()
        else:
            self.began = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self.began, end))
        else:
            self.total += time.perf_counter() - self.began

    def take(self) -> float:
        """Seconds of forward passes since the last take."""
        if self.pending:
            self.pending[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.pending) / 1000.0
            self.pending = []
        total, self.total = self.total, 0.0
        return total
