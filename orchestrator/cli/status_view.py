"""What `orch status` shows: one row per job (state, step/total, loss, tokens/s, MFU, workers,
restarts, elapsed, ETA), pipelines as trees of their jobs in dependency order.

`job_row` is a pure function of a job record and the clock; `status_table` lays the rows out as a
rich Table, printed as it is on a terminal and as plain aligned text otherwise (rich writes no
escape codes to a pipe). rich is imported inside the functions that draw: `orch --help` stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from orchestrator.jobs.lifecycle import straggler_line
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

PLAIN_WIDTH = 240  # columns of the plain table (a pipe has no width; rich would wrap at 80)


def fmt_duration(seconds: float | None) -> str:
    """12s, 4m05s, 2h03m, 3d04h; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_rate(per_s: float | None) -> str:
    """Tokens per second: 950, 12.3k, 4.56M."""
    if not isinstance(per_s, (int, float)):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= div:
            return f"{per_s / div:.3g}{unit}"
    return f"{per_s:.0f}"


def eta_seconds(step: int | None, max_steps: int | None, step_time_s: float | None) -> float | None:
    """The time left at the recent step rate (the last log interval's mean step time)."""
    if not (isinstance(step, int) and isinstance(max_steps, int) and isinstance(step_time_s, (int, float))):
        return None
    return max(max_steps - step, 0) * step_time_s


def job_row(r: JobRecord, now: float | None = None) -> dict:
    """The status of one job as plain values: what the table shows and `--json` adds."""
    now = time.time() if now is None else now
    m = r.metrics
    max_steps = (r.config.get("trainer") or {}).get("max_steps")
    started, ended = r.started_at(), r.ended_at()
    workers = str(m.get("world_size") or r.workers) if r.state.active else str(r.workers)
    if r.config.get("max_workers"):
        workers = f"{workers} ({r.workers}-{r.config['max_workers']})"
    running = r.state.active and m.get("step") is not None
    return {
        "max_steps": max_steps,
        "started_at": started,
        "finished_at": ended,
        "elapsed_s": (ended or now) - started if started is not None else None,
        "eta_s": eta_seconds(m.get("step"), max_steps, m.get("step_time_s")) if running else None,
        "tokens_per_s": m.get("tokens_per_s") if r.state.active or r.state.terminal else None,
        "mfu": m.get("mfu"),
        "workers_shown": workers,
    }


def dependency_order(jobs: list[JobRecord]) -> list[JobRecord]:
    """A pipeline's jobs, each after the jobs of the same pipeline it depends on (submission order
    among the rest; a cycle, which submit refuses, keeps submission order)."""
    jobs = sorted(jobs, key=lambda j: j.seq)
    ids = {j.id for j in jobs}
    placed: list[JobRecord] = []
    done: set[str] = set()
    while len(placed) < len(jobs):
        ready = [j for j in jobs if j.id not in done and all(d in done or d not in ids for d in j.depends_on)]
        ready = ready[:1] or [next(j for j in jobs if j.id not in done)]
        placed.append(ready[0])
        done.add(ready[0].id)
    return placed


def pipelines(records: Iterable[JobRecord]) -> list[tuple[str, list[JobRecord]]]:
    """(pipeline id, its jobs in dependency order), pipelines in the order they were submitted."""
    groups: dict[str, list[JobRecord]] = {}
    for r in sorted(records, key=lambda j: j.seq):
        groups.setdefault(r.pipeline_id, []).append(r)
    return [(pid, dependency_order(jobs)) for pid, jobs in groups.items()]


