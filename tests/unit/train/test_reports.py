"""Rank 0 -> runner reports (orchestrator.train.reports): each crosses a process boundary intact,
the runner has a handler for every class, and its handler reads every field the class declares
(a field nobody reads is not sent)."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from orchestrator.constants import CONF_DIR_ENV, STATE_DIR_ENV
from orchestrator.execution.runner import REPORT_EVENTS, report_event
from orchestrator.jobs.events import EventKind
from orchestrator.jobs.lifecycle import PROGRESS_METRICS
from orchestrator.train import reports
from orchestrator.train.reports import REPORTS, CheckpointCommitted, EngineReady, Evaluated, Progress, StragglerFound

SAMPLES = {
    EngineReady: EngineReady(resumed_from="file:///r/runs/j/checkpoints/step-00000004", step=4,
                             skipped=("file:///r/runs/j/checkpoints/step-00000006",), universal=True),
    CheckpointCommitted: CheckpointCommitted(uri="s3://b/runs/j/checkpoints/step-00000008", step=8),
    Progress: Progress(step=8, loss=2.5, first_loss=6.1, tokens=4096, tokens_per_s=812.5, step_time_s=0.63, mfu=None),
    Evaluated: Evaluated(eval_loss=2.75),
    StragglerFound: StragglerFound(rank=1, ratio=2.1, step=40, window=10),
}


def _declared() -> set[type]:
    """Every report class the module defines (not just those in REPORTS: a new one counts at once)."""
    return {c for _, c in inspect.getmembers(reports, inspect.isclass)
            if c.__module__ == reports.__name__ and dataclasses.is_dataclass(c)}


def test_every_report_class_is_listed_sampled_and_handled():
    assert set(REPORTS) == _declared()
    assert set(SAMPLES) == _declared()
    assert set(REPORT_EVENTS) == _declared(), "a report class without a handler in runner.REPORT_EVENTS"


@pytest.mark.parametrize("cls", REPORTS, ids=lambda c: c.__name__)
def test_each_report_round_trips_and_is_frozen(cls):
    report = SAMPLES[cls]
    again = pickle.loads(pickle.dumps(report))  # what Ray does to an actor call's argument
    assert again == report and type(again) is cls
    field = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(report, field, None)


class _Reads:
    """Stands in for a report and records which of its fields a handler reads."""

    def __init__(self, report):
        self._report, self.read = report, set()

    def __getattr__(self, name):
        if not name.startswith("__"):
            self.read.add(name)
        return getattr(self._report, name)


@pytest.mark.parametrize("cls", REPORTS, ids=lambda c: c.__name__)
def test_the_runner_reads_exactly_the_declared_fields(cls):
    spy = _Reads(SAMPLES[cls])
    REPORT_EVENTS[cls](spy, 3)
    assert spy.read == {f.name for f in dataclasses.fields(cls)}


def test_metrics_reports_carry_only_the_records_metric_keys():
    """The lifecycle keeps only PROGRESS_METRICS: a metric it would drop must not be sent; and every
    metric the record shows comes from a report."""
    sent = {f.name for cls in (Progress, Evaluated) for f in dataclasses.fields(cls)}
    assert sent == set(PROGRESS_METRICS)
    for cls in (Progress, Evaluated):
        kind, data = report_event(SAMPLES[cls], 1)
        assert kind is EventKind.PROGRESS and data == {"metrics": dataclasses.asdict(SAMPLES[cls])}


def test_engine_ready_and_checkpoint_become_their_events():
    kind, data = report_event(SAMPLES[EngineReady], 3)
    assert kind is EventKind.ENGINE_READY
    assert data == {"attempt": 3, "resumed_from": "file:///r/runs/j/checkpoints/step-00000004", "step": 4,
                    "skipped": ["file:///r/runs/j/checkpoints/step-00000006"], "universal": True}
    assert report_event(EngineReady(), 1) == (EventKind.ENGINE_READY, {"attempt": 1, "resumed_from": None,
                                                                        "step": None, "skipped": [],
                                                                        "universal": False})
    assert report_event(SAMPLES[CheckpointCommitted], 1) == (
        EventKind.CHECKPOINT_COMMITTED, {"uri": "s3://b/runs/j/checkpoints/step-00000008", "step": 8})


def test_an_unknown_report_is_an_error_not_dropped():
    with pytest.raises(TypeError, match="dict.*REPORT_EVENTS"):
        report_event({"event": "stopped"}, 1)


# ------------------------------------------------------------------ the job config crosses once
def test_the_job_config_and_run_spec_cross_to_a_worker_as_they_are(monkeypatch, tmp_path):
    """The runner hands Ray Train's train_loop_config the JobConfig and RunSpec themselves: Ray pickles
    them (the model config's family subclass included), and the worker gets equal objects back."""
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.train.loop import RunSpec

    for var in (CONF_DIR_ENV, STATE_DIR_ENV, "ORCH_S3_BUCKET"):  # the real conf/, no S3 bucket from the env
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    for model in ("gpt_tiny", "llama_tiny"):
        jobs = resolve_jobs(compose_root([f"model={model}", "tracking=none"]))
        for job in jobs:
            spec = RunSpec(job_id="p1-pretrain", run_uri="file:///r/runs/p1-pretrain", init_from=None, reporter=None)
            args = pickle.loads(pickle.dumps({"job": job, "spec": spec}))
            assert args == {"job": job, "spec": spec} and type(args["job"].model) is type(job.model)


def test_only_the_runner_turns_a_job_config_dict_into_its_dataclass():
    """Past the controller's durable record (a dict), the config is built once, in the runner; the
    launcher's use is the controller's check of a scale's new config (a dict in the record)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "orchestrator"
    users = sorted(str(p.relative_to(root)) for pkg in ("train", "execution") for p in (root / pkg).rglob("*.py")
                   if "job_config_from_dict" in p.read_text())
    assert users == ["execution/launcher.py", "execution/runner.py"]
    assert (root / "execution/runner.py").read_text().count("job_config_from_dict(") == 1


def test_a_straggler_becomes_its_event():
    assert report_event(SAMPLES[StragglerFound], 2) == (EventKind.STRAGGLER,
                                                         {"rank": 1, "ratio": 2.1, "step": 40, "window": 10})
