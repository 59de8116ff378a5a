"""`orch report JOB|PIPELINE`: what a job (or each job of a pipeline) did, as PNG plots and one
self-contained HTML page (the plots embedded as data URIs: no network, no script), made from the
jobs' records and their metrics history in the store (orchestrator.train.history).

    <out>/index.html          the page: a summary table (one column per job), then each job's plots
    <out>/<job>-loss.png      train and eval loss against step and against tokens
    <out>/<job>-training.png  learning rate, throughput, MFU, data wait

Restarts, resizes and scale changes are vertical lines at the step training resumed from;
checkpoints are ticks on the step axis. The page says how each number of the table is computed
(`HOW` below). Everything shown of a record is passed through `tracking.redact` first.

Pure parts (`summarize`, `attempt_changes`, `plot_job`, `render_html`) take plain rows and record
dicts; `write_report` reads the histories through the function it is given (the CLI's
`metrics_history`, which opens the job's store from its record).
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.cli.status_view import preemption_lines, restart_line
from orchestrator.errors import ReportError
from orchestrator.execution.tracking import redact
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

# What starts a new worker group, as marked on the curves: (colour, line style, legend label).
CHANGES = {
    "restart": ("#d62728", "--", "restart after a failure (resumed from this step)"),
    "resize": ("#ff7f0e", "-.", "elastic resize (resumed from this step)"),
    "scale": ("#9467bd", ":", "orch scale (resumed from this step)"),
    "resume": ("#8c564b", "--", "continued by orch run --resume / orch retry (from this step)"),
    "unknown": ("#7f7f7f", "--", "new worker group (reason unknown)"),
}
CHECKPOINT = ("#2ca02c", "checkpoint committed")
TRAIN, EVAL = "#1f77b4", "#e377c2"

HOW = [
    ("wall time", "from the job's admission (STARTING) to its end in the job record; for a job still running, "
                  "to now; for a job retried or resumed, of its latest run (from its admission after the retry); "
                  "without those times, the span of its metrics history."),
    ("GPU-/CPU-hours", "the sum over the job's wall time of workers x devices per worker (GPUs, or CPUs when "
                       "the job uses none) x time; the number of workers is the world size of the metrics row "
                       "that ends each interval."),
    ("restarts after failures", "the job record's count of worker-group failures; a group killed before it logged a "
                                "row that survives (all its steps were trained again) has no line on the curves."),
    ("time lost to failures", "for each restart after a failure: the wall time from the last metrics row at or "
                              "before the step it resumed from to the restarted group's first row, less the time "
                              "that group spent on the steps in between (its own step time). That is the work "
                              "after the last checkpoint that was thrown away, plus detecting the failure and "
                              "starting the new group. Resizes and scale changes are counted the same way, apart."),
    ("held-out QA exact match", "the last score in the job's metrics history: questions of the QA task the job never "
                                "trained on, answered exactly by greedy decoding after training. The chart "
                                "\"Compared\" draws two or more jobs of one kind (a fine-tune from the pretrained "
                                "weights and its from-scratch baseline) on one set of axes."),
    ("throughput, MFU, data wait", "medians over the logged rows (each row averages the steps since the "
                                   "previous one); MFU needs the device's peak FLOPs "
                                   "(cluster.peak_flops_per_device on CPUs)."),
]


@dataclass
class JobReport:
    """One job of the report: its record (redacted, as a dict), its rows, or why it has none."""

    record: dict
    rows: list[dict] = field(default_factory=list)
    attempts: dict = field(default_factory=dict)  # the history's {attempt: step it resumed from}
    error: str | None = None  # the store could not be read
    summary: dict = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG


# ------------------------------------------------------------------------------ pure summaries
def attempt_changes(rows: list[dict]) -> list[dict]:
    """Each new worker group after the first, from the markers on the rows: {"kind", "from_step"
    (the step it resumed from), "step" (its first row), "world_size", "was" (the world size
    before), "lost_s" (see HOW)}."""
    out = []
    for i, row in enumerate(rows):
        for ev in row.get("events") or []:
            kind = ev.get("kind")
            if kind in ("start", "checkpoint", "startup", None):  # (startup: a group's start-up times)
                continue
            kind = kind if kind in CHANGES else "unknown"
            start = int(ev.get("from_step", row["step"]))
            before = [r for r in rows[:i] if r["step"] <= start and "time" in r]
            lost = None
            if before and "time" in row:
                step_time = (row.get("metrics") or {}).get("perf/step_time_s") or 0.0
                redone = row["step"] - before[-1]["step"]
                lost = max(0.0, row["time"] - before[-1]["time"] - redone * step_time)
            out.append({"kind": kind, "from_step": start, "step": row["step"],
                        "world_size": ev.get("world_size", row.get("world_size")),
                        "was": rows[i - 1].get("world_size") if i else None, "lost_s": lost})
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r["metrics"][key]) for r in rows if isinstance((r.get("metrics") or {}).get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _devices(record: dict) -> tuple[float, str]:
    """(devices per worker, "GPU" or "CPU") from the record's frozen cluster config."""
    cluster = (record.get("config") or {}).get("cluster") or {}
    gpus = float(cluster.get("gpus_per_worker") or 0)
    return (gpus, "GPU") if gpus > 0 else (float(cluster.get("cpus_per_worker") or 1), "CPU")


