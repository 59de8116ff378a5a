"""Each ZeRO stage trains and exports, and resumes at another worker count or ZeRO stage: a
2-worker checkpoint is converted to a DeepSpeed universal checkpoint and continued by 1 and by 3
workers, for ZeRO stages 1, 2 and 3, and across stages 2 <-> 3; the global batch stays fixed
(gradient accumulation changes) and the data order continues, so the losses match the uninterrupted
2-worker run."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.gpt import GPTConfig, flops_per_token, tied_weights
from orchestrator.checkpoint.export import load_exported_weights
from orchestrator.checkpoint.layout import list_checkpoints, read_marker
from orchestrator.jobs.store import JobStore
from orchestrator.storage import open_store
from tests import wandb_files

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 16, 8


def _losses(job) -> dict[int, float]:
    rows = wandb_files.history(wandb_files.run_file(job.wandb["dir"]))
    return {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _common(stage: int, model: str = "gpt_tiny") -> list[str]:
    return ["pipeline=pretrain", f"deepspeed=zero{stage}", f"model={model}", f"trainer.max_steps={STEPS}",
            "trainer.log_interval=1", "trainer.global_batch_size=24", "trainer.micro_batch_size=4",
            f"checkpoint.interval={SAVE_AT}", "checkpoint.keep_last=3", "data.num_documents=600",
            "cluster.peak_flops_per_device=1e12"]


def _check_trained_and_exported(job: dict, stage: int, scratch: Path) -> None:
    """The run at this stage trained, its checkpoints say their stage and carry the tokenizer and
    the model config, its export loads, and W&B has MFU = tokens/s x FLOPs/token / (workers x peak)."""
    assert job["state"] == "SUCCEEDED" and job["metrics"]["loss"] < job["metrics"]["first_loss"]
    store = open_store(job["checkpoint"])
    marker = read_marker(store, list_checkpoints(store, job["checkpoint"].rsplit("/checkpoints/", 1)[0])[-1])
    assert marker["zero_stage"] == stage
    assert {"tokenizer.json", "model_config.json", "trainer_state.json"} <= {f["path"] for f in marker["files"]}
    weights = load_exported_weights(store, job["export"], scratch, tied_weights(GPTConfig()))
    assert weights["transformer.wte.weight"].shape == (512, 64)
    rows = [r for r in wandb_files.history(wandb_files.run_file(job["wandb"]["dir"])) if "perf/mfu" in r]
    assert rows
    flops = flops_per_token(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64), 64)
    for r in rows:
        assert r["perf/mfu"] == pytest.approx(r["perf/tokens_per_s"] * flops / (2 * 1e12), rel=1e-6)
        assert 0 < r["perf/mfu"] < 1


@pytest.mark.reliability(category="fault: training",
                         case="a 2-worker ZeRO-{stage} checkpoint resumed at 1 and 3 workers (and at another stage)",
                         lost="nothing: the losses match the uninterrupted 2-worker run",
                         happened="converted to a universal checkpoint and continued at step 9 with the same losses")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_a_two_worker_checkpoint_at_one_and_three_workers(tmp_path: Path, orch, stage):
    # ZeRO-3 with activation checkpointing (the same losses: the forward is recomputed, not changed)
    checkpointing = [f"model.activation_checkpointing={'true' if stage == 3 else 'false'}"]
    ref = orch("run", *_common(stage), *checkpointing, "--state-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    (ref_job,) = JobStore(tmp_path / "ref").list()
    (status,) = ref.status(tmp_path / "ref")
    _check_trained_and_exported(status, stage, tmp_path / "w")
    ckpt = ref_job.checkpoint.rsplit("/step-", 1)[0] + f"/step-{SAVE_AT}"

    extra = [f"+pipeline.jobs.w3={{kind:pretrain,workers:3,resume_from:'{ckpt}'}}"]
    out = orch("run", *_common(stage), *checkpointing, "pipeline.jobs.pretrain.workers=1",
               f"pipeline.jobs.pretrain.resume_from={ckpt}",
               *extra, "--state-dir", str(tmp_path / "resumed"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = {j.name: j for j in JobStore(tmp_path / "resumed").list()}
    expected = _losses(ref_job)
    for name, workers in (("pretrain", 1), ("w3", 3)):
        job = jobs[name]
        assert job.state.value == "SUCCEEDED" and job.workers == workers
        started = next(h["reason"] for h in job.history if h["state"] == "RUNNING")
        assert f"resumed from {ckpt} as a universal checkpoint" in started
        got = _losses(job)
        assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))  # it continued at step 9
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], rel=1e-4), (name, step)

    if stage in (2, 3):
        # At another ZeRO stage too: ZeRO-2 continued by ZeRO-3, ZeRO-3 continued by ZeRO-2 (3 workers).
        other, workers = (3, 2) if stage == 2 else (2, 3)
        switched = orch("run", *_common(other), f"pipeline.jobs.pretrain.workers={workers}",
                        f"pipeline.jobs.pretrain.resume_from={ckpt}", "--state-dir", str(tmp_path / "switched"))
        assert switched.returncode == 0, switched.stdout[-3000:] + switched.stderr[-3000:]
        (job,) = JobStore(tmp_path / "switched").list()
        got = _losses(job)
        assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], rel=1e-4), (f"zero{stage}->zero{other}", step)
