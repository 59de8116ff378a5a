"""The `orch` client side of the persistent controller: find the cluster, find (or start) the
controller actor on it, and call it.

The cluster address comes from `--address`, else `RAY_ADDRESS`, else the `cluster.json` that
`orch up` leaves in the state folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrator import errors
from orchestrator.cluster import (
    _code_runtime_env,
    _is_hostport,
    _listening,
    _use_token_auth_if_available,
    check_reachable,
    is_loopback_address,
    keep_ray_on_loopback,
    keeping_sigterm_handler,
)
from orchestrator.constants import RAY_ADDRESS_ENV
from orchestrator.errors import ClusterError, ConfigError, JobNotFound, OrchError
from orchestrator.local_ray import cluster_pids, process_table, ray_command, session_of, stop

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
        if not isinstance(address, str) or not _is_hostport(address):
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


_ERRORS = {c.__name__: c for c in (ClusterError, ConfigError, JobNotFound, OrchError)}


class Client:
    """Calls on the controller actor; errors come back as the matching OrchError."""

    def __init__(self, actor, dashboard: str | None = None):
        self.actor = actor
        self.dashboard = dashboard  # the URL of the cluster's Ray dashboard (and Jobs API), if it has one

    def _call(self, method: str, *args, timeout: float = 120):
        import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

        answer = ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        if "error" in answer:
            cls = getattr(errors, answer.get("kind", ""), None)
            cls = cls if isinstance(cls, type) and issubclass(cls, OrchError) else ClusterError
            raise cls(answer["error"])
        return answer["ok"]

    def ping(self) -> dict:
        import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

        return ray.get(self.actor.ping.remote(), timeout=120)

    def submit(self, job_dicts: list[dict], after: list[str]) -> list[str]:
        return self._call("submit", job_dicts, after)

    def submit_sweep(self, pipelines: list[list[dict]], after: list[str], sweep: dict) -> list[list[str]]:
        return self._call("submit_sweep", pipelines, after, sweep)

    def status(self, job_id: str | None = None) -> list[dict]:
        return self._call("status", job_id)

    def retry(self, job_id: str) -> dict:
        return self._call("retry", job_id)

    def cancel(self, job_id: str, now: bool) -> dict:
        return self._call("cancel", job_id, now)

    def scale(self, job_id: str, workers: int) -> dict:
        return self._call("scale", job_id, workers)

    def logs(self, job_id: str, offset: int) -> dict:
        return self._call("logs", job_id, offset)


@contextmanager
def connect_controller(address: str, state_dir: str | None = None, start: bool = True):
    """Yield a `Client` for the controller on the cluster at `address`; start the controller
    there (state in `state_dir` on the head node) when `start` and there is none."""
    check_reachable(address)
    _use_token_auth_if_available()  # before Ray is imported: it reads the auth mode once
    if is_loopback_address(address):
        keep_ray_on_loopback()  # else Ray dials the machine's own address, where `orch up`'s cluster is not
    import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

    from orchestrator.service import CONTROLLER_NAME, NAMESPACE, start_controller  # (it imports Ray)

    try:
        with keeping_sigterm_handler():
            context = ray.init(address=address, namespace=NAMESPACE, runtime_env=_code_runtime_env(),
                               log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r} ({str(e).strip().splitlines()[0]}); "
                           f"check --address / {RAY_ADDRESS_ENV}") from None
    try:
        try:
            actor = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            if not start:
                raise ClusterError(f"no orch controller runs on the cluster at {address}; `orch up` starts one "
                                   f"(or any `orch submit` does)") from None
            actor = start_controller(state_dir or "~/.orch")
        client = Client(actor, dashboard_url(getattr(context, "dashboard_url", None)))
        client.ping()
        yield client
    finally:
        ray.shutdown()


def dashboard_url(address: str | None) -> str | None:
    """Ray's dashboard address as a URL (Ray gives HOST:PORT; none when the head runs no dashboard)."""
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


# ------------------------------------------------------------------------------ orch up / down
def _ray(*args: str) -> None:
    """`ray ARGS` for a cluster of this machine alone (orchestrator.local_ray: kept on loopback)."""
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


def up(state_dir: str, nodes: int, cpus_per_node: int, port: int, say) -> str:
    """Start a persistent local Ray cluster of `nodes` raylets (the head is one of them), then the
    controller on it; remember the address in the state folder. Everything listens on 127.0.0.1:
    the GCS, raylets, workers, agents, the dashboard and Ray's client server (on a free port)."""
    if nodes < 1 or cpus_per_node < 1:
        raise ConfigError(f"--nodes and --cpus-per-node must be at least 1 (got {nodes}, {cpus_per_node})")
    known = recorded_address(state_dir)
    if known is not None:
        if _listening(known):
            raise ClusterError(f"a cluster started by `orch up` already runs at {known} for {state_dir}; "
                               f"`orch down` stops it")
    if _listening(f"127.0.0.1:{port}"):
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
    cluster_file(state_dir).write_text(json.dumps({"address": address, "nodes": nodes, "cpus_per_node": cpus_per_node}))
    with connect_controller(address, state_dir) as client:
        import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes and time.time() < deadline:
            time.sleep(0.5)
        info = client.ping()
        session = ray.get_runtime_context().get_session_name()
    # The session names every process of this cluster: `orch down` stops those, and only those.
    cluster_file(state_dir).write_text(json.dumps({"address": address, "nodes": nodes, "cpus_per_node": cpus_per_node,
                                                   "session": session, "dashboard": dashboard}))
    say(f"cluster up at {address}: {nodes} node(s) x {cpus_per_node} CPU(s); controller pid {info['pid']}, "
        f"state in {info['state_dir']}")
    say(f"dashboard {dashboard} (Ray's dashboard; also the Jobs API: `orch submit --address {dashboard}`)")
    return address


def down(state_dir: str, say) -> None:
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
