"""GPU benchmark: the 124M and 1.3B presets in bf16 under ZeRO 1/2/3 on one GPU, through `orch run`
(the real worker loop, an embedded Ray cluster, DeepSpeed on NCCL), with tokens/s, MFU against the
device's measured bf16 matmul rate and against its datasheet peak, peak GPU memory, and whether the
loss fell.

    .venv/bin/python bench/gpu.py                 # one GPU; about 5 minutes on an H200 (6 runs)
    .venv/bin/python bench/gpu.py --only gpt_1_3b # one preset (or --only zero3, --only gpt2_124m/zero2)
    .venv/bin/python bench/gpu.py --smoke         # the same code path on CPU: gpt_tiny, fp32, gloo, a few steps

Each run is `python -m orchestrator run pipeline=pretrain ...` with its own state folder; the
figures come from the job's metrics history in the store (what the loop logged: perf/tokens_per_s,
perf/model_tflops_per_device, system/gpu_memory_max_allocated_gb, train/loss). Every run ends with
the loop's final checkpoint and the export, as a user's would; the bench deletes them afterwards
(a 1.3B checkpoint with Adam states is ~20 GB). The dataset is prepared once and shared.
Target (issue 13): >= 45% MFU for gpt_1_3b on one H200, against the datasheet peak.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("gpt2_124m", "gpt_1_3b")
STAGES = (1, 2, 3)
MFU_TARGET = 0.45  # gpt_1_3b on one H200, datasheet peak

GPU_RUN = ["cluster=gpu", "cluster.address=null", "data.seq_len=1024", "data.num_documents=20000",
           "trainer.micro_batch_size=16", "trainer.global_batch_size=16", "trainer.lr=6e-4", "trainer.min_lr=6e-5",
           "trainer.warmup_steps=5", "trainer.log_interval=5"]
SMOKE_RUN = ["cluster=local", "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "trainer.lr=3e-3",
             "trainer.min_lr=3e-4", "trainer.warmup_steps=2", "trainer.log_interval=2"]


@dataclass
class Result:
    name: str
    wall_s: float
    tokens_per_s: float = 0.0
    tflops: float = 0.0  # model TFLOP/s per device (MFU's numerator)
    mem_gb: float | None = None
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    error: str | None = None

    @property
    def loss_fell(self) -> bool:
        return self.last_loss < self.first_loss * 0.9


def matmul_rate(device: str, smoke: bool) -> float:
    """The device's dense matmul rate (FLOP/s) in the benchmark's precision: bf16 8192^3 on a GPU,
    fp32 on CPU (smoke). Best of a few timed rounds after a warm-up."""
    import torch

    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def _command(model: str, stage: int, steps: int, state: Path, store: Path, smoke: bool) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", "pipeline=pretrain", "pipeline.jobs.pretrain.workers=1",
            "pipeline.jobs.pretrain.max_failures=0", f"model={model}", f"deepspeed=zero{stage}", "tracking=none",
            "checkpoint.interval=0", "trainer.eval_batches=1", f"trainer.max_steps={steps}",
            f"storage.root=file://{store}", *(SMOKE_RUN if smoke else GPU_RUN), "--state-dir", str(state)]


def _rows(state: Path) -> list[dict]:
    from orchestrator.execution.job_history import metrics_history
    from orchestrator.jobs.store import JobStore

    (record,) = JobStore(state).list()
    history = metrics_history(record)
    if "error" in history:
        raise RuntimeError(f"metrics history unreadable: {history['error']}")
    return history["rows"]


def _summarise(name: str, wall_s: float, rows: list[dict], warmup_steps: int) -> Result:
    """Steady figures: the logged intervals after `warmup_steps` (compile, allocator and cache warm-up)."""
    losses = [(r["step"], r["metrics"]["train/loss"]) for r in rows if "train/loss" in r["metrics"]]
    steady = [r["metrics"] for r in rows if r["step"] > warmup_steps and "perf/tokens_per_s" in r["metrics"]]
    if not steady:
        steady = [r["metrics"] for r in rows if "perf/tokens_per_s" in r["metrics"]][-1:]
    mem = [r["metrics"]["system/gpu_memory_max_allocated_gb"] for r in rows
           if "system/gpu_memory_max_allocated_gb" in r["metrics"]]
    return Result(name, wall_s, statistics.median(m["perf/tokens_per_s"] for m in steady),
                  statistics.median(m["perf/model_tflops_per_device"] for m in steady), max(mem) if mem else None,
                  losses[0][1], losses[-1][1])


def run_one(model: str, stage: int, steps: int, work: Path, smoke: bool, timeout_s: float) -> Result:
    name = f"{model}/zero{stage}"
    state = work / f"state-{model}-zero{stage}"
    t0 = time.perf_counter()
    try:
        out = subprocess.run(_command(model, stage, steps, state, work / "store", smoke), cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(name, time.perf_counter() - t0, error=f"timed out after {timeout_s:.0f} s")
    wall = time.perf_counter() - t0
    try:
        if out.returncode:
            tail = (out.stdout + out.stderr).strip().splitlines()[-12:]
            return Result(name, wall, error=f"orch run exited {out.returncode}:\n    " + "\n    ".join(tail))
        return _summarise(name, wall, _rows(state), warmup_steps=max(2, steps // 4))
    finally:  # keep the shared dataset; drop this run's checkpoints, export and records
        shutil.rmtree(work / "store" / "runs", ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def _selected(only: list[str]) -> list[tuple[str, int]]:
    runs = [(m, s) for m in MODELS for s in STAGES]
    return [(m, s) for m, s in runs if not only or any(o in f"{m}/zero{s}" for o in only)]


def report(results: list[Result], measured: float, peak: float | None, device: str) -> bool:
    print(f"\n{'run':<18} {'wall s':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU meas.':>9} {'MFU sheet':>9} "
          f"{'peak GB':>8} {'loss first->last':>18}")
    ok = True
    for r in results:
        if r.error:
            ok = False
            print(f"{r.name:<18} {r.wall_s:7.0f}  FAILED: {r.error}")
            continue
        sheet = f"{r.tflops * 1e12 / peak:9.1%}" if peak else f"{'n/a':>9}"
        mem = f"{r.mem_gb:8.1f}" if r.mem_gb is not None else f"{'n/a':>8}"
        fell = "fell" if r.loss_fell else "DID NOT FALL"
        ok &= r.loss_fell
        print(f"{r.name:<18} {r.wall_s:7.0f} {r.tokens_per_s:10,.0f} {r.tflops:8.3g} {r.tflops * 1e12 / measured:9.1%} "
              f"{sheet} {mem} {r.first_loss:7.3f}->{r.last_loss:6.3f} {fell}")
    big = [r for r in results if r.name.startswith("gpt_1_3b") and not r.error]
    if big and peak:
        best = max(big, key=lambda r: r.tflops)
        verdict = "met" if best.tflops * 1e12 / peak >= MFU_TARGET else "MISSED"
        print(f"gpt_1_3b best MFU {best.tflops * 1e12 / peak:.1%} ({best.name}) of the {device} datasheet peak: "
              f"target >= {MFU_TARGET:.0%} {verdict}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check of the same path: gpt_tiny, fp32, gloo")
    p.add_argument("--only", action="append", default=[], help="run only the names containing this (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; smoke 8)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    p.add_argument("--keep", help="a folder to keep the runs' state in (default: a temporary one)")
    args = p.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or use --smoke for the CPU check of the same code path")
        return 2
    from orchestrator.train.mfu import peak_flops

    device = "cpu" if args.smoke else "cuda"
    name = "CPU" if args.smoke else torch.cuda.get_device_name(0)
    measured = matmul_rate(device, args.smoke)
    peak = None if args.smoke else peak_flops(name)
    if args.smoke:
        sheet = "none for a CPU (smoke: the MFU columns only show the path works)"
    elif peak:
        sheet = f"{peak / 1e12:.1f} TFLOP/s (measured/peak {measured / peak:.2f})"
    else:
        sheet = "unknown for this device: add it to PEAK_BF16_FLOPS in orchestrator/train/mfu.py"
    print(f"device: {name}; measured {'fp32' if args.smoke else 'bf16'} matmul {measured / 1e12:.3g} TFLOP/s; "
          f"datasheet bf16 peak {sheet}")
    runs = [("gpt_tiny", s) for s in STAGES] if args.smoke else _selected(args.only)
    steps = args.steps or (8 if args.smoke else 40)
    work = Path(args.keep or tempfile.mkdtemp(prefix="orch-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    try:
        for model, stage in runs:
            r = run_one(model, stage, steps, work, args.smoke, args.timeout_s)
            results.append(r)
            print(f"{r.name}: {'FAILED' if r.error else 'done'} in {r.wall_s:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = report(results, measured, peak, name)
    print(f"total {time.perf_counter() - t0:.0f} s for {len(results)} runs of {steps} steps "
          f"(target on an H200: under 6 minutes including setup)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
