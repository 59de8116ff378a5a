"""Jobs of kind `eval`: the numbers of given weights, with no optimizer, on a real local Ray
cluster (Ray Train workers, gloo): equal to a direct computation on the same weights, the same at
another worker count and when run again. And jobs started by a job's committed checkpoints
(`depends_on: [pretrain@every:10]`): one per matching checkpoint, from exactly its weights, the
checkpoint kept from retention until that job ended."""

from __future__ import annotations

import json

import pytest
import torch

from model.registry import family_of
from orchestrator import artifacts
from orchestrator.checkpoint.layout import list_checkpoints
from orchestrator.config.compose import job_config_from_dict
from orchestrator.data.manifest import load_manifest
from orchestrator.data.order import eval_batch
from orchestrator.data.reader import SplitReader
from orchestrator.jobs.store import JobStore
from orchestrator.storage import open_store
from orchestrator.train.history import read_history
from tests import wandb_files

pytestmark = pytest.mark.slow

RUN = ["pipeline=pretrain", "model=gpt_tiny", "pipeline.jobs.pretrain.workers=1", "trainer.max_steps=20",
       "trainer.eval_interval=10", "checkpoint.interval=10", "checkpoint.keep_last=1",
       "data.num_documents=200",  # (W&B offline: the tests' environment)
       # the pretrain's weights at each commit of a multiple of 10 steps, as it trains
       "+pipeline.jobs.every={kind:eval,depends_on:['pretrain@every:10'],workers:1}",
       # the weights evaluated by 2 workers; then on the QA dataset (its held-out questions)
       "+pipeline.jobs.eval2={kind:eval,depends_on:[pretrain],workers:2}",
       "+pipeline.jobs.qa={kind:eval,depends_on:[pretrain],workers:1}", "+data@pipeline.jobs.qa.data=qa",
       "pipeline.jobs.qa.data.num_documents=200"]


def _direct_eval_loss(job, export: str, cache_dir) -> float:
    """The validation loss of the exported weights, computed here in one process: the same fixed
    batches the jobs evaluate, without Ray, DeepSpeed or the ranks' split."""
    weights = artifacts.load(artifacts.resolve(export)).state_dict
    model = family_of(job.model).build(job.model)
    model.load_state_dict(weights)
    model.eval()
    store = open_store(job.data.uri)
    val = SplitReader.from_config(store, job.data, load_manifest(store, job.data.uri), "val", cache_dir)
    losses = []
    with torch.no_grad():
        for k in range(job.trainer.eval_batches):
            x, y = val.batch(eval_batch(val.num_samples, job.trainer.global_batch_size, k))
            losses.append(float(model(x, y)[1]))
    val.close()
    return sum(losses) / len(losses)


