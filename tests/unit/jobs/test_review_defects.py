"""Defects found in review (issue 24, part 4), each pinned by a test that failed before its fix:
a retried job's times, the shape of a pipeline in `orch report`'s title, the README's `orch scale`
examples, job states compared as strings, dead code."""

from __future__ import annotations

import html
import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli.report import summarize, write_report
from orchestrator.cli.status_view import job_row
from orchestrator.config.compose import compose_root, job_config_from_dict, resolve_jobs
from orchestrator.config.typed import to_dict
from orchestrator.jobs.policy import scale_refusal
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

ROOT = Path(__file__).resolve().parents[3]


def _record(job_id: str = "p0-pretrain", states=(), depends_on=(), **extra) -> JobRecord:
    """A record whose history is `states`: (state, at) pairs; its state is the last one."""
    history = [{"state": s, "at": at, "reason": ""} for s, at in states]
    pipeline, name = job_id.split("-", 1)
    return JobRecord(id=job_id, pipeline_id=pipeline, name=name, kind="pretrain",
                     state=JobState(history[-1]["state"]) if history else JobState.PENDING, priority=0,
                     depends_on=list(depends_on), created_at=0.0, history=history,
                     config={"workers": 2, "trainer": {"max_steps": 10},
                             "cluster": {"cpus_per_worker": 1.0, "gpus_per_worker": 0.0}}, **extra)


FIRST_RUN = [("PENDING", 1.0), ("QUEUED", 2.0), ("STARTING", 3.0), ("RUNNING", 4.0), ("FAILED", 5.0)]


# ------------------------------------------------------------------ a retried job's start and end
@pytest.mark.parametrize("later, started, ended", [
    ([], 3.0, 5.0),  # one run: its admission and its failure
    ([("PENDING", 10.0), ("QUEUED", 11.0)], None, None),  # retried, waiting: this run has not started
    ([("PENDING", 10.0), ("QUEUED", 11.0), ("STARTING", 12.0), ("RUNNING", 13.0)], 12.0, None),
    ([("PENDING", 10.0), ("QUEUED", 11.0), ("STARTING", 12.0), ("RUNNING", 13.0), ("RESTARTING", 14.0),
      ("RUNNING", 15.0), ("SUCCEEDED", 20.0)], 12.0, 20.0),  # a restart inside a run is the same run
    ([("PENDING", 10.0), ("QUEUED", 11.0), ("CANCELLED", 12.0)], None, 12.0),  # cancelled before admission
])
def test_a_retried_job_shows_the_times_of_its_latest_run(later, started, ended):
    r = _record(states=FIRST_RUN + later)
    assert (r.started_at(), r.ended_at()) == (started, ended)


def test_a_retried_job_keeps_counting_elapsed_time_in_status_and_report():
    retried = FIRST_RUN + [("PENDING", 10.0), ("QUEUED", 11.0), ("STARTING", 12.0), ("RUNNING", 13.0)]
    running = _record(states=retried)
    row = job_row(running, now=30.0)
    assert (row["started_at"], row["finished_at"], row["elapsed_s"]) == (12.0, None, 18.0)
    assert summarize(running.to_json(), [], now=30.0)["wall_s"] == 18.0
    done = _record(states=retried + [("SUCCEEDED", 40.0)])
    assert summarize(done.to_json(), [], now=99.0)["wall_s"] == 28.0


# ----------------------------------------------------------------------- orch report's title
def _title(records: list[JobRecord], tmp_path: Path) -> str:
    rows = [{"step": 1, "time": 1.0, "world_size": 1, "metrics": {"train/loss": 2.0}}]
    page = write_report(records, str(tmp_path), lambda r: {"rows": rows}, now=lambda: 2.0)
    return html.unescape(re.search(r"<title>(.*)</title>", Path(page).read_text()).group(1))


def test_report_title_draws_a_fan_out_as_a_fan_out(tmp_path):
    pre = _record("p0-pretrain", [("SUCCEEDED", 1.0)])
    fine = _record("p0-finetune", [("SUCCEEDED", 1.0)], depends_on=["p0-pretrain"], seq=1)
    scratch = _record("p0-finetune_scratch", [("SUCCEEDED", 1.0)], depends_on=["p0-pretrain"], seq=2)
    assert _title([pre, fine, scratch], tmp_path) == "orch report: pipeline p0: pretrain -> finetune, finetune_scratch"


