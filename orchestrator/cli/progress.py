"""Progress bars with rate and ETA for `orch run` (each job's steps) and `orch data prepare` (the
parts tokenized) on a terminal, drawn by rich; on a pipe (tests, CI, logs) the plain timestamped
lines alone, as before. rich is imported only when a terminal is there to draw on.
"""

from __future__ import annotations

import sys
import time


def stamp(msg: str) -> str:
    return f"[orch {time.strftime('%H:%M:%S')}] {msg}"


class ConsoleProgress:
    """`say(line)` prints a timestamped line (above the bars on a terminal); `bar(key, ...)` draws
    or moves a bar, on a terminal only. A context manager: the bars stop on exit."""

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.progress = None
        self.tasks: dict[str, int] = {}
        if self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), TextColumn("{task.fields[detail]}"))

    def __enter__(self) -> ConsoleProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, msg: str) -> None:
        if self.progress is not None:
            from rich.text import Text

            self.progress.console.print(Text(stamp(msg)))
        else:
            print(stamp(msg), flush=True)

    def bar(self, key: str, description: str, completed: float, total: float | None, unit: str = "",
            detail: str = "") -> None:
        """The bar `key` at `completed` of `total` (None: not known yet). Nothing off a terminal."""
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, completed=completed, unit=unit,
                                                     detail=detail)
        else:
            self.progress.update(self.tasks[key], description=description, completed=completed, total=total,
                                 detail=detail)

    def jobs(self, records) -> None:
        """One bar per job of `orch run`: its steps of trainer.max_steps, its state and last loss."""
        if self.progress is None:
            return
        for r in records:
            m = r.metrics
            loss = f"loss {m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else ""
            self.bar(r.id, f"{r.id} {r.state.value:<10}", m.get("step") or 0,
                     (r.config.get("trainer") or {}).get("max_steps"), "steps", loss)