def test_eval_jobs_and_jobs_triggered_by_checkpoints(orch, tmp_path):
    state = tmp_path / "state"
    result = orch("run", *RUN, "--state-dir", str(state), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {j["name"]: j for j in result.status(state)}
    pre, two, qa = jobs["pretrain"], jobs["eval2"], jobs["qa"]
    assert all(j["state"] == "SUCCEEDED" for j in (two, qa)), result.stdout[-3000:]
    # No optimizer, no checkpoint, no export: only numbers.
    assert two["export"] is None and two["checkpoint"] is None
    # The weights of step 20: the same loss as the pretrain's own final evaluation (DeepSpeed's engine)
    # and a direct computation here.
    record = JobStore(state).get(two["id"])
    job = job_config_from_dict(record.config)
    direct = _direct_eval_loss(job, pre["export"], tmp_path / "cache")
    assert two["metrics"]["eval_loss"] == pytest.approx(direct, rel=1e-5)
    assert pre["metrics"]["eval_loss"] == pytest.approx(direct, rel=1e-5)
    assert two["metrics"]["step"] == 20
    # Its metrics history: one row at the weights' step; the results file in its run folder.
    store = open_store(job.storage.root)
    rows = read_history(store, f"{job.storage.root.rstrip('/')}/runs/{two['id']}")["rows"]
    assert [r["step"] for r in rows] == [20] and rows[0]["metrics"]["eval/loss"] == two["metrics"]["eval_loss"]
    saved = json.loads(store.get(f"{job.storage.root.rstrip('/')}/runs/{two['id']}/eval.json"))
    assert saved["eval_loss"] == two["metrics"]["eval_loss"] and saved["weights"] == pre["export"]
    # Its W&B run: the numbers in the summary, and the table of them.
    run = wandb_files.run_file(two["wandb"]["dir"])
    summary = wandb_files.summary(run)
    assert summary["eval/eval_loss"] == pytest.approx(two["metrics"]["eval_loss"])
    assert summary["eval/results/_type"] == "table-file"
    table = json.loads((run.parent / "files" / summary["eval/results/path"]).read_text())
    assert table["columns"] == ["weights", "step", "metric", "value"]
    assert [pre["export"], 20, "eval_loss", two["metrics"]["eval_loss"]] in table["data"]
    # The checkpoint trigger: one job per commit at a multiple of 10, each from exactly those weights
    # (its loss is the pretrain's own evaluation at that step), none twice; then it ended.
    triggered = {j["name"]: j for j in jobs.values() if j["name"].startswith("every-s")}
    assert sorted(triggered) == ["every-s10", "every-s20"] and jobs["every"]["state"] == "SUCCEEDED"
    pre_rows = read_history(store, f"{job.storage.root.rstrip('/')}/runs/{pre['id']}")["rows"]
    pre_evals = {r["step"]: r["metrics"]["eval/loss"] for r in pre_rows if "eval/loss" in r["metrics"]}
    for step in (10, 20):
        got = triggered[f"every-s{step}"]
        assert got["state"] == "SUCCEEDED" and got["metrics"]["step"] == step
        assert got["metrics"]["eval_loss"] == pytest.approx(pre_evals[step], rel=1e-5), step
    assert pre_evals[10] != pytest.approx(pre_evals[20], rel=1e-3)
    # W&B: each run says the source's step it started from, and uses that checkpoint (a version of the
    # source's checkpoint artifact: lineage from the checkpoint to the job that used it).
    for step in (10, 20):
        run_file = wandb_files.run_file(triggered[f"every-s{step}"]["wandb"]["dir"])
        config = wandb_files.run_info(run_file)["config"]
        assert config["source_step"] == step and config["source_job"] == pre["id"]
        used = [a for a in wandb_files.artifacts(run_file) if a["use_after_commit"]]
        assert [a["name"] for a in used] == [f"checkpoint-{pre['id']}"]
        assert used[0]["refs"] and all(f"/{pre['id']}/checkpoints/step-{step}/" in r for r in used[0]["refs"]), used
    # keep_last=1 would have deleted step 10 at step 20's commit: kept until its job ended, then deleted
    ckpts = f"{job.storage.root.rstrip('/')}/runs/{pre['id']}"
    assert [c.step for c in list_checkpoints(store, ckpts)] == [20]
    assert not store.list(f"{ckpts}/pins/")
    assert f"{pre['id']}: checkpoint step 10 deleted (released by its triggered jobs)" in result.stdout

    # The QA dataset's held-out questions were asked (20 steps of pretraining answer few or none).
    assert qa["metrics"]["qa_questions"] == 20 and 0 <= qa["metrics"]["qa_correct"] <= 20
    assert f"{qa['id']}: evaluated {pre['export']}: eval loss" in result.stdout

    # Again, in a new run from the same weights, at 1 worker: the same numbers.
    again = orch("run", "pipeline=pretrain", "model=gpt_tiny", "pipeline.jobs.pretrain.kind=eval",
                 f"pipeline.jobs.pretrain.init_from={pre['export']}", "pipeline.jobs.pretrain.workers=1",
                 f"data.uri={job.data.uri}", "tracking=none", "--state-dir", str(tmp_path / "again"), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (rerun,) = again.status(tmp_path / "again")
    assert rerun["metrics"]["eval_loss"] == pytest.approx(two["metrics"]["eval_loss"], rel=1e-6)