def test_report_title_draws_a_chain_a_diamond_and_an_outside_dependency(tmp_path):
    a = _record("p1-a", [("SUCCEEDED", 1.0)])
    b = _record("p1-b", [("SUCCEEDED", 1.0)], depends_on=["p1-a"], seq=1)
    c = _record("p1-c", [("SUCCEEDED", 1.0)], depends_on=["p1-b"], seq=2)
    assert _title([a, b, c], tmp_path / "chain") == "orch report: pipeline p1: a -> b -> c"
    c2 = _record("p1-c", [("SUCCEEDED", 1.0)], depends_on=["p1-a"], seq=2)
    d = _record("p1-d", [("SUCCEEDED", 1.0)], depends_on=["p1-b", "p1-c"], seq=3)
    assert _title([a, b, c2, d], tmp_path / "diamond") == "orch report: pipeline p1: a -> b, c -> d"
    e = _record("p1-e", [("SUCCEEDED", 1.0)], depends_on=["p1-b"], seq=4)
    assert _title([a, b, c2, e], tmp_path / "tree") == "orch report: pipeline p1: a -> b, c; b -> e"
    after = _record("p2-finetune", [("SUCCEEDED", 1.0)], depends_on=["p1-a"])
    assert _title([after], tmp_path / "after") == "orch report: p2-finetune"
    lone = _record("p3-x", [("SUCCEEDED", 1.0)])
    other = _record("p3-y", [("SUCCEEDED", 1.0)], depends_on=["p1-a"], seq=1)
    assert _title([lone, other], tmp_path / "after2") == "orch report: pipeline p3: x; p1-a -> y"


# ------------------------------------------------------------- the README's `orch scale` examples
def _bash_blocks(text: str) -> list[list[str]]:
    """The `orch` commands of each ```bash block of the README, as words (continuations joined,
    comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [[shlex.split(line, comments=True) for line in re.sub(r"\\\n\s*", " ", block).splitlines()
             if re.match(r"\s*\S*orch (up|submit|scale)\b", line)] for block in blocks]


def _readme_scale_examples() -> list[tuple[list[str], str, int, dict]]:
    """(the overrides of the `orch submit` before it, its job id, --workers, the capacity of the
    `orch up` before it) for each `orch scale` of README.md."""
    examples = []
    for lines in _bash_blocks((ROOT / "README.md").read_text()):
        submit, capacity = None, {}
        for words in lines:
            if words[1] == "up":
                nodes = int(words[words.index("--nodes") + 1]) if "--nodes" in words else 1
                # a bare `orch up` shares this machine's CPUs: count the smallest machine the README
                # speaks of (its tests' timings were taken on 2 cores)
                per = int(words[words.index("--cpus-per-node") + 1]) if "--cpus-per-node" in words else 2 // nodes
                capacity = {"CPU": float(nodes * per)}
            elif words[1] == "submit" and not any(w in ("-m", "--multirun", "--after") for w in words):
                submit = [w for w in words[2:] if not w.startswith("-")]
            elif words[1] == "scale":
                assert submit is not None, f"README: `{shlex.join(words)}` follows no `orch submit` in its block"
                examples.append((submit, words[2], int(words[words.index("--workers") + 1]), capacity))
    return examples


def test_the_readme_documents_scale_examples():
    assert len(_readme_scale_examples()) >= 3


@pytest.mark.parametrize("overrides, job_id, workers, capacity", _readme_scale_examples(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_the_readme_scale_examples_are_accepted(overrides, job_id, workers, capacity):
    """What the controller checks before scaling (scale_refusal, then the job config rebuilt at the
    new worker count) accepts each `orch scale` of the README after the `orch submit` before it."""
    name = job_id.split("-", 1)[1]
    job = next(j for j in resolve_jobs(compose_root(overrides)) if j.name == name)
    record = JobRecord(id=job_id, pipeline_id=job_id.split("-")[0], name=name, kind=job.kind,
                       state=JobState.RUNNING, priority=0, depends_on=[], config=to_dict(job), created_at=0.0)
    assert scale_refusal(record, workers, [record], capacity) is None
    assert job_config_from_dict(dict(record.config, workers=workers)).workers == workers


def test_a_refused_scale_lists_the_worker_counts_that_split_the_batch():
    job = next(j for j in resolve_jobs(compose_root(["model=gpt_tiny"])) if j.name == "pretrain")
    record = JobRecord(id="p0-pretrain", pipeline_id="p0", name="pretrain", kind="pretrain", state=JobState.RUNNING,
                       priority=0, depends_on=[], config=to_dict(job), created_at=0.0)
    why = scale_refusal(record, 3, [record], {"CPU": 8.0})
    assert "(16)" in why and "3 workers" in why and "1, 2 or 4" in why and "\n" not in why


# ------------------------------------------------------------------- states compared as strings
STATE_NAMES = "|".join(s.value for s in JobState)


def test_no_module_spells_a_job_state_as_a_string():
    """Our job states are JobState members everywhere but where they are defined (Ray's own
    JobStatus in raycluster/jobs_api.py and jobs_http.py shares some names)."""
    allowed = {"orchestrator/jobs/state.py", "orchestrator/raycluster/jobs_api.py",
               "orchestrator/raycluster/jobs_http.py"}
    found = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(rf"""["']({STATE_NAMES})["']""", line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------ dead code
def test_run_pipeline_is_gone():
    assert "def run_pipeline(" not in (ROOT / "orchestrator/service/pipeline.py").read_text()


def test_trainer_state_has_no_wandb_run_id_and_an_older_checkpoints_state_still_loads():
    from orchestrator.train.loop import TrainerState

    state = TrainerState.from_saved({"step": 7, "cursor": 112, "wandb_run_id": "p0-pretrain"})
    assert (state.step, state.cursor) == (7, 112) and not hasattr(state, "wandb_run_id")
