"""orchestrator/raycluster/jobs_http.py, the laptop's Ray Jobs API client without Ray, against a small
HTTP server on loopback that answers like Ray's dashboard (the paths and bodies of ray 2.60.0's
JobSubmissionClient): it sends the cluster token as a Bearer header, reads status, logs and exit
code, and turns a refusal into one line that says where the token goes. The real dashboard is
driven in tests/integration/test_client_install.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.errors import ClusterError
from orchestrator.raycluster.jobs_http import JobsHttpClient, JobStatus, auth_token


class _Dashboard(BaseHTTPRequestHandler):
    token: str | None = None
    seen: list = []

    def _reply(self, code: int, body) -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append((method, self.path, body, self.headers.get("Authorization")))
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(401, "Unauthorized: Missing authentication token")
        routes = {
            ("GET", "/api/version"): {"version": "4", "ray_version": "2.60.0"},
            ("POST", "/api/jobs/"): {"job_id": None, "submission_id": "raysubmit_1"},
            ("GET", "/api/jobs/raysubmit_1"): {"status": "FAILED", "message": "failed with exit code 2",
                                               "driver_exit_code": 2},
            ("GET", "/api/jobs/raysubmit_1/logs"): {"logs": "orch: error: no such job\n"},
            ("POST", "/api/jobs/raysubmit_1/stop"): {"stopped": True},
        }
        if (method, self.path) in routes:
            return self._reply(200, routes[(method, self.path)])
        self._reply(404, f"Job {self.path} does not exist")

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    _Dashboard.token, _Dashboard.seen = None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_submit_status_logs_stop_as_rays_client_sends_them(dashboard):
    client = JobsHttpClient(dashboard)
    job = client.submit_job(entrypoint="orch status", entrypoint_num_cpus=0, metadata={"orch": "status"})
    assert job == "raysubmit_1"
    info = client.get_job_info("raysubmit_1")
    assert info.status is JobStatus.FAILED and info.status.is_terminal() and info.driver_exit_code == 2
    assert not JobStatus.RUNNING.is_terminal()
    assert client.get_job_logs("raysubmit_1") == "orch: error: no such job\n"
    assert client.stop_job("raysubmit_1") is True
    post = next(s for s in _Dashboard.seen if s[:2] == ("POST", "/api/jobs/"))
    assert post[2] == {"entrypoint": "orch status", "entrypoint_num_cpus": 0, "metadata": {"orch": "status"}}
    assert all(auth is None for *_, auth in _Dashboard.seen)  # no token on this machine: none sent


def test_the_cluster_token_goes_as_a_bearer_header_from_where_ray_keeps_it(dashboard, tmp_path, monkeypatch):
    _Dashboard.token = "t0ken"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t0ken\n")  # what `ray get-auth-token --generate` writes
    assert auth_token() == "t0ken"
    JobsHttpClient(dashboard).get_job_info("raysubmit_1")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "other")  # the variable wins over the file, as in Ray
    assert auth_token() == "other"


def test_a_refusal_is_one_line_naming_the_address_and_where_the_token_goes(dashboard):
    _Dashboard.token = "t0ken"
    with pytest.raises(ClusterError) as e:
        JobsHttpClient(dashboard)
    msg = str(e.value)
    assert "\n" not in msg and dashboard in msg and "HTTP 401" in msg and "~/.ray/auth_token" in msg, msg
    _Dashboard.token = None
    with pytest.raises(ClusterError, match="HTTP 404 .*does not exist"):
        JobsHttpClient(dashboard).get_job_info("nope")


def test_a_head_that_does_not_answer_is_one_line_too():
    with pytest.raises(ClusterError, match="did not answer GET /api/version"):
        JobsHttpClient("http://127.0.0.1:9", timeout=2)
