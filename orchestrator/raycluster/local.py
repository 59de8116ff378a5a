"""The Ray cluster of this machine alone that `orch up` starts and `orch down` stops: its nodes
listen on loopback only, and stopping it stops its own processes, never another cluster's.

    python -m orchestrator.raycluster.local start --head ...   Ray's `ray` command, kept on loopback

`ray start --node-ip-address=127.0.0.1` is not enough on Linux: Ray swaps the machine's own address
in and listens on every interface (orchestrator.raycluster.connect.keep_ray_on_loopback says why). Its
single-machine mode keeps loopback, but there `ray start --address` refuses to add a node; a node
that joins is started with the mode off in the `ray start` process itself, loopback addresses kept
as given, and the mode on for every process it starts.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import psutil

from orchestrator.constants import RAY_SINGLE_MACHINE_ENV
from orchestrator.raycluster.connect import LOOPBACK_HOSTS, keep_ray_on_loopback, no_preemption_watcher


def ray_command() -> list[str]:
    """The command line that runs `ray ARGS` for a loopback-only cluster."""
    return [sys.executable, "-m", "orchestrator.raycluster.local"]


def main(argv: list[str]) -> None:
    joining = argv[:1] == ["start"] and "--head" not in argv
    if not joining:
        keep_ray_on_loopback()
    from ray._private import ray_constants, services  # (Ray internals: only in a Ray process that needs them)
    from ray.scripts.scripts import main as ray_main

    if joining:
        ray_constants.ENABLE_RAY_CLUSTER = True  # `ray start --address` aborts in single-machine mode
        resolve = services.resolve_ip_for_localhost
        services.resolve_ip_for_localhost = lambda host: host if host in LOOPBACK_HOSTS else resolve(host)
        os.environ[RAY_SINGLE_MACHINE_ENV] = "0"  # the raylet, agents and workers this node starts
        no_preemption_watcher()
    sys.argv = ["ray", *argv]
    ray_main()


# ------------------------------------------------------------------------------------ stopping
@dataclass(frozen=True)
class Proc:
    """One process of this machine, as far as finding a cluster's processes needs."""

    pid: int
    ppid: int
    cmdline: str


def process_table() -> list[Proc]:
    out = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            out.append(Proc(p.info["pid"], p.info["ppid"] or 0, " ".join(p.info["cmdline"] or [])))
        except psutil.Error:
            continue
    return out


def session_of(procs: list[Proc], port: int) -> str | None:
    """The session name of the GCS server that listens on `port`, if it runs."""
    for p in procs:
        if f"--gcs_server_port={port}" in p.cmdline.split():
            m = re.search(r"--session-name=(\S+)", p.cmdline)
            if m:
                return m.group(1)
    return None


def cluster_pids(procs: list[Proc], port: int, session: str | None) -> set[int]:
    """The processes of the cluster whose GCS listens on 127.0.0.1:`port` in session `session`:
    those that name the session (GCS, raylets, dashboard, monitors: their log and socket paths
    hold it), its GCS server and client server, and every descendant of these (workers, agents,
    dashboard modules). Nothing of another session or port."""
    named = re.compile(re.escape(session) + r"(?![\w-])") if session else None
    address = re.compile(rf"(?<![\d.])127\.0\.0\.1:{port}(?!\d)")
    roots = {
        p.pid for p in procs
        if (named is not None and named.search(p.cmdline))
        or f"--gcs_server_port={port}" in p.cmdline.split()
        or ("ray.util.client.server" in p.cmdline and address.search(p.cmdline))
    }
    children = defaultdict(list)
    for p in procs:
        children[p.ppid].append(p.pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children[pid]
    return found


def stop(pids: set[int], timeout: float = 15.0) -> int:
    """SIGTERM `pids` (never this process or its parents), SIGKILL those left after `timeout`.
    Returns how many were running."""
    me = psutil.Process()
    spare = {me.pid, *(p.pid for p in me.parents())}
    procs = []
    for pid in sorted(pids - spare):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


if __name__ == "__main__":
    main(sys.argv[1:])
