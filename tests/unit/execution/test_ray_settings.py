"""The Ray settings orch chooses for the clusters it starts itself and for Ray Train's controller."""

from __future__ import annotations

import os
import sys

from orchestrator.constants import RAY_PREEMPTION_WATCHER_ENV, RAY_SINGLE_MACHINE_ENV
from orchestrator.raycluster import connect as cluster


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


def _jobs(*overrides: str) -> dict:
    from orchestrator.config.compose import compose_root, resolve_jobs

    return {j.name: j for j in resolve_jobs(compose_root(["pipeline=pretrain", *overrides]))}


def test_only_elastic_jobs_and_autoscaling_clusters_need_the_autoscaling_coordinator(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert not _jobs()["pretrain"].needs_coordinator
    assert _jobs("pipeline.jobs.pretrain.workers=[2,4]", "trainer.global_batch_size=24",
                 "trainer.micro_batch_size=2")["pretrain"].needs_coordinator
    assert _jobs("cluster.autoscaling=true")["pretrain"].needs_coordinator


def test_a_cluster_of_its_own_starts_without_the_dashboard_unless_asked(monkeypatch):
    from orchestrator.config.schema import ClusterConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ClusterConfig(name="local").dashboard is False
    assert cluster.embedded(ClusterConfig(name="local"))
    assert not cluster.embedded(ClusterConfig(name="local", address="127.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not cluster.embedded(ClusterConfig(name="local"))


def test_a_fixed_size_run_without_the_coordinator_keeps_ray_trains_decisions():
    """The fixed-size policy, minus its coordinator calls: same sizes, and no actor is looked up."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

    from orchestrator.execution.train_extensions import without_coordinator as _without_coordinator

    fixed = _without_coordinator(FixedScalingPolicy(ScalingConfig(num_workers=3)))
    assert isinstance(fixed, FixedScalingPolicy)
    fixed.after_controller_start(train_run_context=None)  # (Ray Train's would create the actor here)
    decision = fixed.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 3
    assert fixed._coordinator_client is None
    fixed.before_controller_abort()
    elastic = ElasticScalingPolicy(ScalingConfig(num_workers=(2, 4)))
    assert _without_coordinator(elastic) is elastic
