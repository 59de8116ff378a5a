"""The `orch` client side of the persistent controller: find the cluster, find (or start) the
controller actor on it, and call it.

The cluster address is the resolver's (orchestrator.cli.resolve): `--address`, else `RAY_ADDRESS`,
else the `cluster.json` that `orch up` leaves in the state folder (orchestrator.raycluster.local_cluster).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from orchestrator import errors
from orchestrator.constants import RAY_ADDRESS_ENV
from orchestrator.errors import ClusterError, OrchError
from orchestrator.raycluster import local_cluster
from orchestrator.raycluster.connect import (
    check_reachable,
    code_runtime_env,
    is_loopback_address,
    keep_ray_on_loopback,
    keeping_sigterm_handler,
    use_token_auth_if_available,
)


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

    def submit(self, job_dicts: list[dict], after: list[str], owner: dict | None = None) -> list[str]:
        return self._call("submit", job_dicts, after, owner)

    def submit_sweep(self, pipelines: list[list[dict]], after: list[str], sweep: dict,
                     owner: dict | None = None) -> list[list[str]]:
        return self._call("submit_sweep", pipelines, after, sweep, owner)

    def set_queues(self, config: dict) -> dict:
        return self._call("set_queues", config)

    def queues(self) -> dict:
        return self._call("queues")

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

    def nodes(self) -> list[dict]:
        return self._call("nodes")

    def release_node(self, name: str) -> dict:
        return self._call("release_node", name)


@contextmanager
def connect_controller(address: str, state_dir: str, start: bool = True):
    """Yield a `Client` for the controller on the cluster at `address`; start the controller
    there (state in `state_dir` on the head node) when `start` and there is none."""
    check_reachable(address)
    use_token_auth_if_available()  # before Ray is imported: it reads the auth mode once
    if is_loopback_address(address):
        keep_ray_on_loopback()  # else Ray dials the machine's own address, where `orch up`'s cluster is not
    import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

    from orchestrator.service.actor import (  # (it imports Ray)
        CONTROLLER_LAYOUT,
        CONTROLLER_NAME,
        NAMESPACE,
        start_controller,
    )

    try:
        with keeping_sigterm_handler():
            context = ray.init(address=address, namespace=NAMESPACE, runtime_env=code_runtime_env(),
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
            actor = start_controller(state_dir)
        client = Client(actor, dashboard_url(getattr(context, "dashboard_url", None)))
        check_layout(client.ping(), address, CONTROLLER_LAYOUT)
        yield client
    finally:
        ray.shutdown()


def check_layout(info: dict, address: str, expected: str) -> None:
    """One line for a controller started by another layout of orch (an older release names its
    class under another module path, which this orch cannot load when the actor restarts)."""
    found = info.get("layout") if isinstance(info, dict) else None
    if found != expected:
        pid = info.get("pid", "?") if isinstance(info, dict) else "?"
        raise ClusterError(f"the orch controller on the cluster at {address} was started by another version of orch "
                           f"({found or 'an older layout'}, pid {pid}); "
                           f"restart it with `orch down` then `orch up` (job records are kept and resume)")


def dashboard_url(address: str | None) -> str | None:
    """Ray's dashboard address as a URL (Ray gives HOST:PORT; none when the head runs no dashboard)."""
    if not address:
        return None
    return address if "://" in address else f"http://{address}"




# ------------------------------------------------------------------------------------ orch up
def up(state_dir: str, nodes: int, cpus_per_node: int, port: int, say) -> str:
    """Start a persistent local Ray cluster of `nodes` raylets (orchestrator.raycluster.local_cluster),
    then the controller on it."""
    address, dashboard = local_cluster.start(state_dir, nodes, cpus_per_node, port)
    with connect_controller(address, state_dir) as client:
        import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < nodes and time.time() < deadline:
            time.sleep(0.5)
        info = client.ping()
        session = ray.get_runtime_context().get_session_name()
    local_cluster.record_session(state_dir, address, nodes, cpus_per_node, session, dashboard)
    say(f"cluster up at {address}: {nodes} node(s) x {cpus_per_node} CPU(s); controller pid {info['pid']}, "
        f"state in {info['state_dir']}")
    say(f"dashboard {dashboard} (Ray's dashboard; also the Jobs API: `orch submit --address {dashboard}`)")
    return address
