"""What the orchestration costs: `orch` against the bare `deepspeed` launcher on the same model,
DeepSpeed config and batch, both in one invocation, alternating, several rounds; medians and ratios.

    .venv/bin/python bench/overhead.py                     # all three parts, 3 rounds
    .venv/bin/python bench/overhead.py --parts steady --rounds 5

Parts:
- steady: tokens/s between step WARM and the last step. orch: `orch run` on an embedded cluster,
  reading the prepared shards from the local store; bare: bench/bare_deepspeed.py under the
  `deepspeed` launcher on random tokens (no data loading at all).
- start: start -> first step. orch: `orch submit` to a running `orch up` cluster (dataset prepared)
  -> the job's first step; bare: the `deepspeed` command -> its first step. Where each second goes,
  from the job record (submit, admission) and the start-up times rank 0 records in the job's history.
- recover: kill -9 of one worker of a running `orch run` -> its first step after the resume, and
  the steps redone (those since the last commit).

The model is the one issue 13 measured: GPT, 4 layers, d=256, 4 heads, T=128, vocab 4096, micro-batch
8, 2 ranks (global batch 16, no accumulation), ZeRO-2, fp32, gloo, one thread per rank, gradient
clipping 1.0 on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["pipeline=pretrain", "model=gpt_tiny", "model.n_layer=4", "model.n_embd=256", "model.n_head=4",
         "model.block_size=128", "model.vocab_size=4096", "data.seq_len=128", "trainer.micro_batch_size=8",
         "trainer.global_batch_size=16", "deepspeed=zero2", "trainer.grad_clip=1.0", "tracking=none"]
WARM = 10


def orch(*args: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=ROOT, **kw)
    if out.returncode:
        sys.exit(f"orch {' '.join(args[:2])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def job_history(state: Path, job_id: str | None = None) -> tuple[object, list[dict]]:
    from orchestrator.checkpoint.layout import run_uri
    from orchestrator.jobs.store import JobStore
    from orchestrator.storage import open_store
    from orchestrator.train.history import read_history

    jobs = JobStore(state).list()
    job = next(j for j in jobs if j.id == job_id) if job_id else jobs[-1]
    root = job.config["storage"]["root"]
    history = read_history(open_store(root), run_uri(root, job.id))
    job.attempts = {int(a): s for a, s in history["attempts"].items()}  # attempt -> the step it resumed from
    return job, history["rows"]


def steady_rate(step_times: dict[int, float], tokens_per_step: int, last: int) -> float:
    return tokens_per_step * (last - WARM) / (step_times[last] - step_times[WARM])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bare(steps: int, extra: list[str]) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    t0 = time.time()
    out = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                          str(ROOT / "bench" / "bare_deepspeed.py"), *MODEL, f"trainer.max_steps={steps}", *extra],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BARE ")), None)
    if out.returncode or line is None:
        sys.exit(f"bare deepspeed failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    d = json.loads(line[5:])
    d["launched"] = t0
    return d


def startup_of(rows: list[dict], attempt: int | None = None) -> dict:
    for r in rows:
        if "startup" in r and (attempt is None or r["attempt"] == attempt):
            return r["startup"]
    raise SystemExit("no start-up record in the job's history")


# ----------------------------------------------------------------------------------- steady
def steady(tmp: Path, rounds: int, steps: int) -> None:
    state = tmp / "steady"
    bare, ours = [], []
    for k in range(rounds):
        for side in ("bare", "orch") if k % 2 == 0 else ("orch", "bare"):
            if side == "bare":
                d = run_bare(steps, [])
                times = {i + 1: t for i, t in enumerate(d["step_times"])}
                bare.append(steady_rate(times, d["tokens_per_step"], steps))
            else:
                orch("run", *MODEL, f"trainer.max_steps={steps}", "trainer.log_interval=10", "--state-dir", str(state))
                job, rows = job_history(state)
                times = {r["step"]: r["time"] for r in rows if "train/loss" in r["metrics"]}
                tps = job.config["trainer"]["global_batch_size"] * job.config["data"]["seq_len"]
                ours.append(steady_rate(times, tps, steps))
            print(f"  round {k + 1} {side:<4}: {(bare if side == 'bare' else ours)[-1]:8.0f} tokens/s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"steady tokens/s (steps {WARM}-{steps}, median of {rounds}): bare deepspeed {b:.0f}, orch run {o:.0f}; "
          f"ratio orch/bare = {o / b:.3f}   (target >= 0.97)")


# ------------------------------------------------------------------------------------ start
STAGES = [("submit", "orch submit -> job record"), ("admit", "record -> STARTING (admission)"),
          ("group", "STARTING -> worker process start (runner, Ray Train, worker group)"),
          ("imports", "process start -> train function (imports, process group)"),
          ("data", "-> manifest and readers open"), ("engine", "-> engine built / restored"),
          ("batch", "-> first batch"), ("step", "-> first step done")]


def orch_stages(t0: float, job, s: dict) -> dict[str, float]:
    starting = next(h["at"] for h in job.history if h["state"] == "STARTING")
    marks = [t0, job.created_at, starting, s["process_start"], s["entered"], s["data_opened"], s["restored"],
             s["first_batch"], s["first_step"]]
    # A Ray worker process may have been started before the job (Ray keeps idle workers): count 0 then.
    out, prev = {}, marks[0]
    for (name, _), m in zip(STAGES, marks[1:]):
        out[name] = max(0.0, m - prev)
        prev = max(prev, m)
    return out


def start(tmp: Path, rounds: int) -> None:
    from orchestrator.jobs.store import JobStore

    state = tmp / "start"
    steps = 5
    orch("data", "prepare", *MODEL, "--state-dir", str(state))
    orch("up", "--state-dir", str(state))
    bare, ours, stages = [], [], []
    try:
        for k in range(rounds):
            for side in ("bare", "orch") if k % 2 == 0 else ("orch", "bare"):
                if side == "bare":
                    d = run_bare(steps, [])
                    bare.append(d["step_times"][0] - d["launched"])
                    print(f"  round {k + 1} bare: {bare[-1]:5.1f} s (launcher {d['process_start'] - d['launched']:.1f}"
                          f", python + imports {d['dist_init'] - d['process_start']:.1f}, engine "
                          f"{d['engine'] - d['dist_init']:.1f}, first step {d['step_times'][0] - d['engine']:.1f})",
                          flush=True)
                    continue
                t0 = time.time()
                job_id = orch("submit", *MODEL, f"trainer.max_steps={steps}", "--state-dir",
                              str(state)).stdout.split()[-1]
                # The job's record, read from the state folder: an `orch status` per second would be
                # a Python process and a Ray driver per second on the cores being measured.
                while JobStore(state).get(job_id).state.value not in ("SUCCEEDED", "FAILED"):
                    time.sleep(0.5)
                job, rows = job_history(state, job_id)
                s = startup_of(rows)
                ours.append(s["first_step"] - t0)
                stages.append(orch_stages(t0, job, s))
                print(f"  round {k + 1} orch: {ours[-1]:5.1f} s (" + ", ".join(f"{n} {v:.1f}" for n, v in
                                                                       stages[-1].items()) + ")", flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "down", "--state-dir", str(state)], cwd=ROOT,
                       capture_output=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"start -> first step (median of {rounds}): bare deepspeed {b:.1f} s, orch submit on a running cluster "
          f"{o:.1f} s; difference {o - b:+.1f} s   (target <= +5 s)")
    for name, what in STAGES:
        print(f"    {what:<66} {statistics.median(st[name] for st in stages):5.1f} s")


# ---------------------------------------------------------------------------------- recover
def recover(tmp: Path, rounds: int) -> None:
    import psutil

    interval, steps = 20, 2000
    results, noticed = [], []
    for k in range(rounds):
        state = tmp / f"recover-{k}"
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", *MODEL, f"trainer.max_steps={steps}",
                                 f"checkpoint.interval={interval}", "pipeline.jobs.pretrain.max_failures=2",
                                 "--state-dir", str(state)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        from orchestrator.jobs.store import JobStore

        killed_at = at_step = None
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if killed_at is None:
                    if not (state / "jobs.db").exists():
                        continue
                    jobs = JobStore(state).list()
                    step = jobs[0].metrics.get("step", 0) if jobs else 0
                    if step >= 2 * interval + interval // 2:
                        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                                   if "RayTrainWorker" in " ".join(c.cmdline())]
                        if len(workers) == 2:  # (each round the other one: rank 0 and rank 1 alike)
                            victim = sorted(workers, key=lambda c: c.pid)[k % 2]
                            at_step, killed_at = step, time.time()
                            os.kill(victim.pid, signal.SIGKILL)
                else:
                    job, rows = job_history(state)
                    if any("startup" in r for r in rows if r["attempt"] > 1):
                        break
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        job, rows = job_history(state)
        attempt = max(r["attempt"] for r in rows)
        s = startup_of(rows, attempt)
        resumed = job.attempts[attempt]
        restart = next((r["time"] for r in rows if r["attempt"] == attempt), s["process_start"])
        results.append(s["first_step"] - killed_at)
        restarting = next((h["at"] for h in job.history if h["state"] == "RESTARTING"), None)
        noticed.append(None if restarting is None else restarting - killed_at)
        print(f"  round {k + 1}: kill -9 -> the job shows RESTARTING "
              + ("never" if restarting is None else f"{restarting - killed_at:.1f} s"), flush=True)
        print(f"  round {k + 1}: kill -9 at step ~{at_step} -> first step after resume {results[-1]:.1f} s; resumed "
              f"from step {resumed} ({at_step - resumed} steps redone); worker process start "
              f"{s['process_start'] - killed_at:+.1f} s, train function {s['entered'] - killed_at:+.1f} s, restored "
              f"{s['restored'] - killed_at:+.1f} s, first batch {s['first_batch'] - killed_at:+.1f} s "
              f"(history row {restart - killed_at:+.1f} s)", flush=True)
    print(f"kill -9 -> first step after resume (median of {rounds}): {statistics.median(results):.1f} s   "
          f"(target <= 10 s)")
    seen = [n for n in noticed if n is not None]
    if seen:
        print(f"kill -9 -> RESTARTING (median of {len(seen)}): {statistics.median(seen):.1f} s   (target <= 3 s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="steady,start,recover")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ORCH_LOCAL_DIR"] = str(Path(tmp) / "scratch")
        for part in args.parts.split(","):
            print(f"# {part}", flush=True)
            parts = {"steady": lambda: steady(Path(tmp), args.rounds, args.steps),
                     "start": lambda: start(Path(tmp), args.rounds), "recover": lambda: recover(Path(tmp), args.rounds)}
            parts[part]()


if __name__ == "__main__":
    main()
