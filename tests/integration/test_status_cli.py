"""`orch status --watch` without a controller, on the state folder another process (`orch run`)
writes, and `orch completion`: the real CLI in child processes, the real SQLite job store; no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from tests.conftest import REPO


def _pipeline(state: Path, pid: str = "p0000aa") -> JobStore:
    """A pipeline as `orch run` records it: pretrain RUNNING at step 12 of 30, finetune PENDING."""
    store = JobStore(state)
    store.add([JobRecord(id=f"{pid}-{name}", pipeline_id=pid, name=name, kind=name, state=JobState.PENDING,
                         priority=0, depends_on=[f"{pid}-pretrain"] if name == "finetune" else [],
                         config={"workers": 2, "trainer": {"max_steps": 30}}, created_at=time.time())
               for name in ("pretrain", "finetune")])
    for s in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING):
        store.transition(f"{pid}-pretrain", s)
    store.update(f"{pid}-pretrain", metrics={"step": 12, "loss": 3.5, "tokens_per_s": 2000.0, "step_time_s": 0.25})
    return store


def _finish(store: JobStore, pid: str = "p0000aa") -> None:
    store.update(f"{pid}-pretrain", metrics={"step": 30, "loss": 2.0})
    store.transition(f"{pid}-pretrain", JobState.SUCCEEDED, "training finished")
    store.transition(f"{pid}-finetune", JobState.CANCELLED, "cancelled by the user", failure_reason="cancelled")


def _orch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_watch_without_a_controller_follows_the_state_folder(tmp_path):
    store = _pipeline(tmp_path / "state")
    watch = _orch("status", "--watch", "--interval", "0.3", "--state-dir", str(tmp_path / "state"))
    time.sleep(2.0)  # it keeps refreshing while a job runs
    assert watch.poll() is None
    _finish(store)
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    blocks = out.split("# ")[1:]  # one block per refresh (not a terminal: plain lines, no escape codes)
    assert len(blocks) >= 2 and "\x1b" not in out
    assert "p0000aa-pretrain  RUNNING" in blocks[0] and "12/30" in blocks[0] and "2k" in blocks[0]
    assert "p0000aa-pretrain  SUCCEEDED" in blocks[-1] and "30/30" in blocks[-1]
    # every job ended: `--watch` prints once and returns at once
    t0 = time.time()
    again = _orch("status", "--watch", "--state-dir", str(tmp_path / "state"))
    out, err = again.communicate(timeout=30)
    assert again.returncode == 0 and out.count("# ") == 1 and time.time() - t0 < 15, err
    assert "├─ p0000aa-pretrain" in out and "└─ p0000aa-finetune" in out


def test_completion_script_sourced_by_bash(tmp_path):
    _pipeline(tmp_path / "state")
    shim = tmp_path / "bin" / "orch"  # `orch` of this checkout, as the script calls it
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m orchestrator \"$@\"\n")
    shim.chmod(0o755)
    calls = "; ".join(f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; _orch_complete; echo "${{COMPREPLY[*]}}"'
                      for line in ("orch run model=gpt", "orch run deepspeed=", "orch run trainer.max_s",
                                   "orch logs p0000", "orch sta", "orch status --wa"))
    out = subprocess.run(["bash", "-c", f"source <(orch completion bash) && complete -p orch && {calls}"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}",
                              "ORCH_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "complete -o bashdefault -F _orch_complete orch"
    assert {"gpt_tiny", "gpt_small"} <= set(lines[1].split()) and "llama_tiny" not in lines[1]
    assert set(lines[2].split()) == {"zero1", "zero2", "zero3", "zero3_offload"}
    assert lines[3] == "trainer.max_steps="
    assert set(lines[4].split()) == {"p0000aa-pretrain", "p0000aa-finetune", "p0000aa"}
    assert lines[5] == "status" and lines[6] == "--watch"
    from orchestrator.cli.completion import script
    from orchestrator.cli.main import build_parser

    for shell in ("zsh", "tcsh"):
        assert "orch _complete overrides" in script(build_parser(), shell)
