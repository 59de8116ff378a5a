"""`orch submit/status/logs/cancel/scale --address http://HEAD:8265`: the command runs on the head
as a Ray job, submitted through the Ray Jobs API of the head's dashboard, and its output and exit
code come back here.

No Ray Client: this side speaks HTTP only (Ray's Jobs REST API, raycluster/jobs_http.py: no Ray needed
here), so the laptop's Python and Ray need not match the cluster's; the head runs the orch installed
there (the image, the AMI's environment) against the controller beside it. `orch submit` composes
the config here, once (your --config-dir folders are read here), and sends the resolved jobs. On
the head, the state folder is its ORCH_STATE_DIR, else ~/.orch there, unless --state-dir names one
(a path on the head).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import socket
import sys
import time
from urllib.parse import urlparse

from orchestrator.constants import STATE_DIR_ENV
from orchestrator.errors import ClusterError, ConfigError

HEAD_STATE_DIR = "$HOME/.orch"  # on the head, where ORCH_STATE_DIR is not set
ERROR_PREFIX = "orch: error:"  # the head's one-line errors go to stderr here too
# The lines Ray itself writes into a job's log (the runtime env, the entrypoint), not the command's
RAY_OWN_LINE = re.compile(r"Running entrypoint for job "
                          r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ job_manager\.py:\d+ -- ")


def is_jobs_api_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def encode_jobs(job_dicts: list[dict]) -> str:
    """Resolved jobs as one command-line word (`orch submit --jobs-json WORD` on the head)."""
    return base64.urlsafe_b64encode(json.dumps(job_dicts).encode()).decode()


def decode_jobs(word: str) -> list[dict]:
    try:
        jobs = json.loads(base64.urlsafe_b64decode(word.encode()))
    except ValueError as e:
        raise ConfigError(f"--jobs-json is not what `orch submit --address http://...` sends ({e})") from None
    if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise ConfigError("--jobs-json must be a list of resolved jobs, as `orch submit --address http://...` sends")
    return jobs


def head_command(argv: list[str]) -> str:
    """The Ray job's entrypoint: `orch ARGV` in the head's shell, its state folder defaulted there."""
    return f'{STATE_DIR_ENV}="${{{STATE_DIR_ENV}:-{HEAD_STATE_DIR}}}" ' + shlex.join(["orch", *argv])


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    url = urlparse(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address} ({getattr(e, 'strerror', None) or e}); "
                           f"is the head's dashboard running and forwarded here (`ray dashboard CLUSTER.yaml`, "
                           f"`kubectl port-forward svc/orch-head-svc 8265:8265`)?") from None


def _client(address: str):
    _check_reachable(address)
    from orchestrator.raycluster.jobs_http import JobsHttpClient  # plain HTTP (and the token): no Ray here

    return JobsHttpClient(address)


def run_on_head(address: str, argv: list[str], poll_s: float = 0.5) -> int:
    """Run `orch ARGV` on the head of the cluster whose Jobs API is at `address`; print its output
    as it comes (errors to stderr) and return its exit code. Ctrl-C stops it there too."""
    client = _client(address)
    job_id = client.submit_job(entrypoint=head_command(argv), entrypoint_num_cpus=0,
                               metadata={"orch": argv[0]})
    try:
        return _follow(client, job_id, poll_s)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise


def _follow(client, job_id: str, poll_s: float) -> int:
    shown, pending = 0, ""
    while True:
        info = client.get_job_info(job_id)  # the status first: logs read after a terminal one are complete
        logs = client.get_job_logs(job_id)
        pending += logs[shown:]
        shown = len(logs)
        *lines, pending = pending.split("\n")
        if info.status.is_terminal() and pending:
            lines, pending = lines + [pending], ""
        for line in lines:
            if not RAY_OWN_LINE.match(line):
                _emit(line)
        if info.status.is_terminal():
            return _exit_code(info)
        time.sleep(poll_s)


def _emit(line: str) -> None:
    stream = sys.stderr if line.startswith(ERROR_PREFIX) else sys.stdout
    print(line, file=stream, flush=True)


def _exit_code(info) -> int:
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        m = re.search(r"failed with exit code (\d+)", info.message or "")
        code = int(m.group(1)) if m else None
    if code is not None:
        return code
    if info.status.value == "SUCCEEDED":
        return 0
    if info.status.value == "STOPPED":
        return 130
    detail = (info.message or info.status.value).strip().splitlines()[0]
    raise ClusterError(f"the command could not run on the head ({detail}); is orch installed there "
                       f"(`orch --version` in the head's environment)?")
