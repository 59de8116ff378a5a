"""The DeepSpeed config dict and the learning-rate schedule of a job: pure functions of its config."""

from __future__ import annotations

import math

from orchestrator.config.schema import JobConfig


def deepspeed_config(job: JobConfig, world_size: int, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON config for `job` at `world_size` workers. The global batch is fixed; the
    worker count only changes gradient accumulation. `load_universal`: the checkpoint to resume
    from is a universal one (saved at another world size or ZeRO stage)."""
    ds, tr = job.deepspeed, job.trainer
    zero: dict = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage < 3:
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": job.cluster.accelerator == "cuda"}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": job.cluster.accelerator == "cuda"}
    # torch's AdamW on CPU; DeepSpeed's fused kernels on GPUs (its CPU ops need a compile).
    torch_adam = job.cluster.accelerator == "cpu"
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": job.gradient_accumulation_steps(world_size),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": tr.lr, "betas": [tr.beta1, tr.beta2], "eps": 1e-8, "weight_decay": tr.weight_decay,
                       **({"torch_adam": True} if torch_adam else {})},
        },
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, cosine decay."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
