"""`orch nodes`, `orch nodes release NODE` and the quarantined nodes in `orch status`
(orchestrator/cli/nodes.py), on a state folder whose job store holds a quarantine (as `orch run`'s
embedded controller leaves it): through the one resolver, bad input in one line with exit 2."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator.cli.main import main
from orchestrator.jobs.quarantine import QUARANTINE_SETTING, QuarantineState
from orchestrator.jobs.store import JobStore
from tests.unit.jobs.test_lifecycle import record

NODE = "1a2b3c4d" + "e" * 48


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = JobStore(tmp_path)
    store.add([record("p1-pretrain")])
    now = time.time()
    entry = {"node_id": NODE, "node": "10.0.0.3", "since": now - 10, "until": now + 600,
             "blames": [{"at": now - 20, "class": "worker_crash", "job": "p1-pretrain"}] * 2,
             "line": "2 failures within 600 s (worker_crash of p1-pretrain, worker_crash of p1-pretrain)"}
    gone = {**entry, "node_id": "f" * 56, "until": now - 1}  # its TTL is over: not shown
    store.put_setting(QUARANTINE_SETTING, QuarantineState(nodes={NODE: entry, "f" * 56: gone}).to_json())
    return ["--state-dir", str(tmp_path)]


def test_nodes_lists_the_quarantined_nodes_and_status_shows_them(folder, capsys):
    assert main(["nodes", *folder]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NODE", "ADDRESS", "SINCE", "UNTIL", "LEFT", "WHY"]
    assert out[1].startswith("1a2b3c4d  10.0.0.3") and out[1].endswith("worker_crash of p1-pretrain)")
    assert len(out) == 3 and "orch nodes release NODE" in out[2]
    assert main(["nodes", "--json", *folder]) == 0
    (node,) = json.loads(capsys.readouterr().out)["quarantined"]
    assert node["node_id"] == NODE and len(node["blames"]) == 2
    assert main(["status", "--json", *folder]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert [n["node_id"] for n in row["quarantined_nodes"]] == [NODE]
    assert main(["status", *folder]) == 0
    assert "quarantined: node 1a2b3c4d (10.0.0.3) until " in capsys.readouterr().out


def test_release_lets_the_node_back_and_bad_input_is_one_line_and_exit_2(folder, capsys):
    for argv, expected in ((["nodes", "release", "zzz"], "'zzz' is no quarantined node; quarantined now: 1a2b3c4d "
                                                          "(10.0.0.3) (`orch nodes` lists them)"),
                           (["nodes", "release"], "orch nodes release needs the node"),
                           (["nodes", "show", "1a2b"], "`orch nodes` takes no node (got '1a2b')")):
        assert main([*argv, *folder]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["nodes", "release", "1a2b", *folder]) == 0
    assert capsys.readouterr().out.startswith("node 1a2b3c4d (10.0.0.3) released")
    assert main(["nodes", *folder]) == 0
    assert capsys.readouterr().out == "no node is quarantined\n"
