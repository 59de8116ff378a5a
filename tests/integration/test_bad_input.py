"""Bad input found by trying the CLI as a new user would: one clear line naming the value and the
fix, exit 2, no traceback (the real CLI in a child process). Here: the state folder, cluster
addresses, job ids, overrides and storage; corpora and datasets are in test_bad_data.py,
checkpoints and model folders in test_bad_checkpoints.py. None of these starts Ray."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.test_cli import _one_line_error

NOTHING = "nothing: no job recorded"


def _no_job_recorded(state) -> None:
    assert not (state / "jobs.db").exists()
    assert not (state / "store" / "runs").exists()


# ------------------------------------------------------------------------------ the state folder
@pytest.mark.reliability(category="state folder", case="damaged jobs.db", lost="nothing: the file is left as it was")
def test_damaged_job_database_is_one_line(orch, tmp_path):
    (tmp_path / "jobs.db").write_bytes(b"\x00garbage" * 600)
    before = (tmp_path / "jobs.db").read_bytes()
    _one_line_error(orch("status", "--state-dir", str(tmp_path)), "jobs.db", "not a readable job database", "mv ")
    assert (tmp_path / "jobs.db").read_bytes() == before


@pytest.mark.reliability(category="state folder", case="jobs.db is a folder", lost="nothing")
def test_job_database_that_is_a_folder(orch, tmp_path):
    (tmp_path / "jobs.db").mkdir()
    _one_line_error(orch("status", "--state-dir", str(tmp_path)), "jobs.db", "not a readable job database")


@pytest.mark.reliability(category="state folder", case="damaged cluster.json: {content}", lost="nothing")
@pytest.mark.parametrize("content", ["{nope", '{"nodes": 1}', "[1, 2]", '{"address": "nope"}',
                                     '{"address": "127.0.0.1:99999"}'])
def test_damaged_cluster_file_is_one_line(orch, tmp_path, content):
    (tmp_path / "cluster.json").write_text(content)
    _one_line_error(orch("status", "--state-dir", str(tmp_path)), "cluster.json", "damaged", "orch up")


@pytest.mark.reliability(category="state folder", case="--state-dir is a file (`orch {command}`)", lost="nothing")
@pytest.mark.parametrize("command", ["status", "run --dry-run", "export job-1 out"])
def test_state_dir_that_is_a_file(orch, tmp_path, command):
    state = tmp_path / "state"
    state.write_text("not a folder")
    _one_line_error(orch(*command.split(), "--state-dir", str(state)), str(state), "is a file", "folder")
    assert state.read_text() == "not a folder"


# ------------------------------------------------------------------------------ cluster addresses
@pytest.mark.reliability(category="cluster address", case="up --nodes 0", lost="nothing")
def test_up_with_no_nodes_is_one_line(orch, tmp_path):
    _one_line_error(orch("up", "--nodes", "0", "--state-dir", str(tmp_path)), "--nodes", "0")
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.reliability(category="cluster address", case="up --port 70000", lost="nothing: no cluster started")
def test_up_on_a_port_that_is_not_one(orch, tmp_path):
    # --cpus-per-node 0 as well: if the port were not checked first, that refusal (not a cluster) follows
    result = orch("up", "--port", "70000", "--cpus-per-node", "0", "--state-dir", str(tmp_path))
    _one_line_error(result, "--port", "70000", "6379")
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.reliability(category="cluster address", case="up --cpus-per-node 0", lost="nothing: no cluster started")
def test_up_with_no_cpus(orch, tmp_path):
    _one_line_error(orch("up", "--cpus-per-node", "0", "--state-dir", str(tmp_path)), "--cpus-per-node", "0")
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.reliability(category="cluster address", case="--address where nothing listens", lost=NOTHING,
                         happened="one line naming the address and `orch up` in seconds (not Ray's minutes of "
                                  "retries); exit 2")
def test_run_against_an_address_where_nothing_listens_answers_in_seconds(orch, tmp_path):
    t0 = time.monotonic()
    result = orch("run", "--address", "127.0.0.1:1", "model=gpt_tiny", "--state-dir", str(tmp_path), timeout=120)
    _one_line_error(result, "127.0.0.1:1", "orch up")
    assert time.monotonic() - t0 < 60  # it used to wait through Ray's retries for minutes
    _no_job_recorded(tmp_path)


@pytest.mark.reliability(category="cluster address", case="--address {address} ({command})", lost=NOTHING)
@pytest.mark.parametrize("command, address, needles", [
    ("run", "host:notaport", ["'host:notaport'", "HOST:PORT"]),
    ("run", "http://127.0.0.1:8265", ["Jobs API", "HOST:PORT", "orch submit --address http://127.0.0.1:8265"]),
    ("status", "10.0.0.5", ["'10.0.0.5'", "HOST:PORT"]),
    ("status", "http://127.0.0.1:1", ["cannot reach the Ray Jobs API at http://127.0.0.1:1", "port-forward"]),
])
def test_address_that_is_not_a_ray_address(orch, tmp_path, command, address, needles):
    extra = ["model=gpt_tiny"] if command == "run" else []
    result = orch(command, "--address", address, *extra, "--state-dir", str(tmp_path), timeout=60)
    _one_line_error(result, *needles)
    _no_job_recorded(tmp_path)


# ------------------------------------------------------------------------------ job ids
def _empty_records(state) -> None:
    from orchestrator.jobs.store import JobStore

    JobStore(state)  # an empty job database, as `orch run` leaves one


@pytest.mark.reliability(category="job id", case="`orch {command}` with the job id {job!r}",
                         lost="nothing: nothing read or written outside the state folder")
@pytest.mark.parametrize("command, job", [
    ("status", "../../x"), ("logs", "/etc"), ("cancel", "a/b"), ("scale --workers 2", ".."),
    ("status", "../jobs.db"), ("submit --after", "../x"), ("sync", "../x"), ("report", "../x"),
])
def test_job_id_with_path_traversal_is_refused(orch, tmp_path, command, job):
    state = tmp_path / "state"
    _empty_records(state)
    name, *flags = command.split()
    if name == "submit":
        args = ["submit", "pipeline=pretrain", "model=gpt_tiny", *flags, job]
    else:
        args = [name, job, *flags]
    _one_line_error(orch(*args, "--state-dir", str(state)), repr(job), "not a job id", "orch status")
    assert sorted(p.name for p in state.iterdir()) == ["jobs.db"]


@pytest.mark.reliability(category="job id", case="`orch {command}` of an unknown job id (no cluster up)",
                         lost="nothing")
@pytest.mark.parametrize("command", ["logs", "cancel", "scale --workers 2", "sync", "report"])
def test_unknown_job_id_without_a_cluster(orch, tmp_path, command):
    _empty_records(tmp_path)
    name, *flags = command.split()
    _one_line_error(orch(name, "p000000-nope", *flags, "--state-dir", str(tmp_path)), "'p000000-nope'", "orch status")


@pytest.mark.reliability(category="job id", case="`orch export` of an unknown job id",
                         lost="nothing: no folder written")
def test_export_of_an_unknown_job_id(orch, tmp_path):
    _empty_records(tmp_path / "state")
    result = orch("export", "p000000-nope", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, "p000000-nope", "job id")
    assert not (tmp_path / "out").exists()


@pytest.mark.reliability(category="job id", case="`orch scale --workers {workers}`", lost="nothing")
@pytest.mark.parametrize("workers", ["0", "-3"])
def test_scale_to_no_workers(orch, tmp_path, workers):
    _one_line_error(orch("scale", "p000000-pretrain", "--workers", workers, "--state-dir", str(tmp_path)),
                    "--workers", workers, "at least 1")


# ------------------------------------------------------------------------------ overrides
@pytest.mark.reliability(category="config", case="malformed override `{override}`", lost=NOTHING)
@pytest.mark.parametrize("override, needles", [
    ("=x", ["nothing before '='", "key=value"]),
    ("a==b", ["'a==b'", "a='=b'"]),
    ("data.uri=s3://b/x?a=b", ["data.uri='s3://b/x?a=b'"]),
    ("trainer.max_steps=[1,2", ["'trainer.max_steps=[1,2'", "close the brackets"]),
    ("trainer.lr={a:1", ["'trainer.lr={a:1'", "close the brackets"]),
    ("model.n_layer=[ü]", ["model.n_layer", "quote the items"]),
])
def test_malformed_override(orch, tmp_path, override, needles):
    result = orch("run", override, "--state-dir", str(tmp_path))
    line = _one_line_error(result, *needles)
    assert "expecting {" not in line  # not Hydra's list of grammar tokens
    _no_job_recorded(tmp_path)


@pytest.mark.reliability(category="config", case="non-ASCII path in an override and in --state-dir", lost="nothing",
                         happened="taken as given: the CLI quotes a non-ASCII value for Hydra's grammar")
def test_non_ascii_paths_are_quoted_for_the_user(orch, tmp_path):
    state = tmp_path / "état ü"
    result = orch("run", "--dry-run", "model=gpt_tiny", "data.uri=file:///tmp/ü/données", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert "uri: file:///tmp/ü/données" in result.stdout
    assert f"state_dir: {state}" in result.stdout
    assert not state.exists()  # a dry run writes nothing


@pytest.mark.reliability(category="config", case="data.name={name}",
                         lost="nothing: nothing written outside storage.root/datasets")
@pytest.mark.parametrize("name", ["../../x", "/etc", "a/b", ".."])
def test_dataset_name_with_path_traversal(orch, tmp_path, name):
    result = orch("data", "prepare", f"data.name={name}", "pipeline=pretrain", "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, "name=" + repr(name), "is not a safe name")
    assert not (tmp_path / "state").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ storage
@pytest.mark.reliability(category="storage", case="S3 endpoint {endpoint!r} is not a URL", lost=NOTHING)
@pytest.mark.parametrize("endpoint", ["notaurl", "ftp://host", "http://"])
def test_s3_endpoint_that_is_not_a_url(orch, tmp_path, endpoint):
    result = orch("run", "storage=s3", "storage.root=s3://b/x", f"storage.endpoint_url={endpoint}",
                  "--state-dir", str(tmp_path))
    _one_line_error(result, repr(endpoint), "http(s)://")
    _no_job_recorded(tmp_path)


@pytest.mark.reliability(category="storage", case="storage.root={root}", lost=NOTHING)
@pytest.mark.parametrize("root", ["gs://bucket/x", "relative/folder"])
def test_storage_root_that_no_backend_takes(orch, tmp_path, root):
    result = orch("run", "model=gpt_tiny", f"storage.root={root}", "--state-dir", str(tmp_path))
    _one_line_error(result, repr(root), "s3://", "file://")
    _no_job_recorded(tmp_path)


class _Forbidden(BaseHTTPRequestHandler):
    """An S3 endpoint that rejects every request's keys, as S3 does wrong ones."""

    def _deny(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def rejecting_s3():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.reliability(category="storage", case="storage=s3 with wrong credentials", lost=NOTHING,
                         happened="one line naming the endpoint and AWS_ACCESS_KEY_ID (never a key's value); exit 2")
def test_wrong_credentials_named_without_values(orch, tmp_path, rejecting_s3):
    secret = "wrongsecretvalue123"
    env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": secret}
    result = orch("run", "storage=s3", "storage.root=s3://bucket/orch", f"storage.endpoint_url={rejecting_s3}",
                  "--state-dir", str(tmp_path), env=env, timeout=120)
    line = _one_line_error(result, "rejected the credentials", rejecting_s3, "AWS_ACCESS_KEY_ID")
    assert secret not in result.stderr + result.stdout and "AKIAWRONG" not in line
    _no_job_recorded(tmp_path)

