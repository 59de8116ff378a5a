"""Workers use the DeepSpeed ops that setup prebuilt in the environment's own folder, built by the
environment's own ninja."""

from __future__ import annotations

import os
import sys

from orchestrator.train import extensions


def test_workers_use_the_environments_own_ops_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    monkeypatch.delenv(extensions.ENV, raising=False)
    (tmp_path / "env").mkdir()
    extensions.use_prebuilt()  # not built by setup: built there at the first run, not in a shared cache
    assert os.environ[extensions.ENV] == str(tmp_path / "env" / "torch_extensions")
    assert (tmp_path / "env" / "torch_extensions").is_dir()
    monkeypatch.setenv(extensions.ENV, "/users/own/choice")
    extensions.use_prebuilt()  # a folder the user chose wins
    assert os.environ[extensions.ENV] == "/users/own/choice"


def test_a_read_only_environment_without_a_build_leaves_torchs_default(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "missing" / "env"))  # mkdir fails: no parent
    monkeypatch.delenv(extensions.ENV, raising=False)
    extensions.use_prebuilt()
    assert extensions.ENV not in os.environ


def test_the_environments_own_ninja_comes_first(tmp_path, monkeypatch):
    """The system's ninja 1.11 and the ninja wheel's 1.13 invalidate each other's build log: a worker
    whose PATH lacks the environment's bin folder would compile the op again."""
    scripts = tmp_path / "bin"
    scripts.mkdir()
    monkeypatch.setattr(sys, "executable", str(scripts / "python"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv(extensions.ENV, raising=False)
    extensions.use_prebuilt()
    assert os.environ["PATH"] == "/usr/bin:/bin"  # no ninja of its own: PATH as it was
    (scripts / "ninja").write_text("")
    extensions.use_prebuilt()
    extensions.use_prebuilt()  # once, however often it is called
    assert os.environ["PATH"] == f"{scripts}:/usr/bin:/bin"
