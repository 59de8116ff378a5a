"""Bad input found by trying the CLI as a new user would: one clear line naming the value and the
fix, exit 2, no traceback (the real CLI in a child process)."""

from __future__ import annotations

import time

import pytest

from tests.integration.test_cli import _one_line_error


def test_damaged_job_database_is_one_line(orch, tmp_path):
    (tmp_path / "jobs.db").write_bytes(b"\x00garbage" * 600)
    _one_line_error(orch("status", "--state-dir", str(tmp_path)), "jobs.db", "not a readable job database", "mv ")


def test_damaged_cluster_file_is_one_line(orch, tmp_path):
    (tmp_path / "cluster.json").write_text("{nope")
    _one_line_error(orch("status", "--state-dir", str(tmp_path)), "cluster.json", "damaged", "orch up")


def test_up_with_no_nodes_is_one_line(orch, tmp_path):
    _one_line_error(orch("up", "--nodes", "0", "--state-dir", str(tmp_path)), "--nodes", "0")


def test_run_against_an_address_where_nothing_listens_answers_in_seconds(orch, tmp_path):
    t0 = time.monotonic()
    result = orch("run", "--address", "127.0.0.1:1", "model=gpt_tiny", "--state-dir", str(tmp_path), timeout=120)
    _one_line_error(result, "127.0.0.1:1", "orch up")
    assert time.monotonic() - t0 < 60  # it used to wait through Ray's retries for minutes


@pytest.mark.parametrize("endpoint", ["notaurl", "ftp://host", "http://"])
def test_s3_endpoint_that_is_not_a_url(orch, tmp_path, endpoint):
    result = orch("run", "storage=s3", "storage.root=s3://b/x", f"storage.endpoint_url={endpoint}",
                  "--state-dir", str(tmp_path))
    _one_line_error(result, repr(endpoint), "http(s)://")


@pytest.mark.slow
@pytest.mark.parametrize("name, content, needles", [
    ("notes.txt", b"fine text " * 50 + b"\xff\xfe broken", ["notes.txt", "not UTF-8"]),
    ("a.txt.gz", b"this is not gzip at all", ["a.txt.gz", "not a valid gzip file"]),
    ("b.txt.zst", b"this is not zstd at all", ["b.txt.zst", "not a valid zstd file"]),
])
def test_corpus_file_that_cannot_be_read(orch, tmp_path, name, content, needles):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / name).write_bytes(content)
    result = orch("data", "prepare", str(src), str(tmp_path / "out"), "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, *needles)
