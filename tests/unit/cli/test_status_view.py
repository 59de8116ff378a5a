"""`orch status`'s view as pure functions: durations, rates, ETA, the order of a pipeline's jobs,
and the table as plain text (a pipe) or drawn for a terminal."""

from __future__ import annotations

import io

import pytest

from orchestrator.cli.status_view import (
    dependency_order,
    eta_seconds,
    fmt_duration,
    fmt_rate,
    job_row,
    pipelines,
    show,
    status_view,
)
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState


def _job(job_id: str, state: JobState = JobState.PENDING, seq: int = 1, depends_on=(), metrics=None, history=(),
         max_steps: int = 30, **config) -> JobRecord:
    pipeline, name = job_id.split("-", 1)
    return JobRecord(id=job_id, pipeline_id=pipeline, name=name, kind="pretrain", state=state, priority=0,
                     depends_on=list(depends_on), config={"workers": 2, "trainer": {"max_steps": max_steps}, **config},
                     created_at=0, seq=seq, metrics=metrics or {}, history=list(history))


@pytest.mark.parametrize("seconds, text", [(None, "-"), (-1, "-"), (float("nan"), "-"), (0, "0s"), (59.4, "59s"),
                                           (60, "1m00s"), (245, "4m05s"), (3600, "1h00m"), (7380, "2h03m"),
                                           (86400 * 3 + 3600 * 4, "3d04h")])
def test_durations(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(None, "-"), (950.4, "950"), (12345, "12.3k"), (4.56e6, "4.56M"),
                                        (2e9, "2G")])
def test_rates(rate, text):
    assert fmt_rate(rate) == text


def test_eta_is_the_steps_left_at_the_recent_step_time():
    assert eta_seconds(12, 30, 0.5) == 9.0
    assert eta_seconds(30, 30, 0.5) == 0.0
    assert eta_seconds(None, 30, 0.5) is None and eta_seconds(3, None, 0.5) is None
    assert eta_seconds(3, 30, None) is None


def test_job_row_elapsed_eta_and_workers():
    history = [{"state": "PENDING", "at": 100.0}, {"state": "STARTING", "at": 110.0},
               {"state": "RUNNING", "at": 115.0}]
    running = _job("p1-pretrain", JobState.RUNNING, history=history, max_workers=4,
                   metrics={"step": 10, "step_time_s": 2.0, "tokens_per_s": 900.0, "world_size": 3, "mfu": 0.41})
    row = job_row(running, now=200.0)
    assert row["elapsed_s"] == 90.0 and row["eta_s"] == 40.0 and row["max_steps"] == 30
    assert row["workers_shown"] == "3 (2-4)" and row["tokens_per_s"] == 900.0 and row["mfu"] == 0.41
    done = _job("p1-pretrain", JobState.SUCCEEDED, history=[*history, {"state": "SUCCEEDED", "at": 150.0}],
                metrics={"step": 30, "step_time_s": 2.0})
    row = job_row(done, now=999.0)
    assert row["elapsed_s"] == 40.0 and row["finished_at"] == 150.0 and row["eta_s"] is None
    waiting = job_row(_job("p1-pretrain"), now=999.0)
    assert waiting["elapsed_s"] is None and waiting["eta_s"] is None and waiting["started_at"] is None


def test_pipelines_list_jobs_in_dependency_order():
    # submitted out of order (`--after` inside the pipeline): each job after what it depends on
    eval_ = _job("p1-eval", seq=1, depends_on=["p1-finetune"])
    fine = _job("p1-finetune", seq=2, depends_on=["p1-pretrain"])
    pre = _job("p1-pretrain", seq=3)
    other = _job("p2-finetune", seq=4, depends_on=["p1-pretrain"])  # depends on another pipeline's job
    assert [j.id for j in dependency_order([eval_, fine, pre])] == ["p1-pretrain", "p1-finetune", "p1-eval"]
    assert [(pid, [j.id for j in jobs]) for pid, jobs in pipelines([other, eval_, fine, pre])] == [
        ("p1", ["p1-pretrain", "p1-finetune", "p1-eval"]), ("p2", ["p2-finetune"])]
    cycle = [_job("p3-a", seq=1, depends_on=["p3-b"]), _job("p3-b", seq=2, depends_on=["p3-a"])]
    assert [j.id for j in dependency_order(cycle)] == ["p3-a", "p3-b"]


def _records():
    history = [{"state": "STARTING", "at": 100.0}]
    return [_job("p1-pretrain", JobState.RUNNING, seq=1, history=history,
                 metrics={"step": 12, "loss": 3.2, "step_time_s": 0.5, "tokens_per_s": 12345.0, "mfu": 0.123}),
            _job("p1-finetune", seq=2, depends_on=["p1-pretrain"], max_steps=10),
            _job("p2-finetune", JobState.BLOCKED, seq=3, depends_on=["p1-pretrain"]) ]


