"""`orch nodes` (the nodes kept out of placement: quarantined after repeated failures, until when, and
why) and `orch nodes release NODE` (let one back in now). Both ask the resolver
(orchestrator.cli.resolve.where) where the quarantine lives, like every job command: the controller
of an `orch up` cluster, else the state folder of `orch run`."""

from __future__ import annotations

import json
import time

from orchestrator.cli.resolve import Head, where
from orchestrator.errors import ConfigError
from orchestrator.jobs.quarantine import short


def cmd_nodes(args) -> int:
    if args.action == "release" and not args.node:
        raise ConfigError("orch nodes release needs the node: its id, a prefix of it, or its address "
                          "(`orch nodes` lists the quarantined nodes)")
    if args.action == "show" and args.node:
        raise ConfigError(f"`orch nodes` takes no node (got {args.node!r}); to let one back in: "
                          f"orch nodes release {args.node}")
    with where(args) as target:
        if isinstance(target, Head):
            return target.forward(args)
        if args.action == "release":
            node = target.release_node(args.node)
            print(f"node {short(node['node_id'])} ({node['node']}) released: later worker groups may be placed "
                  f"on it again")
            return 0
        nodes = target.quarantined()
    print(json.dumps({"quarantined": nodes}, indent=1) if args.json else "\n".join(node_lines(nodes)))
    return 0


def node_lines(nodes: list[dict], now: float | None = None) -> list[str]:
    """The plain-text table of the quarantined nodes (QuarantineState.active)."""
    if not nodes:
        return ["no node is quarantined"]
    now = time.time() if now is None else now
    rows = [("NODE", "ADDRESS", "SINCE", "UNTIL", "LEFT", "WHY")]
    for n in nodes:
        rows.append((short(n["node_id"]), n["node"], time.strftime("%H:%M:%S", time.localtime(n["since"])),
                     time.strftime("%H:%M:%S", time.localtime(n["until"])), f"{max(0, n['until'] - now):.0f}s",
                     n["line"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in rows]
    out.append("(`orch nodes release NODE` lets one back into placement now)")
    return out


def status_lines(nodes: list[dict]) -> list[str]:
    """What `orch status` says of the quarantined nodes, under its header."""
    return [f"quarantined: node {short(n['node_id'])} ({n['node']}) until "
            f"{time.strftime('%H:%M:%S', time.localtime(n['until']))}: {n['line']}" for n in nodes]
