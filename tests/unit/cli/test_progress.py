"""`orch run`/`orch data prepare` progress: bars with rate and ETA on a terminal, the plain
timestamped lines alone on a pipe."""

from __future__ import annotations

import io

from orchestrator.cli.progress import ConsoleProgress
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState


def _job(step: int | None, state=JobState.RUNNING) -> JobRecord:
    return JobRecord(id="p1-pretrain", pipeline_id="p1", name="pretrain", kind="pretrain", state=state, priority=0,
                     depends_on=[], config={"workers": 2, "trainer": {"max_steps": 30}}, created_at=0,
                     metrics={} if step is None else {"step": step, "loss": 2.5})


def test_off_a_terminal_only_the_lines(capsys):
    with ConsoleProgress(terminal=False) as progress:
        progress.jobs([_job(3)])
        progress.bar("dataset d", "dataset d: tokenizing", 1, 4, "parts")
        progress.say("p1-pretrain: step 5/30 loss 2.5000")
    out = capsys.readouterr().out
    assert out.startswith("[orch ") and out.rstrip().endswith("] p1-pretrain: step 5/30 loss 2.5000")
    assert out.count("\n") == 1 and "\x1b" not in out


def test_on_a_terminal_a_bar_per_job_with_its_steps():
    with ConsoleProgress(terminal=True) as progress:
        progress.progress.console.file = io.StringIO()
        progress.jobs([_job(None, JobState.QUEUED)])
        progress.jobs([_job(12)])
        progress.say("a line above the bars")
        (task,) = progress.progress.tasks
        assert (task.completed, task.total, task.fields["detail"]) == (12, 30, "loss 2.5000")
        assert "RUNNING" in task.description
    assert "a line above the bars" in progress.progress.console.file.getvalue()
