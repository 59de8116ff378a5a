"""`orch report`'s page and plots from a synthetic history written by the real history writer to a
local store folder (a restart after a failure, an elastic resize, checkpoints), read back through
the CLI's `metrics_history`: the numbers of the summary, the PNGs (opened, sized, not blank), the
page (self-contained, every PNG embedded, no secret)."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.checkpoint.layout import run_uri
from orchestrator.cli.report import attempt_changes, summarize, write_report
from orchestrator.errors import ReportError
from orchestrator.execution.job_history import metrics_history
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.storage import open_store
from orchestrator.train.history import HistoryWriter, read_history

SECRET = "report-test-secret-9c1e77aa"


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _record(root: Path, job_id: str, name: str, state: str = "SUCCEEDED", t0: float = 1000.0, t1: float = 1100.0,
            **extra) -> JobRecord:
    config = {"workers": 2, "storage": {"root": str(root), "endpoint_url": f"http://x/?k={SECRET}"},
              "cluster": {"cpus_per_worker": 2.0, "gpus_per_worker": 0.0}, "trainer": {"max_steps": 40}}
    history = [{"state": "STARTING", "at": t0, "reason": ""}]
    if JobState(state).terminal:
        history.append({"state": state, "at": t1, "reason": ""})
    return JobRecord(id=job_id, pipeline_id="p0abc12", name=name, kind=name, state=JobState(state), priority=0,
                     depends_on=[], config=config, created_at=t0, history=history,
                     checkpoint=f"{root}/runs/{job_id}/checkpoints/step-40", export=f"{root}/runs/{job_id}/export",
                     **extra)


def _train(store, run, clock, *, start, stop, world, reason, step_s=1.0, tokens_per_step=1000, commit_every=10,
           eval_every=10, mfu=True):
    w = HistoryWriter(store, run, world_size=world, start_step=start, reason=reason, clock=clock)
    for step in range(start + 1, stop + 1):
        clock.t += step_s
        row = {"train/loss": 5.0 * math.exp(-step / 15) + 1.0, "train/lr": 1e-3 * min(1.0, step / 5),
               "train/tokens": step * tokens_per_step, "perf/tokens_per_s": tokens_per_step / step_s,
               "perf/step_time_s": step_s, "perf/data_wait_fraction": 0.05}
        if mfu:
            row["perf/mfu"] = 0.3
        w.log(row, step=step)
        if step % eval_every == 0:
            w.log({"eval/loss": 5.0 * math.exp(-step / 15) + 1.2}, step=step)
        if step % commit_every == 0:
            w.append(step, events=[{"kind": "checkpoint", "uri": f"{run}/checkpoints/step-{step}"}])
            w.compact(step)
    return w


@pytest.fixture
def pretrain(tmp_path):
    """40 steps: a failure at step 17 (resumed from 10 after a 12 s gap), that group killed too at
    step 13 (resumed from 10 again after 5 s: its rows are all trained again, as in
    test_recovery), an elastic resize to 3 workers at step 30 (resumed from 30 after 4 s)."""
    root = tmp_path / "store"
    store = open_store(str(root))
    rec = _record(root, "p0abc12-pretrain", "pretrain", t0=1000.0, t1=1100.0, restarts=2)
    run = run_uri(str(root), rec.id)
    clock = Clock(1002.0)
    _train(store, run, clock, start=0, stop=17, world=2, reason="start")  # killed after 17: 11..17 are redone
    clock.t += 12.0
    _train(store, run, clock, start=10, stop=13, world=2, reason="restart")
    clock.t += 5.0
    _train(store, run, clock, start=10, stop=30, world=2, reason="restart")
    clock.t += 4.0
    _train(store, run, clock, start=30, stop=40, world=3, reason="resize")
    return tmp_path, store, rec


def test_summary_counts_restarts_and_the_time_they_lost(pretrain):
    _tmp, store, rec = pretrain
    rows = read_history(store, run_uri(rec.config["storage"]["root"], rec.id))["rows"]
    changes = attempt_changes(rows)
    assert [(c["kind"], c["from_step"], c["step"], c["world_size"]) for c in changes] == [
        ("restart", 10, 11, 2), ("resize", 30, 31, 3)]
    # Steps 11..17 (7 s) thrown away, 12 s to restart, steps 11..13 (3 s) thrown away, 5 s to
    # restart: 27 s lost, all on the one line the curves show; the resize took 4 s.
    assert changes[0]["lost_s"] == pytest.approx(27.0) and changes[1]["lost_s"] == pytest.approx(4.0)
    s = summarize(rec.to_json(), rows, now=5000.0, attempts={"1": 0, "2": 10, "3": 10, "4": 30})
    # (the record counts both failures; the second group left no row, so no line)
    assert (s["steps"], s["tokens"], s["restarts"], s["resizes"], s["groups"]) == (40, 40000, 2, 1, 4)
    assert s["lost_s"] == pytest.approx(27.0) and s["resize_s"] == pytest.approx(4.0)
    assert s["wall_s"] == 100.0 and s["device"] == "CPU" and s["workers"] == [2, 3]
    assert s["checkpoints"] == 4 and s["mfu"] == pytest.approx(0.3)
    # 2 CPUs per worker: 2 workers until step 30's row (t=1000..1063+), 3 after, to t=1100.
    expected = (2 * (next(r["time"] for r in rows if r["step"] == 30) - 1000)
                + 3 * (1100 - next(r["time"] for r in rows if r["step"] == 30))) * 2 / 3600
    assert s["device_hours"] == pytest.approx(expected)
    assert s["final_loss"] == pytest.approx(5.0 * math.exp(-40 / 15) + 1.0) and s["eval_step"] == 40


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _not_blank(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    px = np.asarray(img.convert("L"))
    # Curves, text and markers: many pixels that are not the background, in many distinct shades.
    assert (px < 200).mean() > 0.01 and len(np.unique(px)) > 20
    return img


def test_pipeline_page_embeds_every_plot_and_no_secret(pretrain, monkeypatch):
    tmp, store, pre = pretrain
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    root = tmp / "store"
    fine = _record(root, "p0abc12-finetune", "finetune", t0=1100.0, t1=1130.0, seq=1)
    _train(store, run_uri(str(root), fine.id), Clock(1101.0), start=0, stop=20, world=2, reason="start", mfu=False)
    waiting = _record(root, "p0abc12-eval", "eval", state="PENDING", seq=2)
    pre.restart_log = [{"at": 1000.0, "restart_at": 1002.0, "class": "stall", "ranks": [1], "nodes": ["10.0.0.3"],
                        "failed_at_step": 12, "resumed_from_step": 10, "steps_lost": 2, "seconds_lost": 7.0}]
    out = tmp / "report"
    page = write_report([pre, fine, waiting], str(out), metrics_history)
    html = Path(page).read_text()
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{j}-{k}.png" for j in (pre.id, fine.id) for k in ("loss", "training"))
    embedded = _pngs(html)
    assert sorted(embedded) == sorted((out / n).read_bytes() for n in names)
    for png in embedded:
        img = _not_blank(png)
        assert img.width >= 1000 and img.height >= 400
    # Self-contained: no link, script or remote resource.
    assert "<script" not in html and "<link" not in html and not re.search(r'(src|href)="(?!data:)', html)
    assert SECRET not in html
    # The summary: both jobs and the pipeline's column; the job still waiting is named, not drawn.
    assert "<th>time lost to failures</th><td>27s</td><td>0s</td><td>27s</td>" in html
    assert "<th>worker groups started</th><td>4</td><td>1</td><td>5</td>" in html
    assert html.count("restart: resumed from step 10 at 2 workers") == 1
    assert re.search(r"restart 1 at [0-9:]+: stall of rank 1 on 10\.0\.0\.3 at step 12, resumed from step 10 "
                     r"\(2 steps, 7s lost\)", html)  # the restart ledger
    for needle in (pre.id, fine.id, "pipeline", "CPU-hours", pre.export,
                   "p0abc12-eval (PENDING): no metrics history yet", "How the numbers are computed"):
        assert needle in html, needle


def test_no_history_or_unreachable_store_is_one_clear_error(tmp_path):
    rec = _record(tmp_path / "store", "p0abc12-pretrain", "pretrain", state="QUEUED")
    with pytest.raises(ReportError, match="no metrics history yet .*p0abc12-pretrain QUEUED"):
        write_report([rec], str(tmp_path / "out"), metrics_history)
    with pytest.raises(ReportError, match="store could not be read .*boom"):
        write_report([rec], str(tmp_path / "out"), lambda r: {"error": "OSError: boom"})
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_one_clear_error(pretrain):
    tmp, _store, rec = pretrain
    (tmp / "file").write_text("x")
    with pytest.raises(ReportError, match=f"cannot write the report to {tmp / 'file'} .*pass --out a folder"):
        write_report([rec], str(tmp / "file"), metrics_history)


def _qa_scored(store, root: Path, job_id: str, name: str, correct: int, **config) -> JobRecord:
    """A 20-step fine-tune that ends with a held-out QA score, as the worker logs it."""
    rec = _record(root, job_id, name, t0=1100.0, t1=1130.0, seq=1)
    rec.depends_on = ["p0abc12-pretrain"]
    rec.config.update(config)
    w = _train(store, run_uri(str(root), rec.id), Clock(1101.0), start=0, stop=20, world=2, reason="start",
               mfu=False, commit_every=25)
    w.log({"eval/qa_exact_match": correct / 20, "eval/qa_correct": correct, "eval/qa_questions": 20}, step=20)
    w.finish()
    return rec


def test_the_fine_tunes_are_compared_with_their_qa_scores(pretrain):
    """The report says what pretraining bought: each fine-tune's held-out QA exact match in the
    summary table, and the fine-tunes' losses on one chart labelled with where each started."""
    tmp, store, pre = pretrain
    root = tmp / "store"
    tuned = _qa_scored(store, root, "p0abc12-finetune", "finetune", 18)
    scratch = _qa_scored(store, root, "p0abc12-finetune_scratch", "finetune_scratch", 0, from_scratch=True)
    tuned.kind = scratch.kind = "finetune"
    out = tmp / "report"
    html = Path(write_report([pre, tuned, scratch], str(out), metrics_history)).read_text()
    assert ("<th>held-out QA exact match</th><td>-</td><td>18/20 (90%, step 20)</td><td>0/20 (0%, step 20)</td>"
            "<td>-</td>") in html
    chart = out / "p0abc12-compared.png"
    assert chart.exists() and chart.read_bytes() in _pngs(html)
    assert _not_blank(chart.read_bytes()).width >= 1000
    assert html.index("<h2>Compared</h2>") < html.index(f"<h2>{pre.id} ")  # right after the summary
    # A single job, or one fine-tune, has nothing to compare with.
    single = Path(write_report([pre, tuned], str(tmp / "one"), metrics_history)).read_text()
    assert "<h2>Compared</h2>" not in single and not list((tmp / "one").glob("*-compared.png"))


def test_jobs_started_by_checkpoints_are_charted_by_the_step_they_started_from(pretrain):
    """The curve people want: each triggered fine-tune's QA score against its source's step, beside
    the fine-tune from random weights."""
    tmp, store, pre = pretrain
    root = tmp / "store"
    tuned = []
    for step, correct in ((10, 4), (20, 9), (40, 17)):
        r = _qa_scored(store, root, f"p0abc12-ft-s{step}", f"ft-s{step}", correct)
        r.kind, r.triggered = "finetune", {"trigger": "p0abc12-ft", "source": pre.id, "step": step}
        tuned.append(r)
    scratch = _qa_scored(store, root, "p0abc12-finetune_scratch", "finetune_scratch", 0, from_scratch=True)
    scratch.kind = "finetune"
    out = tmp / "report"
    html = Path(write_report([pre, *tuned, scratch], str(out), metrics_history)).read_text()
    chart = out / "p0abc12-ft-by-step.png"
    assert chart.exists() and chart.read_bytes() in _pngs(html)
    assert _not_blank(chart.read_bytes()).width >= 1000
    assert "<h2>By the step of the checkpoint they started from</h2>" in html
    for correct in (4, 9, 17):
        assert f"<td>{correct}/20 (" in html
