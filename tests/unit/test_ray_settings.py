"""The Ray settings orch chooses for the clusters it starts itself and for Ray Train's controller."""

from __future__ import annotations

import os
import sys

from orchestrator import cluster
from orchestrator.constants import RAY_PREEMPTION_WATCHER_ENV, RAY_SINGLE_MACHINE_ENV


def test_a_cluster_of_this_machine_runs_no_preemption_watcher(monkeypatch):
    """No spot instance to lose on one machine: Ray Train starts no watcher actor per worker group."""
    monkeypatch.delenv(RAY_PREEMPTION_WATCHER_ENV, raising=False)
    monkeypatch.delenv(RAY_SINGLE_MACHINE_ENV, raising=False)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # (flipped in place when Ray is loaded: put back afterwards)
        monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    cluster.keep_ray_on_loopback()
    assert os.environ[RAY_PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(RAY_PREEMPTION_WATCHER_ENV, "1")  # the user's choice wins
    cluster.keep_ray_on_loopback()
    assert os.environ[RAY_PREEMPTION_WATCHER_ENV] == "1"
