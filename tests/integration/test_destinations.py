"""Commands write only into a destination that is empty or that they wrote themselves: the user's
own files are never replaced or deleted without --overwrite (one line, exit 2, nothing touched).
The real CLI in a child process; the refusals come before any Ray cluster starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_cli import _one_line_error

safetensors_torch = pytest.importorskip("safetensors.torch")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"part-{i}.txt").write_text("Once upon a time a fox met a crow in the wood.\n" * 50)
    return folder


@pytest.mark.reliability(category="destination",
                         case="`orch data prepare` into its own source (with and without --overwrite)",
                         lost="nothing: every corpus file byte for byte")
def test_prepare_into_its_own_source_is_refused_and_the_corpus_kept(orch, tmp_path):
    src = _corpus(tmp_path / "corpus")
    before = _snapshot(src)
    for dst in (src, src / "prepared"):
        result = orch("data", "prepare", str(src), str(dst), "--state-dir", str(tmp_path / "state"))
        _one_line_error(result, "overlaps its source", str(src))
        assert _snapshot(src) == before
    # --overwrite gives no licence to write over the corpus
    result = orch("data", "prepare", str(src), str(src), "--overwrite", "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, "overlaps its source")
    assert _snapshot(src) == before


@pytest.mark.reliability(category="destination", case="`orch data prepare` into a folder of the user's files",
                         lost="nothing: the user's files byte for byte")
def test_prepare_into_a_folder_of_the_users_files_is_refused(orch, tmp_path):
    src = _corpus(tmp_path / "corpus")
    dst = tmp_path / "mine"
    (dst / "train").mkdir(parents=True)
    (dst / "val").mkdir()
    (dst / "train" / "notes.md").write_text("my notes")
    (dst / "val" / "labels.csv").write_text("a,b\n1,2\n")
    before = _snapshot(dst)
    result = orch("data", "prepare", str(src), str(dst), "--state-dir", str(tmp_path / "state"))
    line = _one_line_error(result, str(dst), "2 file(s)", "--overwrite")
    assert "train/notes.md" in line
    assert _snapshot(dst) == before


def _hf_folder(folder: Path, n_layer: int) -> Path:
    """A Hugging Face GPT-2 folder written by `orch export` from a small random model."""
    from model import GPT, GPTConfig
    from orchestrator import artifacts

    cfg = GPTConfig(name="t", vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    torch.manual_seed(n_layer)
    artifact = artifacts.ModelArtifact(cfg, GPT(cfg).state_dict(), None, "test")
    return artifacts.write_hf(artifact, folder)


@pytest.mark.reliability(category="destination", case="`orch export` into another model's folder",
                         lost="nothing: their files byte for byte, no temporary folder left")
def test_export_never_replaces_another_models_folder(orch, tmp_path):
    source = _hf_folder(tmp_path / "source", n_layer=1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"model_type": "llama", "note": "someone else's model"}))
    (theirs / "model.safetensors").write_bytes(b"their weights")
    before = _snapshot(theirs)
    result = orch("export", str(source), str(theirs))
    _one_line_error(result, str(theirs), "--overwrite")
    assert _snapshot(theirs) == before

    # A new folder, then the same folder again (orch wrote it), then --overwrite on theirs: all fine.
    ours = tmp_path / "ours"
    for _ in range(2):
        result = orch("export", str(source), str(ours))
        assert result.returncode == 0, result.stderr
    assert json.loads((ours / "config.json").read_text())["n_layer"] == 1
    result = orch("export", str(source), str(theirs), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((theirs / "config.json").read_text())["model_type"] == "gpt2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".orch-export-")]  # no temp folder left


@pytest.mark.reliability(category="destination", case="`orch export` into a folder that cannot be written",
                         lost="nothing")
def test_export_into_a_folder_that_cannot_be_written_is_one_line(orch, tmp_path):
    import os

    if os.geteuid() == 0:
        target = Path("/proc/orch-cannot-write-here")  # not even root can create files in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    source = _hf_folder(tmp_path / "source", n_layer=1)
    result = orch("export", str(source), str(target))
    _one_line_error(result, "cannot write the export", str(target))