def test_plain_table_is_a_tree_without_escape_codes():
    out = io.StringIO()  # not a terminal: plain text, no colours, no trailing blanks
    records = _records()
    records[2].failure_reason = "dependency p1-pretrain is [FAILED]"
    show(lambda width: status_view(records, ["cluster 127.0.0.1:1, dashboard http://127.0.0.1:2"], now=160.0,
                                   width=width), out)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and all(line == line.rstrip() for line in lines)
    assert lines[0] == "cluster 127.0.0.1:1, dashboard http://127.0.0.1:2"
    assert lines[1].split() == ["JOB", "STATE", "STEP", "LOSS", "TOK/S", "MFU", "WORKERS", "RESTARTS", "ELAPSED",
                                "ETA"]
    body = [line.split() for line in lines[3:]]
    assert body[0] == ["p1"]
    assert body[1] == ["├─", "p1-pretrain", "RUNNING", "12/30", "3.2000", "12.3k", "12.3%", "2", "0", "1m00s", "9s"]
    assert body[2] == ["└─", "p1-finetune", "PENDING", "-", "-", "-", "-", "2", "0", "-", "-"]
    assert body[3] == ["p2", "(after", "p1-pretrain)"]
    assert body[4][:3] == ["└─", "p2-finetune", "BLOCKED"]
    assert lines[-1] == "p2-finetune: dependency p1-pretrain is [FAILED]"  # (not read as rich markup)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_table_is_coloured_and_only_the_ids_give_way():
    out = _Terminal()
    show(lambda width: status_view(_records(), now=160.0, width=width), out)
    text = out.getvalue()
    assert "\x1b[" in text  # drawn for a terminal
    from orchestrator.cli.status_view import console, status_table

    narrow = console(io.StringIO(), terminal=False)
    narrow.width = 80
    with narrow.capture() as captured:
        narrow.print(status_table(_records(), now=160.0, width=80))
    lines = captured.get().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "…" in lines[3] and lines[3].split()[-8:] == ["12/30", "3.2000", "12.3k", "12.3%", "2", "0", "1m00s",
                                                         "9s"]


def test_restarts_and_the_last_stall_are_listed_under_the_table():
    from orchestrator.cli.status_view import restart_lines

    job = _job("p1-pretrain", JobState.RUNNING)
    job.failures = [{"at": 100.0, "class": "stall", "line": "rank 1 on node 10.0.0.3 stopped in collective of step 22",
                     "ranks": [1], "nodes": ["10.0.0.3"], "step": 22, "dumps": "s3://b/runs/p1-pretrain/hangs/17"}]
    job.restart_log = [{"at": 100.0, "restart_at": 102.0, "class": "stall", "ranks": [1], "nodes": ["10.0.0.3"],
                        "failed_at_step": 22, "resumed_from_step": 20, "steps_lost": 2, "seconds_lost": 9.5},
                       {"at": 200.0, "restart_at": 202.0, "class": "worker_crash", "ranks": [], "nodes": [],
                        "failed_at_step": 30, "resumed_from_step": None, "steps_lost": None, "seconds_lost": None}]
    lines = restart_lines(job)
    assert lines[0].startswith("p1-pretrain: restart 1 at ") and lines[0].endswith(
        ": stall of rank 1 on 10.0.0.3 at step 22, resumed from step 20 (2 steps, 10s lost)"), lines[0]
    assert lines[1].endswith(": worker_crash at step 30; not resumed (its group failed first)"), lines[1]
    assert lines[2] == ("p1-pretrain: last stall: rank 1 on node 10.0.0.3 stopped in collective of step 22 "
                        "(every rank's stacks: s3://b/runs/p1-pretrain/hangs/17)")
    out = io.StringIO()
    show(lambda width: status_view([job], width=width), file=out)
    assert "restart 2 at" in out.getvalue() and "last stall:" in out.getvalue()


def test_each_preemption_is_listed_under_the_table_with_why():
    from orchestrator.cli.status_view import restart_lines

    job = _job("p2-pretrain", JobState.RUNNING)
    job.preemptions = 1
    job.history = [{"state": "RUNNING", "at": 10.0, "reason": "started"},
                   {"state": "PREEMPTED", "at": 50.0,
                    "reason": "preempted for p9-pretrain after a checkpoint (file:///s/runs/p2-pretrain/checkpoints/step-75)"},
                   {"state": "RUNNING", "at": 90.0, "reason": "resumed"}]
    (line,) = restart_lines(job)
    assert line.startswith("p2-pretrain: preempted 1 at ") and line.endswith(
        ": preempted for p9-pretrain after a checkpoint (file:///s/runs/p2-pretrain/checkpoints/step-75)"), line
    out = io.StringIO()
    show(lambda width: status_view([job], width=width), file=out)
    assert "preempted 1 at" in out.getvalue()
