"""What the runner does on a stall (`orchestrator.execution.watchdog`): every rank's Python stacks
(all threads, py-spy) into the run's folder in the store, then the stuck ranks' processes killed, so
that Ray Train restarts the worker group from the last commit like after any failed worker.

py-spy reads a process's memory from outside it, so it works on a process stopped by SIGSTOP or
wedged in C code, where `faulthandler` (a signal handled by the process itself) cannot. It runs on
the rank's own node: directly when that is the runner's node, else in a zero-CPU Ray task pinned
to the node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.execution.watchdog import RankSeen, Stall
from orchestrator.storage import join_uri

DUMP_TIMEOUT_S = 30.0  # py-spy on one process; a dump that takes longer is given up


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # (installed with Ray, in the same environment)
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): py-spy cannot pause it again, so it reads it as it is."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def dump_stacks(pid: int) -> str:
    """The Python stacks of every thread of process `pid` (on this node), or why there are none."""
    exe = _py_spy()
    if exe is None:
        return "no stacks: py-spy is not installed on this node (pip install py-spy)\n"
    cmd = [exe, "dump", "--pid", str(pid)] + (["--nonblocking"] if _stopped(pid) else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no stacks: py-spy gave no answer in {DUMP_TIMEOUT_S:.0f} s\n"
    if out.returncode and "--nonblocking" not in cmd:  # (a process that cannot be paused: read it as it is)
        out = subprocess.run(cmd + ["--nonblocking"], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    return out.stdout + (f"\npy-spy: {out.stderr.strip().splitlines()[0]}\n" if out.returncode and out.stderr else "")


def kill(pid: int) -> bool:
    """SIGKILL process `pid` (on this node): a stopped process dies too. Whether it was there."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _on_node(rank: RankSeen, fn, here: str):
    """`fn(rank.pid)` on the rank's node: a ref to wait for, or the value itself where it runs here."""
    if rank.node_id == here:
        return fn(rank.pid)
    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(rank.node_id, soft=False))
    return task.remote(rank.pid)


def _resolve(values: list, timeout: float) -> list:
    out = []
    for v in values:
        if isinstance(v, ray.ObjectRef):
            try:
                v = ray.get(v, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - the node is gone, or the task did not run
                v = e
        out.append(v)
    return out


def header(stall: Stall, r: RankSeen) -> str:
    role = "STUCK" if r in stall.stuck else "waiting"
    return (f"# rank {r.rank} ({role}) on node {r.node}, pid {r.pid}: step {r.step}, {r.phase} for "
            f"{r.in_phase_s:.0f} s, last heartbeat {r.quiet_s:.0f} s ago\n# {stall.line()}\n\n")


def handle_stall(stall: Stall, store, folder: str) -> list[int]:
    """Dump every rank's stacks into `folder` (`rank-<r>.txt`), then kill the stuck ranks'
    processes; the ranks killed."""
    here = ray.get_runtime_context().get_node_id()
    ranks = stall.ranks
    texts = _resolve([_on_node(r, dump_stacks, here) for r in ranks], DUMP_TIMEOUT_S + 30)
    for r, text in zip(ranks, texts):
        body = text if isinstance(text, str) else f"no stacks: {type(text).__name__}: {text}\n"
        store.put(join_uri(folder, f"rank-{r.rank}.txt"), (header(stall, r) + body).encode())
    killed = _resolve([_on_node(r, kill, here) for r in stall.stuck], 60)
    return [r.rank for r, ok in zip(stall.stuck, killed) if ok is True]
