"""Workers use the DeepSpeed ops that setup prebuilt in the environment's own folder."""

from __future__ import annotations

import os
import sys

from orchestrator.train import extensions


def test_workers_use_the_environments_prebuilt_ops(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv(extensions.ENV, raising=False)
    extensions.use_prebuilt()  # nothing built: torch's default cache
    assert extensions.ENV not in os.environ
    (tmp_path / "torch_extensions").mkdir()
    extensions.use_prebuilt()
    assert os.environ[extensions.ENV] == str(tmp_path / "torch_extensions")
    monkeypatch.setenv(extensions.ENV, "/users/own/choice")
    extensions.use_prebuilt()  # a folder the user chose wins
    assert os.environ[extensions.ENV] == "/users/own/choice"
