"""What `orch status` prints: the table (orchestrator.cli.status_view), `--json` rows with the
metrics history from the store, and `--watch`'s refreshes until every job shown has ended."""

from __future__ import annotations

import json
import sys
import time

from orchestrator.execution.job_history import metrics_history


def _history_summary(history: dict) -> dict:
    rows = history.pop("rows", [])
    return {**history, "rows": len(rows), "last": rows[-1] if rows else None}


def status_rows(records, metrics: str | None = None, now: float | None = None) -> list[dict]:
    """What `orch status --json` prints for each job: its record (`history`: its state changes),
    what the table shows (max_steps, started_at, finished_at, elapsed_s, eta_s, tokens_per_s, mfu)
    and, with `metrics`, its metrics history from the store (`metrics_history`): "rows" every row
    (one per logged step), "summary" how many and the last."""
    from orchestrator.cli.status_view import job_row

    out, unreachable = [], {}
    for r in records:
        d = r.to_json()
        d.pop("config")
        d["workers"] = r.workers
        shown = job_row(r, now)
        shown.pop("workers_shown")
        d.update(shown)
        if metrics:
            history = metrics_history(r, unreachable)
            d["metrics_history"] = history if metrics == "rows" else _history_summary(history)
        out.append(d)
    return out


def print_status(args, records, header: list[str], nodes: list[dict] = ()) -> None:
    """`nodes`: the cluster's quarantined nodes (in --json: `quarantined_nodes` of every row)."""
    if args.json:
        rows = status_rows(records, metrics="rows" if args.job else "summary")
        print(json.dumps([{**row, "quarantined_nodes": list(nodes)} for row in rows], indent=1))
        return
    from orchestrator.cli.status_view import show, status_view

    show(lambda width: status_view(records, header, width=width))
    if args.job:
        for r in records:
            if r.wandb.get("url") or r.wandb.get("dir"):
                print(f"W&B run: {r.wandb.get('url') or r.wandb['dir']} ({r.wandb.get('mode', '?')}, "
                      f"group {r.wandb.get('group', r.pipeline_id)})")
            print(json.dumps(status_rows([r])[0], indent=1))


def show_status(args, read, header: list[str], nodes: list[dict] = ()) -> int:
    """Print the jobs `read()` returns; with --watch, again every --interval seconds until every job
    shown has ended: redrawn in place on a terminal (rich Live), one block per refresh otherwise."""
    if not args.watch:
        print_status(args, read(), header, nodes)
        return 0
    from orchestrator.cli.status_view import console, status_view

    out = console()
    if out.is_terminal and not args.json:
        from rich.live import Live

        with Live(console=out, auto_refresh=False) as live:
            while True:
                records = read()
                live.update(status_view(records, [f"{time.strftime('%H:%M:%S')}  {h}" for h in header or [""]],
                                        width=out.width), refresh=True)
                if all(r.state.terminal for r in records):
                    return 0
                time.sleep(args.interval)
    while True:
        records = read()
        print(f"# {time.strftime('%H:%M:%S')}")
        print_status(args, records, header, nodes)
        sys.stdout.flush()
        if all(r.state.terminal for r in records):
            return 0
        time.sleep(args.interval)

