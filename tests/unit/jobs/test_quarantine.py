"""Bad-node quarantine (orchestrator/jobs/quarantine.py): K blames of a node within the window
quarantine it for the TTL, never when a job could then no longer fit, a release lets it back and
forgets its blames; then the controller stepped by hand (fake runners, no Ray) with a node view: the
failures a runner reports quarantine their node, the runners are told (and the failing one's events
acknowledged), admission counts the cluster without the node, a controller restart keeps it, and
`release_node` lets it back in."""

from __future__ import annotations

import pytest

from orchestrator.config.schema import QuarantineConfig
from orchestrator.errors import ConfigError
from orchestrator.jobs.controller import Controller
from orchestrator.jobs.events import EventKind
from orchestrator.jobs.quarantine import (
    Blame,
    NodeSlot,
    QuarantineState,
    blames_of,
    decide,
    find_node,
    release,
    workers_that_fit,
)
from orchestrator.jobs.state import JobState
from tests.unit.jobs.test_lifecycle import FakeLauncher, record

A, B, C = "a" * 56, "b" * 56, "c" * 56
NODES = [NodeSlot(n, f"10.0.0.{i}", {"CPU": 2.0}) for i, n in enumerate((A, B, C), 1)]
K2 = QuarantineConfig(failures=2, window_s=600.0, ttl_s=1200.0)


def blame(node: str, at: float, cls: str = "worker_crash", job: str = "j") -> Blame:
    return Blame(node, "10.0.0.1", at, cls, job)


def running(workers: int = 2, strategy: str = "PACK", cpus: float = 1.0):
    r = record("j", workers=workers)
    r.config["cluster"] = {"cpus_per_worker": cpus, "gpus_per_worker": 0, "placement_strategy": strategy}
    r.state = JobState.RUNNING
    return r


def test_k_blames_within_the_window_quarantine_the_node_for_the_ttl():
    one = decide(QuarantineState(), [blame(A, 100.0)], K2, 100.0, NODES, [running()])
    assert not one.quarantined and not one.state.nodes
    two = decide(one.state, [blame(A, 400.0, "stall")], K2, 400.0, NODES, [running()])
    (node,) = two.quarantined
    assert (node["node_id"], node["since"], node["until"]) == (A, 400.0, 1600.0)
    assert [b["class"] for b in node["blames"]] == ["worker_crash", "stall"]
    (line,) = two.lines
    assert line.startswith("node aaaaaaaa (10.0.0.1) quarantined for 1200 s after 2 failures within 600 s "
                           "(worker_crash of j, stall of j)") and "orch nodes release aaaaaaaa" in line
    assert [n["node_id"] for n in two.state.active(1599.0)] == [A] and not two.state.active(1600.0)  # the TTL
    # a blame older than the window does not count
    late = decide(one.state, [blame(A, 800.0)], K2, 800.0, NODES, [running()])
    assert not late.quarantined
    # JSON round trip (the controller persists it in the job store)
    assert QuarantineState.from_json(two.state.to_json()) == two.state


def test_never_the_last_nodes_a_job_fits_on_say_so_instead():
    state = decide(QuarantineState(), [blame(A, 1.0), blame(A, 2.0)], K2, 2.0, NODES, [running()]).state
    assert [n["node_id"] for n in state.active(3.0)] == [A]
    # B is blamed twice too: the job (4 workers of 1 CPU) then fits only on B and C (2 CPUs each)
    held = decide(state, [blame(B, 3.0), blame(B, 4.0)], K2, 4.0, NODES, [running(workers=4)])
    assert not held.quarantined and [n["node_id"] for n in held.state.active(5.0)] == [A]
    assert held.lines == ("node bbbbbbbb (10.0.0.1) would be quarantined after 2 failures within 600 s (worker_crash "
                          "of j, worker_crash of j), but job j needs it: without it only 2 of its 4 workers fit; it "
                          "stays in placement",)
    # a job that ended needs nothing
    done = running(workers=4)
    done.state = JobState.SUCCEEDED
    assert decide(state, [blame(B, 3.0), blame(B, 4.0)], K2, 4.0, NODES, [done]).quarantined


@pytest.mark.parametrize("strategy, cpus, fit", [("PACK", 1.0, 6), ("SPREAD", 2.0, 3), ("STRICT_PACK", 1.0, 2),
                                                 ("STRICT_SPREAD", 1.0, 3), ("PACK", 3.0, 0)])
def test_workers_that_fit_follow_the_placement_strategy(strategy, cpus, fit):
    assert workers_that_fit(running(strategy=strategy, cpus=cpus), NODES) == fit


