"""Weights that are missing, damaged or of another model, through the real CLI in a child process:
`resume_from` / `init_from` are refused by `orch run`'s checks before any worker (or Ray) starts,
and `orch export` / `orch generate` fail in one line; exit 2, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.integration.test_cli import _one_line_error
from tests.integration.test_destinations import _hf_folder, _snapshot

GPT_TINY = {"name": "gpt_tiny", "vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64,
            "dropout": 0.0, "bias": True, "activation_checkpointing": False}
LOST = "nothing: no job recorded, the checkpoint left as it was"
BEFORE_WORKERS = ("refused by `orch run`'s checks before any worker (or Ray) starts, in one line naming the "
                  "checkpoint and the fix; exit 2")


def _checkpoint(folder: Path, n_layer: int = 2) -> Path:
    """A committed checkpoint as orch lays one out: its files, then COMMITTED.json listing them."""
    folder.mkdir(parents=True)
    files = {"model_config.json": json.dumps({**GPT_TINY, "n_layer": n_layer}).encode(),
             "trainer_state.json": json.dumps({"step": 8}).encode(),
             "zero_pp_rank_0_mp_rank_00_model_states.pt": os.urandom(4096)}
    listed = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        listed.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0})
    marker = {"step": 8, "world_size": 1, "zero_stage": 2, "files": listed, "committed_at": time.time()}
    (folder / "COMMITTED.json").write_text(json.dumps(marker))
    return folder


def _edit_marker(folder: Path, change) -> None:
    marker = json.loads((folder / "COMMITTED.json").read_text())
    change(marker)
    (folder / "COMMITTED.json").write_text(json.dumps(marker))


def _run(orch, tmp_path: Path, setting: str, uri: str):
    result = orch("run", "pipeline=pretrain", "model=gpt_tiny", f"pipeline.jobs.pretrain.{setting}={uri}",
                  "--state-dir", str(tmp_path / "state"))
    assert not (tmp_path / "state" / "jobs.db").exists()
    return result


# Each: (case, how to make the weights under tmp_path, needles of the one line)
def _nothing(tmp: Path) -> Path:
    return tmp / "no-such-checkpoint"


def _other_architecture(tmp: Path) -> Path:
    return _checkpoint(tmp / "run" / "checkpoints" / "step-8", n_layer=3)


def _not_step_n(tmp: Path) -> Path:
    return _checkpoint(tmp / "run" / "checkpoints" / "latest")


def _marker_not_json(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "ckpts" / "step-8")
    (folder / "COMMITTED.json").write_text("{\"step\": 8, \"files\": [")
    return folder


def _marker_without_files(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "ckpts" / "step-8")
    _edit_marker(folder, lambda m: m.pop("files"))
    return folder


def _marker_lists_a_missing_file(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "ckpts" / "step-8")
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    return folder


def _truncated_file(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "ckpts" / "step-8")
    states = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    return folder


def _marker_path_traversal(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "ckpts" / "step-8")
    _edit_marker(folder, lambda m: m["files"][2].update(path="../../../../../tmp/orch-escaped.pt"))
    return folder


def _run_without_commits(tmp: Path) -> Path:
    folder = _checkpoint(tmp / "run" / "checkpoints" / "step-8")
    (folder / "COMMITTED.json").unlink()  # an upload that never finished
    return tmp / "run"


RESUME_CASES = [
    ("nothing at the URI", _nothing, ["no-such-checkpoint", "no committed checkpoint", "step-N"]),
    ("a checkpoint of another architecture", _other_architecture, ["does not match model 'gpt_tiny'",
                                                                   "n_layer=3 (job: 2)"]),
    ("a committed folder not named step-N", _not_step_n, ["latest", "not a checkpoint folder", "step-N"]),
    ("COMMITTED.json that is not JSON", _marker_not_json, ["COMMITTED.json", "not JSON", "earlier checkpoint"]),
    ("COMMITTED.json without its file list", _marker_without_files, ["COMMITTED.json", "no 'files'"]),
    ("COMMITTED.json listing a file that is missing", _marker_lists_a_missing_file,
     ["model_states.pt", "missing", "partial"]),
    ("a checkpoint file cut short", _truncated_file, ["model_states.pt", "100 bytes", "4096"]),
    ("COMMITTED.json with a path outside the checkpoint", _marker_path_traversal,
     ["orch-escaped.pt", "not a path inside the checkpoint"]),
    ("a run whose only checkpoint never committed", _run_without_commits, ["no committed checkpoint"]),
]


@pytest.mark.reliability(category="checkpoint", case="resume_from: {case}", lost=LOST, happened=BEFORE_WORKERS)
@pytest.mark.parametrize("case, make, needles", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_from_bad_weights_is_refused_before_any_worker(orch, tmp_path, case, make, needles):
    weights = make(tmp_path)
    before = _snapshot(tmp_path) if weights.exists() else {}
    _one_line_error(_run(orch, tmp_path, "resume_from", str(weights)), *needles)
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("state")} == before
    assert not Path("/tmp/orch-escaped.pt").exists()


INIT_CASES = [
    ("nothing at the URI", _nothing, ["no-such-checkpoint", "is not a model", "HF folder"]),
    ("a checkpoint of another architecture", _other_architecture, ["init_from=", "n_layer=3 (job: 2)"]),
    ("a committed folder not named step-N", _not_step_n, ["latest", "not a checkpoint folder"]),
    ("COMMITTED.json that is not JSON", _marker_not_json, ["COMMITTED.json", "not JSON"]),
]


@pytest.mark.reliability(category="checkpoint", case="init_from: {case}", lost=LOST, happened=BEFORE_WORKERS)
@pytest.mark.parametrize("case, make, needles", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_from_bad_weights_is_refused_before_any_worker(orch, tmp_path, case, make, needles):
    _one_line_error(_run(orch, tmp_path, "init_from", str(make(tmp_path))), *needles)


@pytest.mark.reliability(category="checkpoint", case="`orch export` of {case}", lost="nothing: no folder written")
@pytest.mark.parametrize("case, make, needles", [
    ("a committed folder not named step-N", _not_step_n, ["latest", "not a checkpoint folder", "step-N"]),
    ("a checkpoint whose COMMITTED.json is not JSON", _marker_not_json, ["COMMITTED.json", "not JSON"]),
    ("a checkpoint with a path outside it in COMMITTED.json", _marker_path_traversal, ["orch-escaped.pt"]),
    ("a folder that holds no model", lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
     ["is not a model", "COMMITTED.json", "config.json"]),
], ids=["not step-N", "marker not JSON", "marker path traversal", "no model"])
def test_export_of_bad_weights(orch, tmp_path, case, make, needles):
    weights = make(tmp_path)
    _one_line_error(orch("export", str(weights), str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")),
                    *needles)
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/orch-escaped.pt").exists()


# ------------------------------------------------------------------------------ Hugging Face folders
def _truncated_safetensors(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{\"model_type\": \"gpt2\",")


def _another_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))


def _llama_config_over_gpt2_weights(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))  # a family orch has


def _config_a_list(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2]")


def _weights_of_fewer_layers(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 2}))  # the weights have 1 layer


HF_CASES = [
    ("a truncated model.safetensors", _truncated_safetensors, ["model.safetensors", "not a readable safetensors",
                                                               "truncated"]),
    ("config.json that is not JSON", _config_not_json, ["config.json", "not a usable model config"]),
    ("config.json of another model type", _another_model_type, ["config.json", "'mistral'", "gpt2", "llama"]),
    ("a Llama config.json over GPT-2 weights", _llama_config_over_gpt2_weights,
     ["model.safetensors", "does not fit its config.json", "missing"]),
    ("config.json that is a list", _config_a_list, ["config.json", "list"]),
    ("weights with fewer layers than config.json", _weights_of_fewer_layers, ["model.safetensors", "config.json"]),
]


@pytest.mark.reliability(category="model folder", case="`orch generate` of a Hugging Face folder with {case}",
                         lost="nothing: the folder left as it was")
@pytest.mark.parametrize("case, damage, needles", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_generate_from_a_damaged_hugging_face_folder(orch, tmp_path, case, damage, needles):
    folder = _hf_folder(tmp_path / "hf", n_layer=1)
    damage(folder)
    before = _snapshot(folder)
    _one_line_error(orch("generate", str(folder), "--prompt", "Once upon a time"), *needles)
    assert _snapshot(folder) == before


@pytest.mark.reliability(category="command line", case="`orch generate {flag} {value}`", lost="nothing")
@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--top-k", "-1"), ("--temperature", "-0.5")])
def test_generate_with_nonsense_sampling_settings(orch, tmp_path, flag, value):
    _one_line_error(orch("generate", str(tmp_path), "--prompt", "x", flag, value), value, "--max-new-tokens")
