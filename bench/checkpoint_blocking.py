"""Checkpoint cost: how long the training loop is blocked per checkpoint with the background
upload, against a synchronous save plus upload of the same checkpoint; then recovery: the time
from `kill -9` of a worker to the first step after the resume, and the steps lost.

    .venv/bin/python bench/checkpoint_blocking.py                     # S3 on loopback (moto)
    .venv/bin/python bench/checkpoint_blocking.py --link-mbit 400     # S3 behind a 400 Mbit/s link (root)

The model is a ~30M-parameter GPT (a ~350 MB ZeRO-2 checkpoint with Adam states) on 2 CPU workers.
Target: blocking(async) / blocking(sync) <= 0.2.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reader_throughput import shaped_link, wait_for_port  # noqa: E402

MODEL = ["model=gpt_small", "model.n_layer=8", "model.n_embd=512", "model.n_head=8", "model.vocab_size=4096",
         "data.vocab_size=512"]


def _moto(link_mbit: int):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host, prefix, netns = "127.0.0.1", [], None
    if link_mbit:
        netns = shaped_link(link_mbit)
        host, prefix = "10.213.0.2", ["ip", "netns", "exec", netns]
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(host, port)
    return proc, netns, f"http://{host}:{port}"


def _rows(state: Path):
    """The job and its metrics history rows (from the store: one row per step, each with its attempt)."""
    from orchestrator.checkpoint.layout import run_uri
    from orchestrator.jobs.store import JobStore
    from orchestrator.storage import open_store
    from orchestrator.train.history import read_history

    (job,) = JobStore(state).list()
    storage = job.config["storage"]
    store = open_store(storage["root"], endpoint_url=storage.get("endpoint_url"))
    history = read_history(store, run_uri(storage["root"], job.id))
    job.attempts = {int(a): s for a, s in history["attempts"].items()}
    return job, history["rows"]


def _cmd(state: Path, endpoint: str, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", "pipeline=pretrain", *MODEL, f"trainer.max_steps={steps}",
            "trainer.log_interval=1", "storage=s3", "storage.root=s3://orch-bench/orch",
            f"storage.endpoint_url={endpoint}", "--state-dir", str(state), *extra]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--link-mbit", type=int, default=0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    args = p.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      WANDB_MODE="offline")
    server, netns, endpoint = _moto(args.link_mbit)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="orch-bench")
        blocking = {}
        with tempfile.TemporaryDirectory() as tmp:
            for mode in ("true", "false"):
                state = Path(tmp) / f"async-{mode}"
                out = subprocess.run(_cmd(state, endpoint, args.steps, [f"checkpoint.interval={args.interval}",
                                                                         f"checkpoint.async_upload={mode}"]),
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
                _, rows = _rows(state)
                saves = [r["metrics"]["ckpt/blocking_s"] for r in rows if "ckpt/blocking_s" in r["metrics"]]
                steps = [r["metrics"]["perf/step_time_s"] for r in rows if "perf/step_time_s" in r["metrics"]][1:]
                blocking[mode] = sum(saves) / len(saves)
                print(f"async_upload={mode:<5}: {len(saves)} saves, blocking {blocking[mode]:.3f} s per save "
                      f"(median step {sorted(steps)[len(steps) // 2]:.3f} s)")
            print(f"ratio blocking async / sync = {blocking['true'] / blocking['false']:.3f}   (target <= 0.2)")

            # Recovery: kill a worker mid-run; time to the first step after the resume, steps lost.
            state = Path(tmp) / "kill"
            proc = subprocess.Popen(_cmd(state, endpoint, args.steps * 2, [f"checkpoint.interval={args.interval}",
                                                                           "pipeline.jobs.pretrain.max_failures=2"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            import psutil

            from orchestrator.jobs.store import JobStore

            killed_at = step_at_kill = None
            while proc.poll() is None and killed_at is None:
                time.sleep(0.2)
                if not (state / "jobs.db").exists():
                    continue
                jobs = JobStore(state).list()
                step = jobs[0].metrics.get("step", 0) if jobs else 0
                if step >= args.interval * 2 + args.interval // 2:
                    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                               if "RayTrainWorker" in " ".join(c.cmdline())]
                    if workers:
                        step_at_kill, killed_at = step, time.time()
                        os.kill(workers[-1].pid, signal.SIGKILL)
            proc.wait()
            job, rows = _rows(state)
            last = max(job.attempts)
            after = [r for r in rows if r["attempt"] == last and "train/loss" in r["metrics"]]
            resumed_step = job.attempts[last]
            print(f"kill -9 at step ~{step_at_kill}: first step after resume "
                  f"{after[0]['time'] - killed_at:.1f} s "
                  f"later, resumed from step {resumed_step}: {step_at_kill - resumed_step} steps redone "
                  f"(checkpoint.interval={args.interval}; job {job.state.value}, restarts {job.restarts})")
    finally:
        server.terminate()
        server.wait()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
