"""Resuming at another worker count or ZeRO stage: a 2-worker checkpoint is converted to a
DeepSpeed universal checkpoint and continued by 1 and by 3 workers, for ZeRO stages 1, 2 and 3, and
across stages 2 <-> 3; the global batch stays fixed (gradient accumulation changes) and the data
order continues, so the losses match the uninterrupted 2-worker run."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.jobs.store import JobStore
from tests import wandb_files

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 16, 8


def _losses(job) -> dict[int, float]:
    rows = wandb_files.history(wandb_files.run_file(job.wandb["dir"]))
    return {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _common(stage: int, model: str = "gpt_tiny") -> list[str]:
    return ["pipeline=pretrain", f"deepspeed=zero{stage}", f"model={model}", f"trainer.max_steps={STEPS}",
            "trainer.log_interval=1", "trainer.global_batch_size=24", "trainer.micro_batch_size=4",
            f"checkpoint.interval={SAVE_AT}", "checkpoint.keep_last=3", "data.num_documents=600"]


@pytest.mark.reliability(category="fault: training",
                         case="a 2-worker ZeRO-{stage} checkpoint resumed at 1 and 3 workers (and at another stage)",
                         lost="nothing: the losses match the uninterrupted 2-worker run",
                         happened="converted to a universal checkpoint and continued at step 9 with the same losses")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_a_two_worker_checkpoint_at_one_and_three_workers(tmp_path: Path, orch, stage):
    ref = orch("run", *_common(stage), "--state-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    (ref_job,) = JobStore(tmp_path / "ref").list()
    ckpt = ref_job.checkpoint.rsplit("/step-", 1)[0] + f"/step-{SAVE_AT}"

    extra = [f"+pipeline.jobs.w3={{kind:pretrain,workers:3,resume_from:'{ckpt}'}}"]
    out = orch("run", *_common(stage), "pipeline.jobs.pretrain.workers=1", f"pipeline.jobs.pretrain.resume_from={ckpt}",
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