def _span(record: dict, rows: list[dict], now: float) -> tuple[float | None, float | None]:
    """(start, end) of the job's latest run (`JobRecord.started_at`/`ended_at`: a retried job's
    since it was admitted again); a record whose history holds no admission, its rows' times."""
    job = JobRecord.from_json(record)
    start, end = job.started_at(), job.ended_at()
    times = [r["time"] for r in rows if "time" in r]
    if start is None and times and not any(JobState(h["state"]) is JobState.STARTING for h in job.history):
        start = times[0]
    if end is None:
        end = now if not job.state.terminal else (times[-1] if times else None)
    return start, end


def device_hours(record: dict, rows: list[dict], now: float) -> float | None:
    """Workers x devices per worker x time, summed over the job's wall time (see HOW)."""
    start, end = _span(record, rows, now)
    timed = [r for r in rows if "time" in r]
    if start is None or end is None or not timed:
        return None
    per, _ = _devices(record)
    total, t = 0.0, start
    for r in timed:
        if r["time"] > t:
            total += (r["time"] - t) * (r.get("world_size") or 1)
            t = r["time"]
    if end > t:
        total += (end - t) * (timed[-1].get("world_size") or 1)
    return total * per / 3600


def summarize(record: dict, rows: list[dict], now: float, attempts: dict | None = None) -> dict:
    """The numbers of the summary table for one job (None where unknown). `attempts`: the
    history's worker groups ({attempt: step it resumed from}), those whose rows were all trained
    again included (the curves cannot show them)."""
    cfg = record.get("config") or {}
    changes = attempt_changes(rows)
    start, end = _span(record, rows, now)
    _, losses = _series(rows, "train/loss")
    eval_steps, evals = _series(rows, "eval/loss")
    _, tokens = _series(rows, "train/tokens")
    sizes = sorted({r.get("world_size") for r in rows if r.get("world_size")})
    per, unit = _devices(record)

    def lost(kinds: Sequence[str]) -> float | None:
        vals = [c["lost_s"] for c in changes if c["kind"] in kinds]
        return sum(v for v in vals if v is not None) if vals else 0.0

    def med(key: str, scale: float = 1.0) -> float | None:
        m = _median(_series(rows, key)[1])
        return None if m is None else m * scale

    return {
        "state": record.get("state"),
        "steps": rows[-1]["step"] if rows else None,
        "max_steps": (cfg.get("trainer") or {}).get("max_steps"),
        "tokens": int(tokens[-1]) if tokens else None,
        "wall_s": (end - start) if start is not None and end is not None else None,
        "workers": sizes or [cfg.get("workers")],
        "devices_per_worker": per, "device": unit,
        "device_hours": device_hours(record, rows, now),
        "groups": len(attempts) if attempts else 1 + len(changes),
        # the record counts every failure; a group that failed before its first row, or whose rows
        # were all trained again, leaves no marker on the curves
        "restarts": max(int(record.get("restarts") or 0), sum(c["kind"] == "restart" for c in changes)),
        "resizes": sum(c["kind"] in ("resize", "scale", "unknown") for c in changes),
        "lost_s": lost(["restart"]),
        "resize_s": lost(["resize", "scale", "unknown"]),
        "checkpoints": sum(e.get("kind") == "checkpoint" for r in rows for e in r.get("events") or []),
        "tokens_per_s": med("perf/tokens_per_s"),
        "mfu": med("perf/mfu"),
        "data_wait": med("perf/data_wait_fraction"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "eval_step": eval_steps[-1] if eval_steps else None,
        **_qa(rows),
        "checkpoint": record.get("checkpoint"),
        "export": record.get("export"),
        "wandb": (record.get("wandb") or {}).get("url") or (record.get("wandb") or {}).get("dir"),
        "failure": record.get("failure_reason"),
    }


def _qa(rows: list[dict]) -> dict:
    """The last held-out QA score in the history (a fine-tune on the QA task logs one after
    training): how many of how many questions answered exactly, at which step."""
    for r in reversed(rows):
        m = r.get("metrics") or {}
        if m.get("eval/qa_questions"):
            return {"qa_correct": int(m["eval/qa_correct"]), "qa_questions": int(m["eval/qa_questions"]),
                    "qa_step": r["step"]}
    return {"qa_correct": None, "qa_questions": None, "qa_step": None}


def dependency_shape(records: list[JobRecord]) -> str:
    """A pipeline's jobs drawn as they depend on each other, in one line: a fan-out `pretrain ->
    finetune, finetune_scratch`, a chain `a -> b -> c`, a diamond `a -> b, c -> d`; the jobs that
    share their dependencies listed together, apart groups separated by "; ", a dependency outside
    the pipeline (`orch submit --after`) by its job id."""
    names = {r.id: r.name for r in records}
    groups: dict[str, list[str]] = {}  # the dependencies, drawn -> the jobs that have exactly those
    for r in records:
        groups.setdefault(", ".join(names.get(d, d) for d in r.depends_on), []).append(r.name)
    chains: list[list[str]] = []
    for deps, jobs in groups.items():
        if deps and chains and chains[-1][-1] == deps:
            chains[-1].append(", ".join(jobs))  # the previous group is exactly what these wait for
        else:
            chains.append(([deps] if deps else []) + [", ".join(jobs)])
    return "; ".join(" -> ".join(c) for c in chains)


def pipeline_total(summaries: list[dict]) -> dict:
    """The pipeline's column: sums (tokens, device-hours, restarts, time lost) and its wall time
    from the first job's start to the last one's end (jobs may overlap or wait for each other)."""
    def total(key):
        vals = [s[key] for s in summaries if s.get(key) is not None]
        return sum(vals) if vals else None

    return {"tokens": total("tokens"), "device_hours": total("device_hours"), "restarts": total("restarts"),
            "groups": total("groups"),
            "resizes": total("resizes"), "lost_s": total("lost_s"), "resize_s": total("resize_s"),
            "checkpoints": total("checkpoints"), "steps": total("steps")}


# ------------------------------------------------------------------------------------- format
def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:g}"


