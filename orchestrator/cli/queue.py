"""`orch queue` (each queue's quota, use and share; why each waiting job waits) and `orch queue set`
(the cluster's queues replaced on the running controller, from its next decision on). Both ask the
resolver (orchestrator.cli.resolve.where) where the controller is, like every job command."""

from __future__ import annotations

import getpass
import json
import os

from orchestrator.cli.resolve import Head, where
from orchestrator.config.schema import is_plain_name
from orchestrator.constants import USER_ENV
from orchestrator.errors import ConfigError

SET_EXAMPLE = "orch queue set queues=two_teams queues.teams.team-a.quota.workers=8"


def submitter(given: str | None) -> str:
    """Who submits: --user, else $ORCH_USER, else the OS user. What the submitter says: nothing checks it."""
    user = given or os.environ.get(USER_ENV)
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # (a container without a passwd entry for its uid)
            raise ConfigError(f"no user name to submit as: pass --user NAME or set {USER_ENV}") from None
    if not is_plain_name(user):
        raise ConfigError(f"user {user!r} is not a plain name (letters, digits, '_', '-', '.'); pass --user NAME "
                          f"or set {USER_ENV}")
    return user


def queues_to_set(args) -> dict:
    """The queues `orch queue set` sends: conf/'s `queues` group composed with the overrides (which
    may only be `queues=OPTION`, `queues.KEY=VALUE` and `hydra.searchpath`), as a plain dict."""
    if args.queues_json:  # on the head, sent by `orch queue set --address http://...`: composed there
        return json.loads(args.queues_json)
    for ov in args.overrides:
        key = ov.partition("=")[0].lstrip("+~")
        if key != "queues" and not key.startswith("queues.") and key != "hydra.searchpath":
            raise ConfigError(f"orch queue set takes queues=OPTION and queues.KEY=VALUE overrides, got {ov!r}; "
                              f"e.g. {SET_EXAMPLE}")
    from orchestrator.cli.run import overrides  # (Hydra: only here)
    from orchestrator.config.compose import compose_root
    from orchestrator.config.typed import to_dict

    return to_dict(compose_root(overrides(args)).queues)


def cmd_queue(args) -> int:
    if args.action == "set":
        config = queues_to_set(args)
        with where(args, control="queue set") as target:
            if isinstance(target, Head):
                return target.forward(args, queues_json=json.dumps(config), overrides=[])
            target.client.set_queues(config)
        print(f"queues set: {', '.join(config['teams'])} (the controller uses them from its next decision; "
              f"`orch queue` shows them)")
        return 0
    if args.overrides:
        raise ConfigError(f"`orch queue` shows the queues and takes no overrides (got {args.overrides[0]!r}); "
                          f"to change them: {SET_EXAMPLE}")
    with where(args, control="queue") as target:
        if isinstance(target, Head):
            return target.forward(args)
        report = target.client.queues()
    print(json.dumps(report, indent=1) if args.json else "\n".join(queue_lines(report)))
    return 0


def _amounts(d: dict) -> str:
    """workers/GPU/CPU, '-' where there is no limit."""
    return "/".join("-" if d.get(r) is None else f"{d[r]:g}" for r in ("workers", "GPU", "CPU"))


def queue_lines(report: dict) -> list[str]:
    """The plain-text view of a queue report (orchestrator.jobs.sharing.queue_report)."""
    from orchestrator.cli.status_view import fmt_duration

    rows = [("QUEUE", "WEIGHT", "QUOTA w/GPU/CPU", "BORROW LIMIT", "IN USE", "BORROWED", "USAGE worker-s", "SHARE",
             "ENTITLED", "WAITING")]
    for q in report["queues"]:
        borrowed = ", ".join(f"{v:g} {k}" for k, v in q["borrowed"].items()) or "-"
        in_use = {r: q["in_use"].get(r, 0.0) for r in ("workers", "GPU", "CPU")}
        rows.append((q["queue"], f"{q['weight']:g}", _amounts(q["quota"]), _amounts(q["borrow_limit"]),
                     _amounts(in_use), borrowed, f"{q['usage_worker_s']:,.0f}", f"{q['share']:.0%}",
                     f"{q['entitled']:.0%}", str(q["waiting"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.append(f"(usage decays by half every {fmt_duration(report['half_life_s'])}; share: of the decayed usage plus "
               f"the held workers' next half-life, against the entitled weight / sum of weights)")
    if report["jobs"]:
        out.append("")
        out.append("WAITING JOB / QUEUE / USER / PRIORITY / WORKERS: WHY")
        for j in report["jobs"]:
            out.append(f"{j['id']}  {j['queue']}  {j['user'] or '?'}  p{j['priority']}  {j['workers']}w  "
                       f"{j['state']}: {j['why']}")
    return out
