"""Bad-node quarantine: which nodes later worker groups must not be placed on, as pure functions.

A node is *blamed* by each failure of a class in `cluster.quarantine.classes` (a crashed or lost
worker, a stall, a straggler) whose rank ran there. A node blamed `failures` (K) times within
`window_s` is quarantined for `ttl_s`: no worker group of any job is placed on it until then, or
until `orch nodes release NODE`. A node is never quarantined when a job not ended could then no
longer fit on the nodes left (its workers x resources per worker, packed as its placement strategy
allows): the decision says so instead, and the node stays in.

The controller keeps the state (`QuarantineState`, JSON in the job store's settings, so it is shared
by every job and survives a controller restart), feeds it the blames of each failure it applies,
persists what `decide` returns and tells the runners; the runners keep their worker groups off the
nodes (orchestrator.execution.train_extensions.AvoidQuarantinedNodes). Nothing here touches Ray,
files or the clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.config.schema import QuarantineConfig
from orchestrator.errors import ConfigError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.resources import job_demand

QUARANTINE_SETTING = "quarantine"  # the job store's setting that holds the QuarantineState
BLAMES_KEPT = 500  # the state keeps the newest this many blames (the window needs no more)
SHORT_ID = 8  # a node id is shown by its first this many hex digits


@dataclass(frozen=True)
class Blame:
    """One failure (or straggler) that names a node."""

    node_id: str  # Ray's node id (hex)
    node: str  # its IP address, for people
    at: float
    cls: str  # the failure class, or "straggler"
    job: str

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "node": self.node, "at": self.at, "class": self.cls, "job": self.job}


@dataclass(frozen=True)
class NodeSlot:
    """An alive node of the cluster and its total resources (CPU, GPU)."""

    node_id: str
    node: str
    resources: dict[str, float]


@dataclass
class QuarantineState:
    """What the controller persists: the recent blames, the quarantined nodes, the releases."""

    blames: list[dict] = field(default_factory=list)  # Blame.to_json(), oldest first
    # node id -> {"node_id", "node", "since", "until", "blames": [{"at", "class", "job"}], "line"}
    nodes: dict[str, dict] = field(default_factory=dict)
    released: dict[str, float] = field(default_factory=dict)  # node id -> when it was last released

    def to_json(self) -> dict:
        return {"blames": self.blames, "nodes": self.nodes, "released": self.released}

    @classmethod
    def from_json(cls, d: dict | None) -> QuarantineState:
        d = d or {}
        return cls(list(d.get("blames", [])), dict(d.get("nodes", {})), dict(d.get("released", {})))

    def active(self, now: float) -> list[dict]:
        """The nodes quarantined at `now`, oldest first."""
        return sorted((n for n in self.nodes.values() if n["until"] > now), key=lambda n: n["since"])


@dataclass(frozen=True)
class Verdict:
    """What `decide` found: the new state, the nodes it quarantined now, and the lines to say."""

    state: QuarantineState
    quarantined: tuple[dict, ...] = ()
    lines: tuple[str, ...] = ()  # one per node quarantined, or held back because a job needs it


def short(node_id: str) -> str:
    return node_id[:SHORT_ID]


def blames_of(failure: dict, job: str, config: QuarantineConfig) -> list[Blame]:
    """The blames in one entry of a record's `failures` (or `stragglers`, class "straggler"): one per
    node id it names, when its class blames nodes."""
    cls = failure.get("class") or "straggler"
    if not config.enabled or cls not in config.classes:
        return []
    ids = list(failure.get("node_ids") or ([failure["node_id"]] if failure.get("node_id") else []))
    ips = list(failure.get("nodes") or ([failure["node"]] if failure.get("node") else []))
    ips += [""] * (len(ids) - len(ips))
    return [Blame(i, ip or "?", float(failure.get("at") or 0.0), cls, job) for i, ip in zip(ids, ips) if i]


def workers_that_fit(job: JobRecord, nodes: list[NodeSlot]) -> int:
    """How many of the job's workers the nodes can hold at once (their totals, not what is free now),
    as its placement strategy packs them: STRICT_PACK on one node, STRICT_SPREAD one per node."""
    per = job_demand(job, 1)
    per_node = [min((math.floor(n.resources.get(k, 0.0) / v + 1e-9) for k, v in per.items() if v > 0), default=0)
                for n in nodes]
    strategy = job.config["cluster"].get("placement_strategy", "PACK")
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k >= 1)
    return sum(per_node)


def needed_by(node_id: str, nodes: list[NodeSlot], out: set[str],
              jobs: list[JobRecord]) -> tuple[JobRecord, int] | None:
    """A job not ended that fits on the nodes not in `out` but not without `node_id` too (with how
    many of its workers would fit then), or None."""
    left = [n for n in nodes if n.node_id not in out and n.node_id != node_id]
    with_it = [n for n in nodes if n.node_id not in out]
    shapes: dict[tuple, JobRecord] = {}  # one job per shape: 10,000 jobs are a handful of shapes to fit
    for job in jobs:
        if not job.state.terminal:
            shapes.setdefault(_shape(job), job)
    for job in shapes.values():
        fit = workers_that_fit(job, left)
        if fit < job.workers <= workers_that_fit(job, with_it):
            return job, fit
    return None


def _shape(job: JobRecord) -> tuple:
    """What its fit depends on: its workers, what each needs, how they are packed."""
    return job.workers, tuple(sorted(job_demand(job, 1).items())), job.config["cluster"].get("placement_strategy")


def _recent(state: QuarantineState, node_id: str, config: QuarantineConfig, now: float) -> list[dict]:
    since = max(now - config.window_s, state.released.get(node_id, float("-inf")))
    return [b for b in state.blames if b["node_id"] == node_id and b["at"] > since]


def decide(state: QuarantineState, new: list[Blame], config: QuarantineConfig, now: float,
           nodes: list[NodeSlot], jobs: list[JobRecord]) -> Verdict:
    """Add the blames `new` to `state`; quarantine each node they name that has K blames in the window
    (and is not quarantined already), unless a job not ended needs it to fit. `nodes`: the alive nodes;
    `jobs`: the jobs whose fit to keep."""
    blames = (state.blames + [b.to_json() for b in new])[-BLAMES_KEPT:]
    state = QuarantineState(blames, {k: v for k, v in state.nodes.items() if v["until"] > now}, dict(state.released))
    if not config.enabled:
        return Verdict(state)
    quarantined, lines = [], []
    for node_id in dict.fromkeys(b.node_id for b in new):
        recent = _recent(state, node_id, config, now)
        if node_id in state.nodes or len(recent) < config.failures:
            continue
        ip = recent[-1]["node"]
        why = (f"{len(recent)} failures within {config.window_s:g} s ("
               + ", ".join(f"{b['class']} of {b['job']}" for b in recent) + ")")
        need = needed_by(node_id, nodes, set(state.nodes), jobs)
        if need is not None:
            job, fit = need
            lines.append(f"node {short(node_id)} ({ip}) would be quarantined after {why}, but job {job.id} needs it: "
                         f"without it only {fit} of its {job.workers} workers fit; it stays in placement")
            continue
        entry = {"node_id": node_id, "node": ip, "since": now, "until": now + config.ttl_s,
                 "blames": [{k: b[k] for k in ("at", "class", "job")} for b in recent], "line": why}
        state.nodes[node_id] = entry
        quarantined.append(entry)
        lines.append(f"node {short(node_id)} ({ip}) quarantined for {config.ttl_s:g} s after {why}: no new worker "
                     f"group is placed there (`orch nodes release {short(node_id)}` lets it back)")
    return Verdict(state, tuple(quarantined), tuple(lines))


def find_node(state: QuarantineState, name: str, now: float) -> dict:
    """The quarantined node `name` names (its id, a prefix of it, or its IP when only one node has it)."""
    active = state.active(now)
    found = [n for n in active if n["node_id"] == name] or [n for n in active if name and n["node_id"].startswith(name)]
    found = found or [n for n in active if n["node"] == name]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(f"{short(n['node_id'])} ({n['node']})" for n in active) or "none"
    what = "names several quarantined nodes" if found else "is no quarantined node"
    raise ConfigError(f"{name!r} {what}; quarantined now: {listed} (`orch nodes` lists them)")


def release(state: QuarantineState, name: str, now: float) -> tuple[QuarantineState, dict]:
    """Let node `name` back into placement; its blames so far no longer count. Raises ConfigError
    (one line) when it names no quarantined node."""
    node = find_node(state, name, now)
    nodes = {k: v for k, v in state.nodes.items() if k != node["node_id"]}
    return QuarantineState(list(state.blames), nodes, {**state.released, node["node_id"]: now}), node


def excluded(state: QuarantineState, nodes: list[NodeSlot], now: float) -> dict[str, float]:
    """The quarantined nodes' total resources (admission counts the cluster without them)."""
    out: dict[str, float] = {}
    active = {n["node_id"] for n in state.active(now)}
    for n in nodes:
        if n.node_id in active:
            for k, v in n.resources.items():
                out[k] = out.get(k, 0.0) + v
    return out
