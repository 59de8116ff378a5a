"""The Ray cluster of this machine that `orch up` starts and `orch down` stops, and the file in the
state folder that remembers it (`cluster.json`): where commands find the cluster when neither
--address nor RAY_ADDRESS names one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from orchestrator.constants import RAY_ADDRESS_ENV
from orchestrator.errors import ClusterError, ConfigError
from orchestrator.raycluster.connect import is_hostport, listening
from orchestrator.raycluster.local import cluster_pids, process_table, ray_command, session_of, stop

CLUSTER_FILE = "cluster.json"  # written by `orch up` into the state folder


def cluster_file(state_dir: str) -> Path:
    return Path(state_dir) / CLUSTER_FILE


def recorded_address(state_dir: str) -> str | None:
    """The address `orch up` recorded in the state folder, or None; a damaged file is one line."""
    f = cluster_file(state_dir)
    if not f.exists():
        return None
    try:
        address = json.loads(f.read_text())["address"]
        if not isinstance(address, str) or not is_hostport(address):
            raise ValueError(f"address {address!r} is not HOST:PORT")
        return address
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{f} is damaged ({type(e).__name__}: {e}); delete it (the job records stay) and run "
                          f"`orch up` again, or pass --address") from None


def resolve_address(address: str | None, state_dir: str) -> str | None:
    """The Ray cluster to talk to, or None when there is none to find."""
    if address:
        return address
    if os.environ.get(RAY_ADDRESS_ENV):
        return os.environ[RAY_ADDRESS_ENV]
    return recorded_address(state_dir)



def _ray(*args: str) -> None:
    """`ray ARGS` for a cluster of this machine alone (orchestrator.raycluster.local: kept on loopback)."""
    # Ray clusters authenticate with a token (~/.ray/auth_token): every raylet and client uses it.
    # The jobs the Jobs API runs there (`orch submit --address http://...`) find this `orch` first.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "token", "PATH": path}
    out = subprocess.run([*ray_command(), *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"`ray {' '.join(args)}` failed: {tail[0]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_ray_temp_dir(port: int) -> str:
    """The cluster's own folder inside Ray's (<RAY_TMPDIR, else TMPDIR, else /tmp>/ray, as Ray picks
    it). Ray resolves "auto", the address it gives each job of the Jobs API (RAY_ADDRESS), through
    <temp>/ray_current_cluster, which in a shared folder names the machine's latest cluster, not
    necessarily this one. (Short: Ray's socket paths under it must stay under 107 bytes.)"""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray", f"orch-{port}")


def start(state_dir: str, nodes: int, cpus_per_node: int, port: int) -> tuple[str, str]:
    """Start a persistent local Ray cluster of `nodes` raylets (the head is one of them) and remember
    its address in the state folder; returns (GCS address, dashboard URL). Everything listens on
    127.0.0.1: the GCS, raylets, workers, agents, the dashboard and Ray's client server (on a free port)."""
    if nodes < 1 or cpus_per_node < 1:
        raise ConfigError(f"--nodes and --cpus-per-node must be at least 1 (got {nodes}, {cpus_per_node})")
    known = recorded_address(state_dir)
    if known is not None:
        if listening(known):
            raise ClusterError(f"a cluster started by `orch up` already runs at {known} for {state_dir}; "
                               f"`orch down` stops it")
    if listening(f"127.0.0.1:{port}"):
        raise ClusterError(f"port {port} is in use (another Ray cluster?); pick another with --port")
    address = f"127.0.0.1:{port}"
    temp_dir = _own_ray_temp_dir(port)
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        _ray("get-auth-token", "--generate")
    common = ["--disable-usage-stats", f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
              f"--temp-dir={temp_dir}"]
    # The dashboard serves Ray's state API, which Ray Train uses to free a stopped job's placement
    # group, and the Jobs API (`orch submit --address http://127.0.0.1:PORT`).
    dashboard = f"http://127.0.0.1:{_free_port()}"
    # Each node's dashboard agent (it runs the Jobs API's jobs) on a free port: Ray's fixed default
    # (52365) is taken by the first cluster of the machine, and an agent that cannot bind serves no job.
    _ray("start", "--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", *common)
    for i in range(1, nodes):
        _ray("start", f"--address={address}", f"--resources={{\"orch-node-{i}\": 1}}",
             f"--dashboard-agent-listen-port={_free_port()}", *common)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    record_session(state_dir, address, nodes, cpus_per_node)
    return address, dashboard


def record_session(state_dir: str, address: str, nodes: int, cpus_per_node: int, session: str | None = None,
                   dashboard: str | None = None) -> None:
    """The cluster file: its address at once, then (once the controller answers) its session, which
    names every process of this cluster (`stop` stops those, and only those), and its dashboard."""
    extra = {"session": session, "dashboard": dashboard} if session else {}
    cluster_file(state_dir).write_text(json.dumps({"address": address, "nodes": nodes, "cpus_per_node": cpus_per_node,
                                                   **extra}))


def stop_cluster(state_dir: str, say) -> None:
    """Stop the local cluster `orch up` started: its own processes (by its session and GCS port),
    not other Ray clusters of this machine. Job records stay; the next `orch up` resumes unfinished
    jobs from their last committed checkpoint."""
    f = cluster_file(state_dir)
    address = recorded_address(state_dir)
    if address is None:
        raise ClusterError(f"no cluster started by `orch up` for {state_dir}; nothing to stop")
    port = int(address.rsplit(":", 1)[1])
    procs = process_table()
    session = json.loads(f.read_text()).get("session") or session_of(procs, port)
    stopped = stop(cluster_pids(procs, port, session))
    f.unlink()
    say(f"cluster at {address} stopped ({stopped} processes); job records kept in {state_dir}")
