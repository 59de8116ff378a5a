"""Data wait while training: the fraction of step time the training loop waits for its batch, for
the small preset reading its shards from S3 (a moto server in its own process, optionally behind a
rate-limited link), measured by the trainer itself (perf/data_wait_fraction, read back from W&B).

    .venv/bin/python bench/data_wait.py                      # gpt_small, 150 steps, loopback S3
    .venv/bin/python bench/data_wait.py --link-mbit 200      # behind a 200 Mbit/s link (root)

Target: under 1% of step time after the first step (the first step waits for the first window of
shards on any reader; it is reported separately).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reader_throughput import shaped_link, wait_for_port  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--model", default="gpt_small")
    p.add_argument("--link-mbit", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="more orch overrides")
    args = p.parse_args()

    import socket

    creds = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(creds)
    env = dict(os.environ, WANDB_MODE="offline")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host, prefix, netns = "127.0.0.1", [], None
    if args.link_mbit:
        netns = shaped_link(args.link_mbit)
        host, prefix = "10.213.0.2", ["ip", "netns", "exec", netns]
    server = subprocess.Popen([*prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://{host}:{port}"
    try:
        wait_for_port(host, port)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="orch-bench")
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "state"
            cmd = [sys.executable, "-m", "orchestrator", "run", "pipeline=pretrain", f"model={args.model}",
                   f"trainer.max_steps={args.steps}", "trainer.log_interval=1", "storage=s3",
                   "storage.root=s3://orch-bench/orch", f"storage.endpoint_url={endpoint}", "--state-dir", str(state),
                   *args.overrides]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
            from orchestrator.jobs.store import JobStore
            from tests import wandb_files

            (job,) = JobStore(state).list()
            rows = [r for r in wandb_files.history(wandb_files.run_file(job.wandb["dir"])) if "perf/data_wait_s" in r]
    finally:
        server.terminate()
        server.wait()
        if netns:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    first, rest = rows[0], rows[1:]
    wait = sum(r["perf/data_wait_s"] for r in rest)
    step = sum(r["perf/step_time_s"] for r in rest)
    link = f"{args.link_mbit} Mbit/s link" if args.link_mbit else "loopback"
    print(f"{args.model}, {len(rows)} steps, S3 at {endpoint} ({link})")
    print(f"first step: data wait {first['perf/data_wait_s'] * 1e3:.1f} ms of {first['perf/step_time_s'] * 1e3:.1f} ms")
    print(f"steps 2..{len(rows)}: data wait {wait / len(rest) * 1e3:.2f} ms of {step / len(rest) * 1e3:.1f} ms "
          f"per step = {wait / step:.2%} of step time   (target < 1%)")


if __name__ == "__main__":
    main()
