"""The CLI's one resolver (orchestrator/cli/resolve.py): where a command's jobs live, and the
command line a head receives, rebuilt from the parsed namespace."""

from __future__ import annotations

import time

import pytest

from orchestrator.cli.main import build_parser
from orchestrator.cli.resolve import Head, Local, rebuild_argv, where
from orchestrator.errors import ClusterError, ConfigError, JobNotFound
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore

FORWARDED = [
    ["status"],
    ["status", "p1-pretrain", "--json", "--watch", "--interval", "0.5"],
    ["logs", "p1-pretrain", "-f", "--rank", "2", "--controller"],
    ["logs", "p1-pretrain"],
    ["cancel", "p1-pretrain", "--now"],
    ["scale", "p1-pretrain", "--workers", "4"],
    ["retry", "p1-pretrain"],
    ["submit", "--jobs-json", "e30=", "--after", "p0-pretrain", "--after", "p0-finetune"],
    ["submit", "model=gpt_tiny", "trainer.max_steps=40", "--dry-run"],
    ["submit", "--jobs-json", "e30=", "--user", "alice", "--queue", "team-a"],
    ["queue"],
    ["queue", "--json"],
    ["queue", "set", "--queues-json", "{}"],
    ["nodes"],
    ["nodes", "--json"],
    ["nodes", "release", "1a2b3c4d"],
]


@pytest.mark.parametrize("argv", FORWARDED, ids=" ".join)
def test_a_forwarded_command_parses_back_to_the_same_namespace(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    again = parser.parse_args([argv[0], *rebuild_argv(args.parser_of_command, args)])
    skip = {"parser_of_command", "func"}
    assert {k: v for k, v in vars(again).items() if k not in skip} == {k: v for k, v in vars(args).items()
                                                                       if k not in skip}


def test_the_local_addresses_and_folders_are_not_forwarded():
    parser = build_parser()
    args = parser.parse_args(["status", "--address", "http://head:8265", "--state-dir", "/here/.orch"])
    assert rebuild_argv(args.parser_of_command, args) == []


def _args(argv, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return build_parser().parse_args([*argv, "--state-dir", str(tmp_path)])


def test_a_jobs_api_address_is_the_head(tmp_path, monkeypatch):
    args = _args(["status"], tmp_path, monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with where(args) as target:
        assert target == Head("http://127.0.0.1:8265")


def test_a_command_that_reads_records_itself_refuses_a_jobs_api_address(tmp_path, monkeypatch):
    args = _args(["report", "p1", "--address", "http://127.0.0.1:8265"], tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="reads the job records itself"), where(args, head=False):
        pass


def test_no_cluster_and_no_records_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no job records in"), where(_args(["status"], tmp_path, monkeypatch)):
        pass


def _record(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, pipeline_id="p1", name="pretrain", kind="pretrain", state=JobState.RUNNING,
                     priority=0, depends_on=[], config={"workers": 2}, created_at=time.time())


def test_the_state_folder_without_a_cluster_is_local(tmp_path, monkeypatch):
    JobStore(str(tmp_path)).add([_record("p1-pretrain")])
    with where(_args(["status"], tmp_path, monkeypatch)) as target:
        assert isinstance(target, Local) and [r.id for r in target.records()] == ["p1-pretrain"]


def test_changing_a_job_needs_a_controller_and_names_an_unknown_job_first(tmp_path, monkeypatch):
    JobStore(str(tmp_path)).add([_record("p1-pretrain")])
    with pytest.raises(JobNotFound), where(_args(["cancel", "p9-nope"], tmp_path, monkeypatch), control="cancel"):
        pass
    with pytest.raises(ClusterError, match="no cluster to cancel job p1-pretrain"):
        with where(_args(["cancel", "p1-pretrain"], tmp_path, monkeypatch), control="cancel"):
            pass
    with pytest.raises(ClusterError, match="orch run --resume"):
        with where(_args(["retry", "p1-pretrain"], tmp_path, monkeypatch), control="retry"):
            pass


def test_a_controller_of_another_layout_is_one_line():
    """A detached controller that an older orch started (its class under another module path, as
    before the packages of this layout) is refused with the restart to do, not met as a pickle
    traceback when it restarts."""
    from orchestrator.service.actor import CONTROLLER_LAYOUT
    from orchestrator.service.client import check_layout

    check_layout({"pid": 7, "layout": CONTROLLER_LAYOUT}, "127.0.0.1:6379", CONTROLLER_LAYOUT)
    with pytest.raises(ClusterError, match=r"another version of orch \(an older layout, pid 7\).*`orch down` then "
                                           r"`orch up`"):
        check_layout({"pid": 7, "state_dir": "/s", "started_at": 1.0}, "127.0.0.1:6379", CONTROLLER_LAYOUT)
