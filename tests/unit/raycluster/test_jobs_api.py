"""The laptop side of `orch ... --address http://HEAD:8265` (orchestrator/raycluster/jobs_api.py) as pure logic:
the head's command line, the resolved jobs on it, following a Ray job's log and exit code (a fake
JobSubmissionClient; the real one is driven in tests/integration/test_controller.py)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import Enum

import pytest

from orchestrator.errors import ClusterError, ConfigError
from orchestrator.raycluster import jobs_api


def test_the_head_command_defaults_the_state_folder_there_and_quotes_every_word():
    cmd = jobs_api.head_command(["logs", "p1-pretrain; rm -rf /", "--follow"])
    assert cmd.startswith('ORCH_STATE_DIR="${ORCH_STATE_DIR:-$HOME/.orch}" orch ')
    assert shlex.split(cmd.split(" ", 1)[1]) == ["orch", "logs", "p1-pretrain; rm -rf /", "--follow"]


def test_resolved_jobs_travel_as_one_word():
    jobs = [{"name": "pretrain", "model": {"name": "ü-model"}, "depends_on": []}]
    word = jobs_api.encode_jobs(jobs)
    assert shlex.split(shlex.quote(word)) == [word] and " " not in word
    assert jobs_api.decode_jobs(word) == jobs
    with pytest.raises(ConfigError, match="--jobs-json"):
        jobs_api.decode_jobs("not base64 json!")
    with pytest.raises(ConfigError, match="list of resolved jobs"):
        jobs_api.decode_jobs(jobs_api.encode_jobs({"name": "x"}))


class Status(str, Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    def is_terminal(self) -> bool:
        return self is not Status.RUNNING


@dataclass
class Info:
    status: Status
    message: str = ""
    driver_exit_code: int | None = None


class FakeClient:
    """A Ray job whose log grows in `chunks`, one per poll, then ends as `final`."""

    def __init__(self, chunks: list[str], final: Info):
        self.chunks, self.final, self.polls = chunks, final, 0

    def get_job_info(self, job_id):
        self.polls += 1
        return self.final if self.polls >= len(self.chunks) else Info(Status.RUNNING)

    def get_job_logs(self, job_id):
        return "".join(self.chunks[: self.polls])


RAY_PREAMBLE = ("2026-11-29 15:49:31,112\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
                "Running entrypoint for job raysubmit_x: orch status\n")


def test_follow_prints_the_commands_output_only_and_errors_to_stderr(capsys):
    client = FakeClient([RAY_PREAMBLE + "JOB  STATE\np1-pre", "train  RUNNING\n", "orch: error: no job 'x'"],
                        Info(Status.FAILED, "Job entrypoint command failed with exit code 2", 2))
    assert jobs_api._follow(client, "raysubmit_x", poll_s=0) == 2
    out, err = capsys.readouterr()
    assert out == "JOB  STATE\np1-pretrain  RUNNING\n"  # a line split over two polls is printed whole
    assert err == "orch: error: no job 'x'\n"


def test_follow_keeps_output_that_comes_before_rays_entrypoint_line(capsys):
    """A fast command's output can reach the log before Ray's own "Running entrypoint" line."""
    chunks = ["2026-11-29 16:19:16,768\tINFO job_manager.py:581 -- Runtime env is setting up.\np1-pretrain\n",
              "Running entrypoint for job raysubmit_x: orch submit\n2026-11-29 16:19:17 p1-pretrain: submitted\n"]
    assert jobs_api._follow(FakeClient(chunks, Info(Status.SUCCEEDED, driver_exit_code=0)), "j", 0) == 0
    assert capsys.readouterr().out == "p1-pretrain\n2026-11-29 16:19:17 p1-pretrain: submitted\n"


@pytest.mark.parametrize("info, code", [
    (Info(Status.SUCCEEDED, driver_exit_code=0), 0),
    (Info(Status.FAILED, "Job entrypoint command failed with exit code 1, last available logs"), 1),
    (Info(Status.STOPPED), 130),
])
def test_exit_codes(info, code):
    assert jobs_api._exit_code(info) == code


def test_a_command_that_never_ran_is_one_line():
    info = Info(Status.FAILED, "Failed to set up runtime environment.\nTraceback ...")
    with pytest.raises(ClusterError, match=r"could not run on the head \(Failed to set up runtime environment\.\)"):
        jobs_api._exit_code(info)