def _num(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


_STATE_STYLE = {JobState.RUNNING: "green", JobState.SUCCEEDED: "bold green", JobState.FAILED: "bold red",
                JobState.CANCELLED: "yellow", JobState.BLOCKED: "red", JobState.RESTARTING: "magenta",
                JobState.STARTING: "cyan", JobState.QUEUED: "blue", JobState.PENDING: "dim",
                JobState.PREEMPTED: "yellow"}
COLUMNS = ("JOB", "STATE", "STEP", "LOSS", "TOK/S", "MFU", "WORKERS", "RESTARTS", "ELAPSED", "ETA")


def status_table(records: list[JobRecord], now: float | None = None, width: int | None = None):
    """A rich Table: per pipeline, a line with its id, then its jobs as the branches of a tree.
    `width`: the terminal's; only the JOB column gives way to it (ids cut short, never numbers)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    lines: list[list] = []
    for pid, jobs in pipelines(records):
        own = {j.id for j in jobs}
        outside = sorted({d for j in jobs for d in j.depends_on if d not in own})  # `orch submit --after`
        head = Text(pid, style="bold")
        if outside:
            head.append(f"  (after {', '.join(outside)})", style="dim")
        lines.append([head])
        for i, r in enumerate(jobs):
            row, m = job_row(r, now), r.metrics
            branch = "└─ " if i == len(jobs) - 1 else "├─ "
            step = f"{m['step']}/{row['max_steps'] or '?'}" if m.get("step") is not None else "-"
            mfu = f"{row['mfu'] * 100:.1f}%" if isinstance(row["mfu"], (int, float)) else "-"
            lines.append([Text(branch + r.id), Text(r.state.value, style=_STATE_STYLE[r.state]),
                          step, _num(m.get("loss"), ".4f"), fmt_rate(row["tokens_per_s"]), mfu, row["workers_shown"],
                          str(r.restarts), fmt_duration(row["elapsed_s"]), fmt_duration(row["eta_s"])])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    widest = [max([len(name)] + [len(str(line[i])) for line in lines if len(line) > i])
              for i, name in enumerate(COLUMNS)]
    room = None if width is None else max(8, width - sum(widest[1:]) - 2 * (len(COLUMNS) - 1))
    table.add_column(COLUMNS[0], no_wrap=True, overflow="ellipsis", max_width=room)
    for name, w in zip(COLUMNS[1:], widest[1:]):
        table.add_column(name, no_wrap=True, min_width=w, justify="left" if name == "STATE" else "right")
    for line in lines:
        table.add_row(*line)
    return table


RESTARTS_SHOWN = 5  # the restart ledger lines under the table, per job (`--json`: all of them)


def restart_line(n: int, e: dict) -> str:
    """One entry of a job's restart ledger (JobRecord.restart_log): `restart 1 at 19:40:29: stall of
    rank 1 on 10.0.0.3 at step 38, resumed from step 25 (13 steps, 14s lost)`."""
    who = "".join([f" of rank {', '.join(map(str, e['ranks']))}" if e.get("ranks") else "",
                   f" on {', '.join(e['nodes'])}" if e.get("nodes") else ""])
    resumed = ("; not resumed (its group failed first)" if e.get("resumed_from_step") is None else
               f", resumed from step {e['resumed_from_step']} ({e['steps_lost']} steps, "
               f"{fmt_duration(e['seconds_lost'])} lost)")
    at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
    return f"restart {n} at {at}: {e['class']}{who} at step {e.get('failed_at_step')}{resumed}"


def restart_lines(r: JobRecord) -> list[str]:
    """The job's last restarts (when, class, ranks and nodes, the step it failed at and resumed
    from, what was lost), its stragglers and its last stall with where its stacks are."""
    first = max(0, len(r.restart_log) - RESTARTS_SHOWN)
    lines = [f"{r.id}: {restart_line(n, e)}" for n, e in enumerate(r.restart_log[first:], start=first + 1)]
    latest = {d["rank"]: d for d in r.stragglers}  # (the last report of each rank)
    lines += [f"{r.id}: {straggler_line(d)}" for d in sorted(latest.values(), key=lambda d: d["at"])[-RESTARTS_SHOWN:]]
    lines += [f"{r.id}: {line}" for line in preemption_lines(r.history)[-RESTARTS_SHOWN:]]
    stall = next((f for f in reversed(r.failures) if f.get("class") == "stall"), None)
    if stall is not None:
        lines.append(f"{r.id}: last stall: {stall.get('line')} (every rank's stacks: {stall.get('dumps')})")
    return lines


def preemption_lines(history: Sequence[dict]) -> list[str]:
    """Each time the job was preempted (a PREEMPTED entry of its history): `preempted 1 at 19:40:29:
    preempted for p7c1e2d after a checkpoint (.../step-75)`."""
    entries = [h for h in history if h.get("state") == JobState.PREEMPTED.value]
    return [f"preempted {n} at {time.strftime('%H:%M:%S', time.localtime(h['at']))}: {h.get('reason', '')}"
            for n, h in enumerate(entries, start=1)]


def failures(records: list[JobRecord]):
    """The one-line failure reasons under the table, then each job's restarts and last stall (rich
    Text: reasons may hold [brackets])."""
    from rich.text import Text

    return ([Text(f"{r.id}: {r.failure_reason}") for r in records if r.failure_reason]
            + [Text(line) for r in records for line in restart_lines(r)])


def console(file=None, terminal: bool | None = None):
    """A rich Console: a terminal's own width and colours, else plain text PLAIN_WIDTH wide."""
    import sys

    from rich.console import Console

    file = file or sys.stdout
    terminal = file.isatty() if terminal is None else terminal
    return Console(file=file, force_terminal=terminal, width=None if terminal else PLAIN_WIDTH,
                   highlight=False, soft_wrap=False, emoji=False)


def show(view: Callable[[int | None], object], file=None) -> None:
    """Print `view(width)`: as rich draws it on a terminal (its width), else as plain lines without
    trailing blanks."""
    out = console(file)
    renderable = view(out.width if out.is_terminal else None)
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()), file=out.file, flush=True)


def status_view(records: list[JobRecord], header: Sequence[str] = (), now: float | None = None,
                width: int | None = None):
    """Everything one refresh of `orch status` prints, as one rich renderable."""
    from rich.console import Group
    from rich.text import Text

    return Group(*(Text(h) for h in header), status_table(records, now, width), *failures(records))
