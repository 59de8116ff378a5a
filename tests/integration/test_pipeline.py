"""The embedded pipeline end to end: `orch run` on a real local Ray cluster with real DeepSpeed
engines (gloo on CPU), a real object store (local folder, or S3 over HTTP on loopback), and W&B
offline files read back from disk."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.gpt import GPT, GPTConfig, tied_weights
from model.registry import family_of
from orchestrator.checkpoint.export import load_exported_weights
from orchestrator.checkpoint.layout import list_checkpoints, read_marker
from orchestrator.config.schema import ModelConfig
from orchestrator.config.typed import build
from orchestrator.constants import COMMIT_MARKER
from orchestrator.data import corpus
from orchestrator.data.manifest import load_manifest
from orchestrator.data.order import global_batch, micro_batches, rank_slice
from orchestrator.data.reader import SplitReader
from orchestrator.storage import join_uri, open_store
from tests import wandb_files
from tests.leaks import bucket_hits, find_in_tree, output_hits, plant_secrets, sandboxed

pytestmark = pytest.mark.slow

TINY = [
    "model=gpt_tiny",
    "trainer.max_steps=30",
    "trainer.log_interval=5",
    "checkpoint.interval=10",
    "checkpoint.keep_last=2",
    "data.num_documents=600",
    "pipeline.jobs.finetune.trainer.max_steps=10",
    "pipeline.jobs.finetune.data.num_documents=300",
]


def _history(record: dict) -> dict[str, float]:
    return {h["state"]: h["at"] for h in record["history"]}


def _first_loss_from(weights: dict, cfg: dict, store, data_uri: str, workers: int, scratch: Path) -> float:
    """The loss a fine-tuning job starting from `weights` reports at step 1: the mean over ranks and
    micro-batches of the micro-batch losses of global batch 0 (computed before any update)."""
    model_cfg = build(ModelConfig, cfg["model"], "model")  # any family
    model = family_of(model_cfg).build(model_cfg)
    model.load_state_dict(weights)
    model.eval()
    manifest = load_manifest(store, data_uri)
    tr = cfg["trainer"]
    losses = []
    with SplitReader(store, data_uri, manifest, "train", scratch) as reader, torch.no_grad():
        batch = global_batch(reader.samples_per_shard, tr["global_batch_size"], tr["seed"], 0,
                             cfg["data"]["shuffle_window"])
        for rank in range(workers):
            for mb in micro_batches(rank_slice(batch, rank, workers), tr["micro_batch_size"]):
                x, y = reader.batch(mb)
                losses.append(float(model(x, y)[1]))
    return float(np.mean(losses))


def _check_pipeline(state_dir: Path, work: Path, result, storage_kwargs: dict) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {j["name"]: j for j in result.status(state_dir)}
    pre, fine, scratch = jobs["pretrain"], jobs["finetune"], jobs["finetune_scratch"]

    # Every job succeeded; the fine-tunes were admitted only after pretraining ended.
    assert pre["state"] == fine["state"] == scratch["state"] == "SUCCEEDED"
    for job in (fine, scratch):
        assert job["depends_on"] == [pre["id"]]
        assert _history(job)["STARTING"] >= _history(pre)["SUCCEEDED"]
        assert _history(job)["QUEUED"] >= _history(pre)["SUCCEEDED"]

    # Held-out QA: both fine-tunes were asked the question about each character that fine-tuning
    # never asked, and scored (these test-sized runs are too short to learn the facts: no margin here;
    # the default demo's margin is in the README).
    n = len(corpus.heldout_qa())
    for job in (fine, scratch):
        assert job["metrics"]["qa_questions"] == n and 0 <= job["metrics"]["qa_correct"] <= n, job["metrics"]
    assert (f"held-out QA exact match: finetune {fine['metrics']['qa_correct']}/{n} "
            f"({fine['metrics']['qa_correct'] / n:.0%}) vs finetune_scratch (from random weights) "
            f"{scratch['metrics']['qa_correct']}/{n}") in result.stdout
    rows = _status_json(state_dir, fine["id"])["metrics_history"]["rows"]
    assert rows[-1]["metrics"]["eval/qa_correct"] == fine["metrics"]["qa_correct"]
    logged = [r for r in wandb_files.history(wandb_files.run_file(Path(fine["wandb"]["dir"])))
              if "eval/qa_exact_match" in r]  # (W&B's summary keeps the last)
    assert [r["eval/qa_exact_match"] for r in logged] == [pytest.approx(fine["metrics"]["qa_correct"] / n)]

    # Pretraining loss went down (from the job record and from the W&B file).
    assert pre["metrics"]["step"] == 30
    assert pre["metrics"]["loss"] < pre["metrics"]["first_loss"] - 1.0
    assert math.isfinite(pre["metrics"]["eval_loss"])

    # Committed checkpoints exist in the store, their files match the commit marker; retention
    # kept the newest two of step 10, 20, 30.
    store = open_store(pre["checkpoint"], **storage_kwargs)
    for job in (pre, fine):
        run = job["checkpoint"].rsplit("/checkpoints/", 1)[0]
        refs = list_checkpoints(store, run)
        committed = [r.step for r in refs if r.committed]
        assert committed[-1] == job["metrics"]["step"]
        assert job["checkpoint"] == refs[-1].uri
        marker = read_marker(store, refs[-1])
        assert marker["world_size"] == job["workers"]
        listed = {o.uri: o.size for o in store.list(refs[-1].uri + "/")}
        for f in marker["files"]:
            assert listed[join_uri(refs[-1].uri, f["path"])] == f["size"]
        assert join_uri(refs[-1].uri, COMMIT_MARKER) in listed
    assert [r.step for r in list_checkpoints(store, pre["checkpoint"].rsplit("/checkpoints/", 1)[0])] == [20, 30]

    # Fine-tuning began from pretraining's weights: its first reported loss is the loss of the
    # exported pretrained weights on its first batch, not that of a fresh init.
    from orchestrator.config.compose import compose_root, resolve_jobs  # noqa: F401  (import check)

    cfg = json.loads(json.dumps(_job_config(state_dir, fine["id"])))
    weights = load_exported_weights(store, pre["export"], work / "export", tied_weights(GPTConfig()))
    expected = _first_loss_from(weights, cfg, store, cfg["data"]["uri"], fine["workers"], work / "cache")
    assert fine["metrics"]["first_loss"] == pytest.approx(expected, rel=1e-4)
    torch.manual_seed(cfg["trainer"]["seed"])
    fresh = GPT(GPTConfig(**{k: v for k, v in cfg["model"].items() if k != "name"})).state_dict()
    from_scratch = _first_loss_from(fresh, cfg, store, cfg["data"]["uri"], fine["workers"], work / "cache")
    assert abs(from_scratch - expected) > 0.5
    # ... and the baseline started from exactly that fresh init (the same seed, no init_from).
    assert scratch["metrics"]["first_loss"] == pytest.approx(from_scratch, rel=1e-4)

    # W&B offline files: one run per job, same group, job_type pretrain/finetune, with the loss.
    runs = {}
    for job in (pre, fine):
        run_dir = Path(job["wandb"]["dir"])
        assert run_dir.is_dir() and str(run_dir).startswith(str(state_dir))
        f = wandb_files.run_file(run_dir)
        info = wandb_files.run_info(f)
        rows = [r for r in wandb_files.history(f) if "train/loss" in r]
        runs[job["kind"]] = info
        assert info["job_type"] == job["kind"]
        assert rows and rows[-1]["_step"] == job["metrics"]["step"] == rows[-1]["trainer/step"]
        assert rows[-1]["trainer/world_size"] == job["workers"] and rows[-1]["trainer/restarts"] == 0
        assert rows[-1]["train/loss"] == pytest.approx(job["metrics"]["loss"])
        assert rows[0]["train/loss"] == pytest.approx(job["metrics"]["first_loss"])
    assert runs["pretrain"]["group"] == runs["finetune"]["group"] == pre["pipeline_id"]

    # The metrics history in the store (status --json): a row per logged step, the same losses.
    for job in (pre, fine):
        rows = _status_json(state_dir, job["id"])["metrics_history"]["rows"]
        assert job["metrics_history"]["rows"] == len(rows) and job["metrics_history"]["last"] == rows[-1]
        logged = [r["step"] for r in rows if "train/loss" in r["metrics"]]
        assert logged == [1, *range(5, job["metrics"]["step"] + 1, 5)]
        assert rows[-1]["metrics"]["train/loss"] == pytest.approx(job["metrics"]["loss"])
        assert rows[-1]["metrics"]["eval/perplexity"] == pytest.approx(math.exp(job["metrics"]["eval_loss"]))
        assert [e["kind"] for e in rows[0]["events"]] == ["start"]
        expected = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
                    "perf/data_wait_s", "system/cpu_percent", "system/rss_gb"}
        assert expected <= set(rows[-1]["metrics"]) and rows[-1]["world_size"] == job["workers"], \
            sorted(rows[-1]["metrics"])
        assert math.isfinite(rows[-1]["metrics"]["train/grad_norm"])
        assert any(e["kind"] == "checkpoint" for r in rows for e in r["events"])
    # Lineage: each run logged its export and final checkpoint as reference artifacts (the URI);
    # the fine-tune used the pretraining export, and its config records where it started from.
    arts = {k: wandb_files.artifacts(wandb_files.run_file(j["wandb"]["dir"])) for k, j in (("pre", pre),
                                                                                         ("fine", fine))}
    assert {(a["name"], a["refs"][0].split("/export")[0] if a["type"] == "model" else a["type"])
            for a in arts["pre"]} == {(f"model-{pre['id']}", pre["export"].split("/export")[0]),
                                      (f"checkpoint-{pre['id']}", "checkpoint")}
    used = [a for a in arts["fine"] if a["use_after_commit"]]
    assert [a["name"] for a in used] == [f"model-{pre['id']}"] and used[0]["refs"][0].startswith(pre["export"])
    assert runs["finetune"]["config"]["init_from"] == pre["export"]
    assert runs["pretrain"]["config"]["cluster_facts"]["zero_stage"] == 2

    # The summary names the jobs, their states and where things are.
    for needle in ("SUCCEEDED", pre["id"], fine["id"], "checkpoint", "W&B run"):
        assert needle in result.stdout
    # The report `orch run` wrote: the pipeline's page in the state folder, its path in the summary.
    page = state_dir / "reports" / pre["pipeline_id"] / "index.html"
    assert f"report      {page} (`orch report {pre['pipeline_id']}`" in result.stdout
    _check_report(page, (pre, fine, scratch))

    # `orch status` (no controller: the state folder): the pipeline as a tree of its jobs, with
    # step/total, throughput and elapsed time; --json has the same values.
    for job in (pre, fine, scratch):
        assert job["max_steps"] == job["metrics"]["step"] and job["eta_s"] is None
        assert 0 < job["elapsed_s"] == pytest.approx(job["finished_at"] - job["started_at"])
        assert job["tokens_per_s"] == job["metrics"]["tokens_per_s"] > 0 and job["metrics"]["step_time_s"] > 0
    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--state-dir", str(state_dir)],
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines[0].split()[:3] == ["JOB", "STATE", "STEP"], out.stdout + out.stderr
    assert lines[2] == pre["pipeline_id"]
    assert lines[3].split()[:4] == ["├─", pre["id"], "SUCCEEDED", "30/30"]
    assert lines[4].split()[:4] == ["├─", fine["id"], "SUCCEEDED", "10/10"]
    assert lines[5].split()[:4] == ["└─", scratch["id"], "SUCCEEDED", "10/10"]


def _check_report(page: Path, jobs) -> None:
    """The page of `orch report`: the jobs' summary (their final loss, no restart, the fine-tunes'
    held-out QA scores) and their PNGs (the fine-tunes' chart too), each embedded in the page, each a
    real plot (opened, sized, not blank)."""
    import base64
    import re

    from PIL import Image

    html = page.read_text()
    for job in jobs:
        assert job["id"] in html and f"{job['metrics']['loss']:.4f}" in html and job["export"] in html
    assert re.search(r"<th>restarts after failures</th>(<td>0</td>)+</tr>", html)
    fine_tunes = [j for j in jobs if j["kind"] == "finetune"]
    for job in fine_tunes:
        m = job["metrics"]
        assert f"<td>{m['qa_correct']}/{m['qa_questions']} (" in html, job["id"]
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    files = sorted(page.parent.glob("*.png"))
    assert len(embedded) == len(files) == 2 * len(jobs) + (len(fine_tunes) >= 2)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(f.read_bytes() for f in files)
    for f in files:
        px = np.asarray(Image.open(f).convert("L"))
        assert px.shape[1] >= 1000 and (px < 200).mean() > 0.01, f



def _status_json(state_dir: Path, job_id: str) -> dict:
    """`orch status JOB --json`: the job with every row of its metrics history."""
    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", job_id, "--json", "--state-dir",
                          str(state_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (job,) = json.loads(out.stdout)
    return job


def _job_config(state_dir: Path, job_id: str) -> dict:
    from orchestrator.jobs.store import JobStore

    return JobStore(state_dir).get(job_id).config


def _logs(state_dir: Path, job_id: str, *flags: str, env: dict | None = None) -> list[str]:
    """`orch logs JOB [FLAGS]` after the run (no cluster left): its lines."""
    import os

    out = subprocess.run([sys.executable, "-m", "orchestrator", "logs", job_id, *flags, "--state-dir", str(state_dir)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _check_logs(state_dir: Path, job: dict, env: dict | None = None) -> str:
    """The workers' own lines among the job's events, in time order, for rank 0, --rank 1 and
    --controller (events only)."""
    lines = _logs(state_dir, job["id"], env=env)
    text = "\n".join(lines)
    assert lines == sorted(lines, key=lambda line: line[:23]), text  # each starts with its time, to the ms
    ready = next(i for i, line in enumerate(lines) if "[rank 0] rank 0 of 2 on cpu: ZeRO-2 engine ready" in line)
    committed = next(i for i, line in enumerate(lines) if "[rank 0] checkpoint" in line and "step-30 committed" in line)
    started = next(i for i, line in enumerate(lines) if f"{job['id']}: STARTING" in line)
    done = next(i for i, line in enumerate(lines) if f"{job['id']}: SUCCEEDED" in line)
    assert started < ready < committed < done, text
    assert "[rank 1]" not in text and re.search(r"step 30/30 loss \d", text)
    rank1 = "\n".join(_logs(state_dir, job["id"], "--rank", "1", env=env))
    assert "[rank 1] rank 1 of 2 on cpu" in rank1 and "[rank 0]" not in rank1 and "SUCCEEDED" in rank1
    events = _logs(state_dir, job["id"], "--controller", env=env)
    assert not any("[rank" in line for line in events) and any("RUNNING on 2 workers" in line for line in events)
    return text + rank1


def test_default_demo_shows_what_pretraining_adds(tmp_path, orch):
    """The default `orch run` (the README's first command, without W&B): the fine-tune started from
    pretraining's weights answers most of the held-out questions, whose answers only the stories
    state; the same fine-tune from random weights answers (almost) none. The same margin the README
    shows (18/20 vs 0/20 there); pretraining 400 steps is what it takes on this corpus (at 250 steps
    the fine-tune learns the taught answers by heart and none of the held-out ones)."""
    result = orch("run", "tracking=none", "--state-dir", str(tmp_path / "state"), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {j["name"]: j for j in result.status(tmp_path / "state")}
    fine, scratch = jobs["finetune"]["metrics"], jobs["finetune_scratch"]["metrics"]
    n = len(corpus.heldout_qa())
    assert fine["qa_questions"] == scratch["qa_questions"] == n
    assert fine["qa_correct"] >= 0.7 * n and scratch["qa_correct"] <= 0.15 * n, (fine, scratch)
    assert f"held-out QA exact match: finetune {fine['qa_correct']}/{n}" in result.stdout


def test_pipeline_s3_store_writes_no_secret(orch, s3_server):
    """`orch run` (pretrain -> two fine-tunes) on S3 over loopback, W&B offline, with planted AWS and
    W&B keys: everything the pipeline promises (_check_pipeline, the logs, the report made again by
    `orch report`), and no byte under the sandbox (state folder, scratch, Ray's sessions, HOME, TMPDIR,
    W&B's folders), in the bucket or in any command's output holds a key. (The local-folder store
    runs every other scenario of the suite.)"""
    with sandboxed() as (root, dirs, env):
        secrets = plant_secrets()
        env = {**env, **secrets, "ORCH_REPORT": "1"}
        bucket = s3_server.make_bucket("orch")
        store = ["storage=s3", f"storage.root=s3://{bucket}/orch", f"storage.endpoint_url={s3_server.endpoint_url}"]
        state = dirs["state"]
        outputs = {}
        dry = orch("run", *TINY, *store, "--state-dir", str(state), "--dry-run", env=env, timeout=120)
        assert dry.returncode == 0, dry.stderr
        outputs["orch run --dry-run"] = dry.stdout + dry.stderr
        result = orch("run", *TINY, *store, "--state-dir", str(state), env=env)
        outputs["orch run"] = result.stdout + result.stderr
        _check_pipeline(state, dirs["tmp"], result, {"endpoint_url": s3_server.endpoint_url})
        jobs = result.status(state)
        (pre,) = [j for j in jobs if j["name"] == "pretrain"]
        outputs["orch logs"] = _check_logs(state, pre, env=env)  # the workers' output, from the bucket
        # `orch report PIPELINE`: the page again, from the records and the bucket, where `orch run` put it.
        page = state / "reports" / pre["pipeline_id"] / "index.html"
        page.unlink()
        out = orch("report", pre["pipeline_id"], "--state-dir", str(state), env=env)
        assert out.returncode == 0 and out.stdout.strip() == str(page), out.stderr
        _check_report(page, jobs)
        for args in (["status"], ["status", "--json"], ["status", pre["id"]]):
            out = orch(*args, "--state-dir", str(state), env=env, timeout=120)
            assert out.returncode == 0, out.stderr
            outputs["orch " + " ".join(args)] = out.stdout + out.stderr

        # The keys were there to leak: S3 was used (datasets, checkpoints, exports, the workers' output
        # and the metrics history in the bucket), W&B wrote its offline runs, Ray its session logs.
        hits, files = find_in_tree(root, secrets)
        in_bucket, objects = bucket_hits(s3_server, bucket, secrets)
        assert hits + in_bucket + output_hits(outputs, secrets) == []
        assert objects > 10 and files > 50, (objects, files)
        assert len(list(state.rglob("run-*.wandb"))) == 3  # one W&B run per job, in the state folder
        assert not list(dirs["scratch"].rglob("*.wandb"))  # never on a worker's scratch disk
        assert all(j["metrics_history"]["rows"] > 0 and j["metrics_history"]["uri"].startswith("s3://") for j in jobs)
        assert list(dirs["ray"].glob("ray/session_*/logs/*"))
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert any(k.startswith("orch/datasets/stories/") for k in keys)
        assert any(k.endswith(COMMIT_MARKER) for k in keys)
        assert not (state / "store").exists()  # everything went to the bucket, nothing to a local store


def test_interrupted_run_resumes_from_its_last_commit(tmp_path, orch):
    """`orch run` stopped with SIGTERM (a reboot, a scheduler) while fine-tuning, after a checkpoint
    committed: the unfinished job is recorded CANCELLED (never left RUNNING) and the exit is clean;
    run again, it names `--resume` (not a terminal); `orch run --resume` continues the same pipeline:
    pretraining is not run again, fine-tuning resumes at its last committed step (the steps before
    it are not trained again) and finishes. (Ctrl-C takes the same path: KeyboardInterrupt, exit 130.)"""
    import signal
    import socket
    import time

    from orchestrator.checkpoint.layout import latest_committed
    from orchestrator.jobs.retry import ABANDONED
    from orchestrator.jobs.store import JobStore
    from orchestrator.train.history import read_history

    state = tmp_path / "state"
    steps = 120  # fine-tuning long enough that SIGTERM lands before its end (24 took ~2 s: a race)
    args = ["model=gpt_tiny", "trainer.max_steps=4", "trainer.log_interval=1", "checkpoint.interval=2",
            "data.num_documents=300", f"pipeline.jobs.finetune.trainer.max_steps={steps}",
            "pipeline.jobs.finetune.data.num_documents=200", "~pipeline.jobs.finetune_scratch", "tracking=none",
            "--state-dir", str(state)]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            jobs = {j.name: j for j in JobStore(state).list()} if (state / "jobs.db").exists() else {}
            if "finetune" in jobs and jobs["finetune"].checkpoint:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"fine-tuning never committed a checkpoint: {[(j.id, j.state.value) for j in jobs.values()]}")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-2000:]
    jobs = {j.name: j for j in JobStore(state).list()}
    pre, fine = jobs["pretrain"], jobs["finetune"]
    assert pre.state.value == "SUCCEEDED" and fine.state.value == "CANCELLED" and fine.failure_reason == ABANDONED
    store = open_store(fine.checkpoint)
    run = fine.checkpoint.rsplit("/checkpoints/", 1)[0]
    at = latest_committed(store, run).step
    assert 2 <= at < steps

    # Run again, not on a terminal: a hint that names --resume (the cluster it then tries is unreachable).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hint = orch("run", *args, env={"RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)
    assert f"pipeline {pre.pipeline_id} in {state} was interrupted" in hint.stdout, hint.stdout + hint.stderr
    assert "finetune continues from step-" in hint.stdout and "`orch run --resume`" in hint.stdout
    assert len(JobStore(state).list()) == 2  # nothing new was submitted

    resumed = orch("run", *args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"pipeline {pre.pipeline_id} continues (pretrain finished, finetune continues from step-" in resumed.stdout
    jobs = {j.name: j for j in JobStore(state).list()}
    assert len(jobs) == 2 and all(j.state.value == "SUCCEEDED" for j in jobs.values())
    assert [h["state"] for h in jobs["pretrain"].history] == [h["state"] for h in pre.history]  # not run again
    states = [h["state"] for h in jobs["finetune"].history]
    assert states[-6:] == ["CANCELLED", "PENDING", "QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], states
    running = [h for h in jobs["finetune"].history if h["state"] == "RUNNING"][-1]
    assert f"resumed from {run}/checkpoints/step-{at}" in running["reason"]
    # One row per step; those up to the commit are the first attempt's (not trained again).
    history = read_history(store, run)
    assert history["attempts"] == {"1": 0, "2": at}
    rows = history["rows"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["attempt"] == (1 if r["step"] <= at else 2) for r in rows)
    assert {"kind": "resume", "from_step": at} in [{k: e[k] for k in ("kind", "from_step") if k in e}
                                                   for e in rows[at]["events"]]

    again = orch("run", *args, "--resume", timeout=120)
    assert again.returncode == 2 and "nothing to continue" in again.stderr and "finished" in again.stderr
