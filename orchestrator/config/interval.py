"""When to checkpoint: every N steps, every T seconds, or by the Young/Daly formula.

Young (1974) and Daly (2006): with a checkpoint costing δ seconds of training and failures every
M seconds on average, the interval that loses the least time is about sqrt(2 δ M).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
AUTO_FIRST_S = 60.0  # interval=auto: the first checkpoint (which measures δ) comes after this much training


@dataclass(frozen=True)
class Interval:
    kind: str  # "steps" | "seconds" | "auto" | "final" (only the final checkpoint)
    amount: float = 0.0


def parse_interval(value) -> Interval:
    """`checkpoint.interval`: an int of steps (0: final only), "<n>s|m|h", or "auto"."""
    if isinstance(value, bool):
        raise ValueError(f"interval={value!r}: use a number of steps, a duration like '10m', or 'auto'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"interval={value} must be >= 0 steps; use a number of steps (e.g. 500), "
                             f"a duration ('10m') or 'auto'")
        return Interval("steps", value) if value else Interval("final")
    text = str(value).strip().lower()
    if text == "auto":
        return Interval("auto")
    if text.isdigit():
        return parse_interval(int(text))
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"interval={value!r}: use a number of steps (e.g. 500), "
                         f"a duration ('90s', '10m', '2h') or 'auto'")
    return Interval("seconds", float(m.group(1)) * _UNITS[m.group(2)])


def young_daly_s(blocking_s: float, mtbf_s: float) -> float:
    """The checkpoint interval (seconds) that minimises expected lost time: sqrt(2 δ M)."""
    return math.sqrt(2.0 * max(blocking_s, 1e-3) * mtbf_s)


class CheckpointSchedule:
    """Decides, step by step, whether a checkpoint is due (the same answer on every rank: the
    time-based kinds are agreed by the caller with a collective)."""

    def __init__(self, interval: Interval, mtbf_s: float):
        self.interval, self.mtbf_s = interval, mtbf_s
        self.seconds = interval.amount if interval.kind == "seconds" else AUTO_FIRST_S
        self.reason = ""

    def due(self, step: int, seconds_since_last: float) -> bool:
        if self.interval.kind == "final":
            return False
        if self.interval.kind == "steps":
            return step % int(self.interval.amount) == 0
        return seconds_since_last >= self.seconds

    def measured(self, blocking_s: float) -> None:
        """After a save: interval=auto re-derives the interval from its measured blocking time."""
        if self.interval.kind == "auto":
            self.seconds = young_daly_s(blocking_s, self.mtbf_s)
            self.reason = (f"checkpoint interval auto: sqrt(2 x {blocking_s:.3f} s blocking "
                           f"x {self.mtbf_s:.0f} s MTBF) = {self.seconds:.0f} s")
