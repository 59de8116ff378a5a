"""Ray's Jobs REST API over plain HTTP (the standard library's urllib): what `orch ... --address
http://HEAD:8265` needs from a head (submit, status, logs, stop) without Ray on the laptop, so a
client install is orch's wheel alone, no `train` extra.

The paths, request bodies and replies are those of Ray's own client, read from ray 2.60.0
(dashboard/modules/job/sdk.py, JobSubmissionClient.submit_job/get_job_info/get_job_logs/stop_job;
dashboard/modules/job/common.py, JobStatus). A cluster with token authentication gets
`Authorization: Bearer <token>` (ray/_private/authentication/http_token_authentication.py), the
token taken where Ray's clients take it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from orchestrator.errors import ClusterError


class JobStatus(str, Enum):
    """A Ray job's state, as the Jobs API names it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclass(frozen=True)
class JobInfo:
    status: JobStatus
    message: str | None  # Ray's sentence about the job (why it failed, ...)
    driver_exit_code: int | None  # the entrypoint's exit code, once it has one


def auth_token() -> str | None:
    """The cluster token this machine holds, where Ray's own clients look for it; None without one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


class JobsHttpClient:
    """The four calls of Ray's JobSubmissionClient that orch makes, against one head's dashboard."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.address, self.timeout = address.rstrip("/"), timeout
        token = auth_token()
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self._request("GET", "/api/version")  # as Ray's client does first: a refusal (auth, not Ray) shows here

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.address + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = (e.read().decode(errors="replace").strip().splitlines() or [e.reason])[0][:300]
            hint = ("; a cluster with token authentication needs its token here (RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") if e.code in (401, 403) else ""
            raise ClusterError(f"the Ray Jobs API at {self.address} answered {method} {path} with HTTP {e.code} "
                               f"({detail}){hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ClusterError(f"the Ray Jobs API at {self.address} did not answer {method} {path} "
                               f"({getattr(e, 'reason', None) or e})") from None

    def submit_job(self, *, entrypoint: str, entrypoint_num_cpus: float = 0, metadata: dict | None = None) -> str:
        body = {"entrypoint": entrypoint, "entrypoint_num_cpus": entrypoint_num_cpus, "metadata": metadata or {}}
        reply = self._request("POST", "/api/jobs/", body)
        return reply["submission_id"]

    def get_job_info(self, job_id: str) -> JobInfo:
        reply = self._request("GET", f"/api/jobs/{job_id}")
        return JobInfo(JobStatus(reply["status"]), reply.get("message"), reply.get("driver_exit_code"))

    def get_job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/api/jobs/{job_id}/logs").get("logs", "")

    def stop_job(self, job_id: str) -> bool:
        return bool(self._request("POST", f"/api/jobs/{job_id}/stop").get("stopped"))