def _num(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" if v >= 0.01 or v == 0 else f"{100 * v:.2g}%"


def table_rows(summaries: list[dict], total: dict | None) -> list[tuple[str, list[str]]]:
    """(label, one cell per job [, the pipeline's]) for the summary table."""
    cols = summaries + ([total] if total else [])

    def row(label, fn):
        return label, [fn(s) for s in cols]

    unit = summaries[0]["device"] if summaries and len({s["device"] for s in summaries}) == 1 else "device"
    return [
        row("state", lambda s: s.get("state") or ""),
        row("steps", lambda s: "-" if s.get("steps") is None else
            f"{s['steps']}" + (f" / {s['max_steps']}" if s.get("max_steps") else "")),
        row("tokens", lambda s: _count(s.get("tokens"))),
        row("wall time", lambda s: _duration(s.get("wall_s"))),
        row("workers x devices", lambda s: "" if "workers" not in s else
            f"{'-'.join(str(w) for w in s['workers'])} x {s['devices_per_worker']:g} {s['device']}"),
        row(f"{unit}-hours", lambda s: _num(s.get("device_hours"), ".4f")),
        row("worker groups started", lambda s: _num(s.get("groups"), "d")),
        row("restarts after failures", lambda s: _num(s.get("restarts"), "d")),
        row("time lost to failures", lambda s: _duration(s.get("lost_s"))),
        row("resizes / scale changes", lambda s: _num(s.get("resizes"), "d")),
        row("time spent resizing", lambda s: _duration(s.get("resize_s"))),
        row("checkpoints committed", lambda s: _num(s.get("checkpoints"), "d")),
        row("tokens/s (median)", lambda s: _count(s.get("tokens_per_s"))),
        row("MFU (median)", lambda s: _percent(s.get("mfu"))),
        row("data wait (median, of step time)", lambda s: _percent(s.get("data_wait"))),
        row("first loss", lambda s: _num(s.get("first_loss"))),
        row("final loss", lambda s: _num(s.get("final_loss"))),
        row("final eval loss", lambda s: "-" if s.get("eval_loss") is None else
            f"{s['eval_loss']:.4f} (step {s['eval_step']})"),
        row("held-out QA exact match", lambda s: "-" if not s.get("qa_questions") else
            f"{s['qa_correct']}/{s['qa_questions']} ({s['qa_correct'] / s['qa_questions']:.0%}, step {s['qa_step']})"),
        row("checkpoint", lambda s: s.get("checkpoint") or "-"),
        row("exported weights", lambda s: s.get("export") or "-"),
        row("W&B run", lambda s: s.get("wandb") or "-"),
        row("failure", lambda s: s.get("failure") or "-"),
    ]


# -------------------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mark(ax, rows: list[dict], x_of: Callable[[float], float], sizes: bool = False) -> None:
    """Vertical lines where a new worker group resumed (`sizes`: its world size written along the
    line), triangles on the step axis where a checkpoint was committed."""
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes fractions
    for c in attempt_changes(rows):
        colour, style, _ = CHANGES[c["kind"]]
        ax.axvline(x_of(c["from_step"]), color=colour, linestyle=style, linewidth=1.2, zorder=1)
        if sizes and c["world_size"] and c["world_size"] != c["was"]:
            ax.text(x_of(c["from_step"]), 0.98, f" {c['world_size']} workers", transform=trans, rotation=90,
                    va="top", ha="right", fontsize=8, color=colour)
    ckpts = [r["step"] for r in rows for e in r.get("events") or [] if e.get("kind") == "checkpoint"]
    if ckpts:
        ax.plot([x_of(s) for s in ckpts], [0.02] * len(ckpts), linestyle="none", marker="^", markersize=6,
                color=CHECKPOINT[0], transform=trans, clip_on=False, zorder=3)


def _legend(fig, rows: list[dict], curves: bool, with_eval: bool = False) -> None:
    """One legend for the figure: the curves (`curves`), and the kinds of marker this job has."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=TRAIN, label="train")] if curves else []
    if with_eval:
        handles.append(Line2D([], [], color=EVAL, marker="o", label="eval"))
    for kind in dict.fromkeys(c["kind"] for c in attempt_changes(rows)):
        colour, style, label = CHANGES[kind]
        handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
    if any(e.get("kind") == "checkpoint" for r in rows for e in r.get("events") or []):
        handles.append(Line2D([], [], color=CHECKPOINT[0], marker="^", linestyle="none", label=CHECKPOINT[1]))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=9,
                   frameon=False)


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555555",
            wrap=True)
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)


def plot_job(job_id: str, rows: list[dict]) -> dict[str, bytes]:
    """{file name: PNG} of one job's history: the loss figure and the training figure."""
    import numpy as np
    from matplotlib.figure import Figure  # (no pyplot: no global state, no GUI backend; Agg draws)
    from matplotlib.ticker import EngFormatter, MaxNLocator

    steps, loss = _series(rows, "train/loss")
    eval_steps, eval_loss = _series(rows, "eval/loss")
    tok_steps, tokens = _series(rows, "train/tokens")

    def step_to_tokens(s):
        return float(np.interp(s, tok_steps, tokens)) if tok_steps else float("nan")

    out = {}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(f"{job_id}: loss", fontsize=12)
    by_step, by_tokens = fig.subplots(1, 2)
    for ax, x_of, xlabel in ((by_step, float, "step"), (by_tokens, step_to_tokens, "tokens seen")):
        if not steps:
            _empty(ax, "no loss logged yet")
            continue
        ax.plot([x_of(s) for s in steps], loss, color=TRAIN, linewidth=1.4, zorder=2)
        if eval_steps:
            ax.plot([x_of(s) for s in eval_steps], eval_loss, color=EVAL, marker="o", markersize=4, zorder=2)
        _mark(ax, rows, x_of, sizes=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    _legend(fig, rows, True, bool(eval_steps))
    out[f"{job_id}-loss.png"] = _png(fig)

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    fig.suptitle(f"{job_id}: training", fontsize=12)
    axes = fig.subplots(2, 2).ravel()
    first, last = (rows[0]["step"], rows[-1]["step"]) if rows else (0, 1)
    pad = max(1.0, 0.03 * (last - first))
    panels = [
        ("train/lr", 1.0, "learning rate", None),
        ("perf/tokens_per_s", 1.0, "throughput (tokens/s)", None),
        ("perf/mfu", 100.0, "MFU (%)", "MFU not measured: the device's peak FLOPs is unknown\n"
                                      "(set cluster.peak_flops_per_device)"),
        ("perf/data_wait_fraction", 100.0, "waiting for data (% of step time)", None),
    ]
    for ax, (key, scale, label, missing) in zip(axes, panels):
        xs, ys = _series(rows, key)
        ax.set_title(label, fontsize=10)
        if not xs:
            _empty(ax, missing or f"no {key} logged")
            continue
        ax.plot(xs, [y * scale for y in ys], color=TRAIN, linewidth=1.3, marker="." if len(xs) < 40 else None)
        _mark(ax, rows, float)
        ax.grid(alpha=0.3)
        if key == "perf/tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylim(bottom=0)
        ax.set_xlim(first - pad, last + pad)  # (the same steps on every panel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
    _legend(fig, rows, False)
    out[f"{job_id}-training.png"] = _png(fig)
    return out


# --------------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.uri{font-family:monospace;font-size:.85em;word-break:break-all}
img{max-width:100%;display:block;margin:1em 0}.note{color:#8a4b00}.muted{color:#666;font-size:.9em}
"""


def compared(jobs: list[JobReport]) -> list[JobReport]:
    """The jobs of a pipeline worth one chart together: two or more of one kind other than
    pretraining (the default demo's fine-tune from the pretrained weights and its from-scratch
    baseline), those of the most common such kind."""
    kinds: dict[str, list[JobReport]] = {}
    for j in jobs:
        if j.rows and j.record.get("kind") != "pretrain":
            kinds.setdefault(j.record.get("kind") or "", []).append(j)
    group = max(kinds.values(), key=len, default=[])
    return group if len(group) >= 2 else []


def _label(j: JobReport) -> str:
    r, s = j.record, j.summary
    start = "random weights" if (r.get("config") or {}).get("from_scratch") else \
        "its dependency's weights" if r.get("depends_on") or (r.get("config") or {}).get("init_from") else ""
    qa = f", QA {s['qa_correct']}/{s['qa_questions']}" if s.get("qa_questions") else ""
    return f"{r.get('name') or r['id']}" + (f" (from {start}{qa})" if start else f" ({qa[2:]})" if qa else "")


def plot_compared(pipeline_id: str, jobs: list[JobReport]) -> dict[str, bytes]:
    """{file name: PNG}: the compared jobs' training loss (lines) and eval loss (dots) on one chart,
    labelled with where each started and its held-out QA score."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    fig.suptitle(f"{pipeline_id}: {jobs[0].record.get('kind')} jobs compared", fontsize=12)
    ax = fig.subplots()
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, j in enumerate(jobs):
        colour = colours[i % len(colours)]
        steps, loss = _series(j.rows, "train/loss")
        ax.plot(steps, loss, color=colour, linewidth=1.4, label=_label(j))
        eval_steps, evals = _series(j.rows, "eval/loss")
        if eval_steps:
            ax.plot(eval_steps, evals, color=colour, marker="o", markersize=4, linestyle="none")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, dots: eval)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    return {f"{pipeline_id}-compared.png": _png(fig)}


def by_source_step(jobs: list[JobReport]) -> dict[str, list[JobReport]]:
    """The jobs checkpoint triggers started, by trigger ({trigger id: its jobs, by source step})."""
    out: dict[str, list[JobReport]] = {}
    for j in jobs:
        t = j.record.get("triggered") or {}
        if t and j.summary:
            out.setdefault(t["trigger"], []).append(j)
    return {k: sorted(v, key=lambda j: j.record["triggered"]["step"]) for k, v in out.items()}


def plot_by_source_step(trigger_id: str, jobs: list[JobReport], baseline: JobReport | None) -> dict[str, bytes]:
    """{file name: PNG}: each triggered job's final eval loss (and held-out QA exact match) against
    the step of its source's checkpoint it started from; a job of the same kind from random weights,
    if the pipeline has one, as a dashed line (what the weights of step 0 would give)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [j.record["triggered"]["step"] for j in jobs]
    panels = [("eval_loss", "final eval loss", 1.0)]
    if any(j.summary.get("qa_questions") for j in jobs):
        panels.append(("qa", "held-out QA exact match (%)", 100.0))

    def value(s: dict, key: str, scale: float):
        if key == "qa":
            return None if not s.get("qa_questions") else scale * s["qa_correct"] / s["qa_questions"]
        return s.get(key)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    source = jobs[0].record["triggered"]["source"]
    fig.suptitle(f"{trigger_id}: from the checkpoints of {source}", fontsize=12)
    for ax, (key, label, scale) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ys = [value(j.summary, key, scale) for j in jobs]
        ax.plot([x for x, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None],
                color=TRAIN, marker="o", linewidth=1.4, label="from the checkpoint of that step")
        base = value(baseline.summary, key, scale) if baseline is not None else None
        if base is not None:
            ax.axhline(base, color=EVAL, linestyle="--", label=f"{baseline.record.get('name')} (random weights)")
        ax.set_xlabel(f"step of {source}")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, frameon=False)
    return {f"{trigger_id}-by-step.png": _png(fig)}


def _baseline(jobs: list[JobReport], kind: str) -> JobReport | None:
    return next((j for j in jobs if j.summary and j.record.get("kind") == kind
                 and (j.record.get("config") or {}).get("from_scratch")), None)


def render_html(title: str, jobs: list[JobReport], total: dict | None, generated: float,
                compared_images: dict[str, bytes] | None = None) -> str:
    """The page: every value escaped, every image inline."""
    esc = html.escape
    with_rows = [j for j in jobs if j.summary]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f'<p class="muted">made {esc(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(generated)))} '
             "by <code>orch report</code> from the job records and their metrics histories</p>"]
    for j in jobs:
        if not j.summary:
            parts.append(f'<p class="note">{esc(j.record["id"])} ({esc(j.record.get("state", ""))}): '
                         f"{esc(j.error or 'no metrics history yet')}</p>")
    if with_rows:
        heads = [j.record["id"] for j in with_rows] + (["pipeline"] if total else [])
        parts.append("<h2>Summary</h2><table><tr><th></th>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>")
        for label, cells in table_rows([j.summary for j in with_rows], total):
            cls = ' class="uri"' if label in ("checkpoint", "exported weights", "W&B run") else ""
            parts.append(f"<tr><th>{esc(label)}</th>" + "".join(f"<td{cls}>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for name, png in (compared_images or {}).items():
        parts.append("<h2>By the step of the checkpoint they started from</h2>" if name.endswith("-by-step.png")
                     else "<h2>Compared</h2>")
        parts.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    for j in with_rows:
        r = j.record
        parts.append(f"<h2>{esc(r['id'])} <span class=\"muted\">({esc(r.get('kind', ''))}, "
                     f"{esc(r.get('state', ''))})</span></h2>")
        for c in attempt_changes(j.rows):
            lost = "" if c["lost_s"] is None else f"; {_duration(c['lost_s'])} lost"
            parts.append(f'<p class="muted">{esc(c["kind"])}: resumed from step {c["from_step"]} at '
                         f"{esc(str(c['world_size']))} workers{esc(lost)}</p>")
        parts += [f'<p class="muted">{esc(restart_line(n, e))}</p>'  # the restart ledger: class, ranks, nodes
                  for n, e in enumerate(r.get("restart_log") or [], start=1)]
        parts += [f'<p class="muted">{esc(line)}</p>' for line in preemption_lines(r.get("history") or [])]
        for name, png in j.images.items():
            data = base64.b64encode(png).decode()
            parts.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{data}">')
    parts.append("<h2>How the numbers are computed</h2><dl>")
    parts += [f"<dt><b>{esc(k)}</b></dt><dd>{esc(v)}</dd>" for k, v in HOW]
    parts.append("</dl></body></html>")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------- write
REPORTS_DIR = "reports"


def default_dir(state_dir: str, target: str) -> str:
    """<state folder>/reports/<job or pipeline id>: next to the job records and the W&B offline
    runs this machine already keeps there, on a local disk a browser can open (the store may be
    S3), and one folder per target, so a pipeline's report is rewritten in place."""
    return os.path.join(state_dir, REPORTS_DIR, target)


def write_report(records: list[JobRecord], out_dir: str, read: Callable[[JobRecord], dict],
                 title: str | None = None, now: Callable[[], float] = time.time) -> str:
    """Write the page and the PNGs of `records` (one job, or a pipeline's) into `out_dir`; returns
    the page's path. `read(record)`: its metrics history ({"rows"} or {"error"}). Raises
    ReportError when no job has a row to show (the one line says why)."""
    jobs = []
    for r in records:
        history = read(r)
        jobs.append(JobReport(record=redact(r.to_json()), rows=history.get("rows") or [],
                              attempts=history.get("attempts") or {}, error=history.get("error")))
    if not any(j.rows for j in jobs):
        j = jobs[0]
        if j.error:
            raise ReportError(f"cannot report on {j.record['id']}: its store could not be read ({j.error}); "
                              f"check storage.root / the endpoint and credentials")
        which = jobs[0].record["id"] if len(jobs) == 1 else f"pipeline {jobs[0].record['pipeline_id']}"
        states = ", ".join(f"{x.record['id']} {x.record['state']}" for x in jobs)
        raise ReportError(f"nothing to report on {which}: no metrics history yet ({states}); "
                          f"a job logs its first row after its first step")
    page = os.path.join(out_dir, "index.html")
    try:
        os.makedirs(out_dir, exist_ok=True)  # (before the plots: a bad --out fails at once)
        t = now()
        for j in jobs:
            if j.rows:
                j.summary = summarize(j.record, j.rows, t, j.attempts)
                j.images = plot_job(j.record["id"], j.rows)
                for name, png in j.images.items():
                    _write(os.path.join(out_dir, name), png)
        together = compared(jobs)
        compared_images = plot_compared(together[0].record["pipeline_id"], together) if together else {}
        for trigger_id, triggered in by_source_step(jobs).items():
            compared_images.update(plot_by_source_step(trigger_id, triggered,
                                                       _baseline(jobs, triggered[0].record.get("kind"))))
        for name, png in compared_images.items():
            _write(os.path.join(out_dir, name), png)
    except OSError as e:
        raise _unwritable(out_dir, e) from None
    summaries = [j.summary for j in jobs if j.summary]
    total = pipeline_total(summaries) if len(jobs) > 1 else None
    if total is not None:
        spans = [_span(j.record, j.rows, t) for j in jobs if j.rows]
        starts, ends = [s for s, _ in spans if s is not None], [e for _, e in spans if e is not None]
        total["wall_s"] = max(ends) - min(starts) if starts and ends else None
        total["state"] = ""
    if title is None:
        title = (f"{jobs[0].record['id']}" if len(jobs) == 1
                 else f"pipeline {jobs[0].record['pipeline_id']}: {dependency_shape(records)}")
    try:
        _write(page, render_html(f"orch report: {title}", jobs, total, t, compared_images).encode())
    except OSError as e:
        raise _unwritable(out_dir, e) from None
    return page


def _unwritable(out_dir: str, e: OSError) -> ReportError:
    return ReportError(f"cannot write the report to {out_dir} ({e.strerror or e}); pass --out a folder you can write")


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # (a page being read is never half written)
