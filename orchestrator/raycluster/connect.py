"""Connect to a Ray cluster, or start the embedded local one for the duration of a command."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from orchestrator.config.schema import ClusterConfig, RootConfig
from orchestrator.constants import (
    RAY_ADDRESS_ENV,
    RAY_JOB_CONFIG_ENV,
    RAY_PREEMPTION_WATCHER_ENV,
    RAY_SINGLE_MACHINE_ENV,
)
from orchestrator.errors import ClusterError, ConfigError

log = logging.getLogger(__name__)


def code_runtime_env() -> dict | None:
    """Ship this checkout's packages to a remote cluster's workers (no secrets: env vars stay on the
    nodes). Not from a command the Jobs API runs on the cluster (`orch submit --address http://...`,
    a RayJob): the orch installed there is the cluster's code."""
    if os.environ.get(RAY_JOB_CONFIG_ENV):
        return None
    import model  # (model/ loads torch: only when a remote cluster is used)
    import orchestrator

    return {"py_modules": [str(Path(orchestrator.__file__).parent), str(Path(model.__file__).parent)]}


@contextmanager
def keeping_sigterm_handler():
    """`ray.init` replaces the process's SIGTERM handler with its own (`sys.exit(15)`, and the
    embedded head node's `sys.exit(1)`); put back the one orch installed (unwind with exit 143, so
    `finally` blocks record interrupted jobs) once Ray is connected."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback_address(address: str | None) -> bool:
    """Whether a Ray address (`127.0.0.1:6379`, `ray://localhost:10001`) is this machine's loopback."""
    if not address:
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


def keep_ray_on_loopback() -> None:
    """Make Ray, in this process and the processes it starts, keep 127.0.0.1 as the node's address
    and listen there only.

    On Linux, Ray 2.60 replaces a loopback address with the machine's own: a cluster then listens on
    every interface (GCS, raylets, workers, agents, the client server), and a driver given
    127.0.0.1:PORT dials the machine's address, which a loopback-only cluster does not answer. Its
    single-machine mode keeps loopback. Ray reads the switch once, when imported, so it is also
    flipped in place if Ray already was."""
    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"
    no_preemption_watcher()
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def no_preemption_watcher() -> None:
    """A cluster of this machine alone has no spot instance to lose: Ray Train's preemption watcher
    (one more actor process with every worker group, polling the nodes' drain state) is not started
    there. Clusters orch does not start itself (KubeRay, `ray up`) keep it."""
    os.environ.setdefault(RAY_PREEMPTION_WATCHER_ENV, "0")


def use_token_auth_if_available() -> None:
    """Ray clusters authenticate clients with a token (~/.ray/auth_token or RAY_AUTH_TOKEN[_PATH]);
    a client must opt in explicitly, so do it when a token is present and the mode is unset."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def listening(hostport: str, timeout: float = 1.0) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_hostport(address: str) -> bool:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    return bool(sep) and port.isdigit() and 0 < int(port) < 65536


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a `host:port` address (Ray itself
    retries for a long time and prints its retries)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} is the head's Jobs API, which takes `orch submit/status/logs/"
                          f"cancel/scale`; this command talks to the cluster's GCS: give HOST:PORT (e.g. 10.0.0.5:6379)"
                          f", or submit the pipeline with `orch submit --address {address}`")
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not is_hostport(address):
        raise ConfigError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start one with "
                           f"`orch up` (or `ray start --head`), or fix --address / {RAY_ADDRESS_ENV}") from None


def _address(cluster: ClusterConfig) -> str | None:
    """The cluster `connect` joins: cluster.address, else RAY_ADDRESS; none: it starts its own."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


def embedded(cluster: ClusterConfig) -> bool:
    """Whether `connect` starts a cluster of its own (no address given) rather than joining one."""
    return _address(cluster) is None


@contextmanager
def connect(cluster: ClusterConfig, needed_cpus: float = 0, verbose: bool = False):
    """Yield a connected Ray; an embedded cluster is started (and stopped) when no address is set."""
    address = _address(cluster)
    if address:
        use_token_auth_if_available()  # before ray reads its config
    if not address or is_loopback_address(address):
        keep_ray_on_loopback()  # an embedded cluster, or `orch up`'s: this machine only
    import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

    started = False
    try:
        if address:
            check_reachable(address)  # seconds, where Ray would retry for minutes
            try:
                with keeping_sigterm_handler():
                    ray.init(address=address, runtime_env=code_runtime_env(), log_to_driver=verbose,
                             logging_level=logging.INFO if verbose else logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ClusterError(
                    f"cannot reach the Ray cluster at {address!r} ({str(e).strip().splitlines()[0]}); "
                    f"check cluster.address / RAY_ADDRESS or start it with `ray start --head`"
                ) from None
        else:
            num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, int(needed_cpus + 0.999))
            # address="local" always starts a new cluster, even if a stale one's file is left behind.
            with keeping_sigterm_handler():
                ray.init(address="local", num_cpus=num_cpus, num_gpus=None, include_dashboard=cluster.dashboard,
                         log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                         configure_logging=True)
            started = True
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if started:
            log.debug("embedded Ray cluster stopped")


def capacity() -> dict[str, float]:
    """Total CPU/GPU of the connected cluster."""
    import ray  # (the CLI imports this module: Ray loads only when a cluster is used)

    res = ray.cluster_resources()
    return {k: float(v) for k, v in res.items() if k in ("CPU", "GPU")}


def check_storage_reachable(root: RootConfig) -> None:
    """A local-folder store only works when every node sees the same folder: one machine, or a
    shared mount (storage.shared=true)."""
    import ray  # (ray: the CLI imports this module; Ray loads only once a cluster is used)

    if root.storage.backend != "local" or root.storage.shared:
        return
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(hosts) > 1 or root.cluster.autoscaling:
        raise ConfigError(
            f"storage=local writes to {root.storage.root} on this machine, which the other nodes of the cluster "
            f"({len(hosts)} hosts) cannot read; use storage=s3 storage.root=s3://BUCKET/PREFIX, or storage.shared=true "
            f"if that folder is a mount every node has"
        )