def test_only_the_configured_classes_blame_and_a_disabled_quarantine_blames_none():
    crash = {"at": 5.0, "class": "worker_crash", "nodes": ["10.0.0.1"], "node_ids": [A]}
    assert blames_of(crash, "j", K2) == [Blame(A, "10.0.0.1", 5.0, "worker_crash", "j")]
    assert blames_of({**crash, "class": "worker_error"}, "j", K2) == []  # (a peer's death: collateral)
    assert blames_of({**crash, "class": "user"}, "j", K2) == []
    straggler = {"at": 6.0, "rank": 1, "node": "10.0.0.2", "node_id": B, "ratio": 2.0}  # (a record's `stragglers`)
    assert blames_of(straggler, "j", K2) == [Blame(B, "10.0.0.2", 6.0, "straggler", "j")]
    assert blames_of(crash, "j", QuarantineConfig(enabled=False)) == []
    with pytest.raises(ValueError, match="quarantine.classes has 'crash'"):
        QuarantineConfig(classes=("crash",))


def test_release_by_id_prefix_or_address_forgets_the_blames_so_far():
    state = decide(QuarantineState(), [blame(A, 1.0), blame(A, 2.0)], K2, 2.0, NODES, [running()]).state
    assert find_node(state, "aaaa", 3.0)["node_id"] == A and find_node(state, "10.0.0.1", 3.0)["node_id"] == A
    with pytest.raises(ConfigError, match=r"^'zzz' is no quarantined node; quarantined now: aaaaaaaa \(10.0.0.1\)"):
        release(state, "zzz", 3.0)
    state, node = release(state, A[:8], 3.0)
    assert node["node_id"] == A and not state.active(3.0)
    # the blames before the release no longer count: one new blame is not two
    assert not decide(state, [blame(A, 4.0)], K2, 4.0, NODES, [running()]).quarantined
    assert decide(state, [blame(A, 4.0), blame(A, 5.0)], K2, 5.0, NODES, [running()]).quarantined


# --------------------------------------------------------------- through the controller
class TellingLauncher(FakeLauncher):
    """The fake launcher, remembering what each runner was told of the quarantine."""

    def __init__(self):
        super().__init__()
        self.told: list[tuple[str, dict, int | None]] = []

    def exclude(self, runner, nodes, upto):
        self.told.append((runner.job_id, dict(nodes), upto))


def test_a_node_blamed_twice_is_quarantined_told_to_runners_kept_over_a_restart_and_released(tmp_path):
    from orchestrator.jobs.store import JobStore

    store, launcher, lines, now = JobStore(tmp_path), TellingLauncher(), [], [1000.0]

    def controller() -> Controller:
        c = Controller(store, launcher, capacity=lambda: {"CPU": 6.0}, say=lines.append, clock=lambda: now[0],
                       nodes=lambda: NODES)
        c.recover()
        return c

    job = record("a", workers=2)
    job.config["cluster"]["quarantine"] = {"failures": 2, "window_s": 600, "ttl_s": 1200}
    store.add([job])
    c = controller()
    c.step(["a"])
    run = launcher.runners["a"]
    assert launcher.told == [("a", {}, 0)]  # (its first group waits for this word)
    crash = {"class": "worker_crash", "ranks": [0], "nodes": ["10.0.0.1"], "node_ids": [A], "step": 5, "line": "x"}
    run.emit(EventKind.WORKER_FAILED, at=1001.0, **crash)
    c.step(["a"])
    assert launcher.told[-1] == ("a", {}, 1) and not c.quarantined()  # judged: one failure is not two
    run.emit(EventKind.WORKER_FAILED, at=1002.0, **crash)
    c.step(["a"])
    assert launcher.told[-1] == ("a", {A: 2200.0}, 2)
    assert any(line.startswith("a: node aaaaaaaa (10.0.0.1) quarantined for 1200 s") for line in lines)
    c = controller()  # a controller restart: the quarantine is in the store, and the runner is told again
    assert [n["node_id"] for n in c.quarantined()] == [A] and launcher.told[-1] == ("a", {A: 2200.0}, 2)
    assert c._room(now[0]) == {"CPU": 4.0}  # admission counts the cluster without it
    with pytest.raises(ConfigError):
        c.release_node("nope")
    c.release_node("aaaa")
    assert not c.quarantined() and launcher.told[-1] == ("a", {}, None) and c._room(now[0]) == {"CPU": 6.0}
    assert store.get("a").failures[-1]["node_ids"] == [A]
