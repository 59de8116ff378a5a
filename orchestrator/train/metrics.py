"""The per-interval metrics row of the training loop: loss, lr, tokens, step time, data wait, MFU.

Pure bookkeeping over a clock: the loop says when a step is done and how long it waited for its
batch, and on logging steps asks for the row, averaged over the steps since the previous row.
"""

from __future__ import annotations

import time
from typing import Callable

from orchestrator.train.mfu import mfu


class IntervalMetrics:
    """Accumulates what happened since the last logged step and turns it into one metrics row."""

    def __init__(self, *, log_interval: int, max_steps: int, tokens_per_step: int, flops_per_token: float,
                 world_size: int, peak_flops: float | None, shard_wait_s: float,
                 clock: Callable[[], float] = time.perf_counter):
        self.log_interval, self.max_steps = log_interval, max_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token  # model FLOPs per token (the model family's flops_per_token)
        self.world_size = world_size
        self.peak_flops = peak_flops  # per device; None: unknown, no perf/mfu
        self.clock = clock
        self._reset(clock(), shard_wait_s)

    def _reset(self, now: float, shard_wait_s: float) -> None:
        self.t_last = now  # when the interval began
        self.data_wait = 0.0  # seconds the loop waited for batches in this interval
        self.steps = 0  # steps done in this interval
        self.shard_wait_at = shard_wait_s  # the reader's cumulative shard wait when the interval began

    def stepped(self, data_wait_s: float) -> None:
        """One more step done, which waited `data_wait_s` seconds for its batch."""
        self.data_wait += data_wait_s
        self.steps += 1

    def due(self, step: int) -> bool:
        """Whether `step` (1-based, just done) logs a row: every log_interval, the first and the last."""
        return step % self.log_interval == 0 or step == self.max_steps or step == 1

    def row(self, *, loss: float, lr: float, tokens_seen: int, shard_wait_s: float) -> dict[str, float]:
        """The metrics of the interval now ending (and a new interval begins). `shard_wait_s`: the
        reader's cumulative wait for shard downloads."""
        now = self.clock()
        step_time = (now - self.t_last) / self.steps
        tokens_per_s = self.tokens_per_step / step_time
        metrics = {"train/loss": loss, "train/lr": lr, "train/tokens": tokens_seen,
                   "perf/step_time_s": step_time, "perf/data_wait_s": self.data_wait / self.steps,
                   "perf/data_wait_fraction": self.data_wait / (now - self.t_last),
                   "perf/shard_wait_s": (shard_wait_s - self.shard_wait_at) / self.steps,
                   "perf/tokens_per_s": tokens_per_s,
                   "perf/model_tflops_per_device": tokens_per_s * self.flops_per_token / self.world_size / 1e12}
        utilisation = mfu(tokens_per_s, self.flops_per_token, self.world_size, self.peak_flops)
        if utilisation is not None:
            metrics["perf/mfu"] = utilisation
        self._reset(now, shard_wait_s)
        return metrics


def grad_norm(engine) -> dict[str, float]:
    """The global gradient norm of the last optimizer step, where DeepSpeed computed one."""
    try:
        norm = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - not every ZeRO stage / optimizer keeps it
        return {}
    if norm is None:
        return {}
    norm = float(norm)
    return {"train/grad_norm": norm} if norm == norm and norm >= 0 else {}


def system_metrics(device: str) -> dict[str, float]:
    """The training node's own system metrics, seen from rank 0: CPU, memory and, on GPUs, device
    utilisation and memory (W&B's system monitor would measure the runner's node instead)."""
    import psutil
    import torch

    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(interval=None),
           "system/memory_percent": psutil.virtual_memory().percent,
           "system/rss_gb": proc.memory_info().rss / 2**30}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["system/gpu_memory_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["system/gpu_memory_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        try:
            out["system/gpu_utilization"] = float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - needs NVML (pynvml)
            pass
    return out
