"""The embedded pipeline end to end: `orch run` on a real local Ray cluster with real DeepSpeed
engines (gloo on CPU), a real object store (local folder, or S3 over HTTP on loopback), and W&B
offline files read back from disk."""

from __future__ import annotations

import json
import math
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
from orchestrator.data.manifest import load_manifest
from orchestrator.data.order import global_batch, micro_batches, rank_slice
from orchestrator.data.reader import SplitReader
from orchestrator.storage import join_uri, open_store
from tests import wandb_files

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


def _check_pipeline(tmp_path: Path, result, storage_kwargs: dict) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state_dir = tmp_path / "state"
    jobs = {j["name"]: j for j in result.status(state_dir)}
    pre, fine, scratch = jobs["pretrain"], jobs["finetune"], jobs["finetune_scratch"]

    # Every job succeeded; the fine-tunes were admitted only after pretraining ended.
    assert pre["state"] == fine["state"] == scratch["state"] == "SUCCEEDED"
    for job in (fine, scratch):
        assert job["depends_on"] == [pre["id"]]
        assert _history(job)["STARTING"] >= _history(pre)["SUCCEEDED"]
        assert _history(job)["QUEUED"] >= _history(pre)["SUCCEEDED"]

    # Held-out QA: both fine-tunes were asked every question about the characters fine-tuning never
    # named, and scored (these test-sized runs are too short to learn the facts: no margin here).
    for job in (fine, scratch):
        assert job["metrics"]["qa_questions"] == 40 and 0 <= job["metrics"]["qa_correct"] <= 40, job["metrics"]
    assert (f"held-out QA exact match: finetune {fine['metrics']['qa_correct']}/40 "
            f"({fine['metrics']['qa_correct'] / 40:.0%}) vs finetune_scratch (from random weights) "
            f"{scratch['metrics']['qa_correct']}/40") in result.stdout
    rows = _status_json(state_dir, fine["id"])["metrics_history"]["rows"]
    assert rows[-1]["metrics"]["eval/qa_correct"] == fine["metrics"]["qa_correct"]
    logged = [r for r in wandb_files.history(wandb_files.run_file(Path(fine["wandb"]["dir"])))
              if "eval/qa_exact_match" in r]  # (W&B's summary keeps the last)
    assert [r["eval/qa_exact_match"] for r in logged] == [pytest.approx(fine["metrics"]["qa_correct"] / 40)]

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
    weights = load_exported_weights(store, pre["export"], tmp_path / "export", tied_weights(GPTConfig()))
    expected = _first_loss_from(weights, cfg, store, cfg["data"]["uri"], fine["workers"], tmp_path / "cache")
    assert fine["metrics"]["first_loss"] == pytest.approx(expected, rel=1e-4)
    torch.manual_seed(cfg["trainer"]["seed"])
    fresh = GPT(GPTConfig(**{k: v for k, v in cfg["model"].items() if k != "name"})).state_dict()
    from_scratch = _first_loss_from(fresh, cfg, store, cfg["data"]["uri"], fine["workers"], tmp_path / "cache")
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


def test_pipeline_local_store(tmp_path, orch):
    result = orch("run", *TINY, "--state-dir", str(tmp_path / "state"))
    _check_pipeline(tmp_path, result, {})


SECRET_KEY = "orch-test-secret-7f3a9c"  # moto accepts any key; this one must never be written anywhere
WANDB_KEY = "orch-test-wandb-key-51d2e8"


def _files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


def test_pipeline_s3_store(tmp_path, orch, s3_server):
    bucket = s3_server.make_bucket("orch")
    result = orch("run", *TINY, "storage=s3", f"storage.root=s3://{bucket}/orch",
                  f"storage.endpoint_url={s3_server.endpoint_url}", "--state-dir", str(tmp_path / "state"),
                  env={"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "WANDB_API_KEY": WANDB_KEY})
    _check_pipeline(tmp_path, result, {"endpoint_url": s3_server.endpoint_url})
    # Secrets travel in environment variables only: not in job records, W&B files, the store or output.
    for needle in (SECRET_KEY, WANDB_KEY):
        assert needle not in result.stdout + result.stderr
        assert _files_containing(tmp_path / "state", needle) == []
        client = s3_server.client()
        for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:
            assert needle.encode() not in client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), obj["Key"]
    # Everything went to the bucket, nothing to a local store.
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("orch/datasets/stories/") for k in keys)
    assert any(k.endswith(COMMIT_MARKER) for k in keys)
    assert not (tmp_path / "state" / "store").exists()


@pytest.mark.parametrize("stage", [1, 3])
def test_pretrain_each_zero_stage(tmp_path, orch, stage):
    """ZeRO stages 1 and 3 train and export too (stage 2 runs in the pipeline tests); stage 3 with
    activation checkpointing. MFU is logged from the model FLOPs and a configured peak."""
    result = orch("run", "pipeline=pretrain", f"deepspeed=zero{stage}", "model=gpt_tiny", "trainer.max_steps=12",
                  "trainer.log_interval=4", "data.num_documents=400", "cluster.peak_flops_per_device=1e12",
                  f"model.activation_checkpointing={'true' if stage == 3 else 'false'}",
                  "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job,) = result.status(tmp_path / "state")
    assert job["state"] == "SUCCEEDED"
    assert job["metrics"]["loss"] < job["metrics"]["first_loss"]
    store = open_store(job["checkpoint"])
    marker = read_marker(store, list_checkpoints(store, job["checkpoint"].rsplit("/checkpoints/", 1)[0])[-1])
    assert marker["zero_stage"] == stage
    weights = load_exported_weights(store, job["export"], tmp_path / "w", tied_weights(GPTConfig()))
    assert weights["transformer.wte.weight"].shape == (512, 64)
    # Every checkpoint carries the tokenizer and the model config.
    names = {f["path"] for f in marker["files"]}
    assert {"tokenizer.json", "model_config.json", "trainer_state.json"} <= names
    # Throughput and MFU in W&B: tokens/s x FLOPs/token / (workers x peak).
    from model.gpt import flops_per_token

    rows = [r for r in wandb_files.history(wandb_files.run_file(job["wandb"]["dir"])) if "perf/mfu" in r]
    assert rows
    flops = flops_per_token(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64), 64)
    for r in rows:
        assert r["perf/mfu"] == pytest.approx(r["perf/tokens_per_s"] * flops / (2 * 1e12), rel=1e-6)
        assert 0 < r["perf/mfu"] < 1


def test_sigterm_marks_unfinished_jobs_cancelled(tmp_path):
    """`orch run` killed with SIGTERM mid-pipeline: the running job and the one waiting behind it are
    recorded CANCELLED (never left RUNNING), the embedded cluster is stopped, and the exit is clean."""
    import signal
    import subprocess
    import sys
    import time

    from orchestrator.jobs.store import JobStore

    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", *TINY, "trainer.max_steps=100000",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (state / "jobs.db").exists():
                jobs = JobStore(state).list()
                if any(j.metrics.get("step", 0) >= 2 for j in jobs):
                    break
            time.sleep(1)
        else:
            pytest.fail("pretraining never started")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in out, out[-2000:]
    states = {j.name: (j.state.value, j.failure_reason) for j in JobStore(state).list()}
    assert states["pretrain"][0] == "CANCELLED" and "interrupted" in states["pretrain"][1]
    assert states["finetune"][0] == "CANCELLED"
