"""The eval job's pure parts: which step the weights are of, and its metrics' registry."""

from __future__ import annotations

import json

from orchestrator.config.schema import EVAL_METRICS
from orchestrator.storage import open_store
from orchestrator.train.evaluate import METRICS, weights_step


def test_the_step_of_the_weights_from_a_checkpoint_path_or_an_export_manifest(tmp_path):
    store = open_store(str(tmp_path))
    export = f"file://{tmp_path}/runs/p1-pretrain/export"
    store.put(f"{export}/export.json", json.dumps({"job_id": "p1-pretrain", "step": 400}).encode())
    assert weights_step(store, export) == 400
    assert weights_step(store, f"file://{tmp_path}/runs/p1-pretrain/checkpoints/step-200") == 200
    assert weights_step(store, f"file://{tmp_path}/hf-folder") == 0  # not orch's: no step known
    assert weights_step(store, None) == 0


def test_every_metric_the_config_accepts_is_computed():
    assert set(METRICS) == set(EVAL_METRICS)
