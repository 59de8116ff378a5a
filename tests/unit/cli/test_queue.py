"""`orch queue` and `orch queue set` (orchestrator/cli/queue.py): who submits, the overrides `set`
takes, forwarding to a head through the one resolver, and the view of a queue report."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import resolve
from orchestrator.cli.main import main
from orchestrator.cli.queue import queue_lines, submitter
from orchestrator.config.schema import QueuesConfig, QueueSpec, Resources
from orchestrator.errors import ConfigError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.sharing import Usage, queue_report
from orchestrator.jobs.state import JobState


def test_the_user_is_the_flag_else_orch_user_else_the_os_user(monkeypatch):
    monkeypatch.setenv("ORCH_USER", "bob")
    assert submitter("alice") == "alice"
    assert submitter(None) == "bob"
    monkeypatch.delenv("ORCH_USER")
    monkeypatch.setattr("getpass.getuser", lambda: "carol")
    assert submitter(None) == "carol"
    with pytest.raises(ConfigError, match=r"user 'a b' is not a plain name.*pass --user NAME or set ORCH_USER"):
        submitter("a b")


def test_queue_set_takes_queue_overrides_only_and_bad_values_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["queue", "set", "model=gpt_tiny"]) == 2
    assert "orch queue set takes queues=OPTION and queues.KEY=VALUE overrides, got 'model=gpt_tiny'" in \
        capsys.readouterr().err
    assert main(["queue", "set", "queues=two_teams", "queues.teams.team-a.quota.workers=-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "workers=-3.0 must be >= 0" in err and "Traceback" not in err
    assert main(["queue", "set", "queues=nope"]) == 2
    assert "valid choices: default, two_teams" in capsys.readouterr().err


def test_queue_set_forwarded_to_a_head_sends_the_queues_composed_here(monkeypatch):
    sent = []
    monkeypatch.setattr(resolve, "run_on_head", lambda address, argv: sent.append(argv) or 0)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["queue", "set", "queues=two_teams", "queues.teams.team-b.weight=3"]) == 0
    (argv,) = sent
    assert argv[:2] == ["queue", "--queues-json"] and argv[-1] == "set"
    config = json.loads(argv[2])
    assert config["teams"]["team-b"]["weight"] == 3 and config["teams"]["team-a"]["quota"]["workers"] == 4
    assert main(["queue", "--json"]) == 0
    assert sent[-1] == ["queue", "--json", "show"]


def test_the_view_shows_quota_use_borrowing_share_and_why_each_job_waits():
    cfg = QueuesConfig(teams={"team-a": QueueSpec(quota=Resources(workers=2), borrow=Resources(workers=2)),
                              "team-b": QueueSpec(quota=Resources(workers=4), borrow=Resources(workers=0))})

    def rec(id, state, queue, workers, seq):
        return JobRecord(id=id, pipeline_id="p", name=id, kind="pretrain", state=state, priority=0, depends_on=[],
                         config={"workers": workers, "max_failures": 0,
                                 "cluster": {"cpus_per_worker": 1, "gpus_per_worker": 0}},
                         created_at=0.0, seq=seq, queue=queue, user="alice")

    jobs = [rec("a0", JobState.RUNNING, "team-a", 3, 1), rec("b0", JobState.RUNNING, "team-b", 4, 2),
            rec("b1", JobState.QUEUED, "team-b", 1, 3)]
    report = queue_report(jobs, {"CPU": 8.0}, cfg, Usage(0.0, {"team-a": 7200.0}), 0.0)
    text = "\n".join(queue_lines(report))
    a = next(line for line in text.splitlines() if line.startswith("team-a"))
    # share: (7200 + 3 x 3600) / (that + 4 x 3600) = 56%
    assert a.split() == ["team-a", "1", "2/-/-", "2/-/-", "3/0/3", "1", "workers", "7,200", "56%", "50%", "0"]
    assert "b1  team-b  alice  p0  1w  QUEUED: team-b at its quota 4/4 workers and nothing to borrow" in text


def test_the_readme_sharing_commands_parse_and_its_queue_set_composes():
    import shlex
    from pathlib import Path

    from orchestrator.cli.main import build_parser
    from orchestrator.config.compose import compose_root

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## Sharing a cluster", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines() if line.startswith("orch ")]
    assert [c[0] for c in commands] == ["queue", "submit", "queue"]
    for argv in commands:
        args, extra = build_parser().parse_known_args(argv)
        assert not [e for e in extra if e.startswith("-")], argv
    queue_set = build_parser().parse_args(commands[0])
    assert queue_set.action == "set"
    assert compose_root(queue_set.overrides).queues.teams["team-a"].quota.workers == 8
