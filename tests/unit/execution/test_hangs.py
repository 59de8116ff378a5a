"""Hang dumps on a real process: py-spy reads the stacks of a process stopped with SIGSTOP (it cannot
pause it again, so it reads it as it is), and the stuck process is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from orchestrator.execution.hangs import dump_stacks, kill


def test_stacks_of_a_stopped_process_then_it_is_killed():
    code = ("import threading, time\n"
            "def beating():\n    time.sleep(600)\n"
            "threading.Thread(target=beating, name='orch-heartbeat', daemon=True).start()\n"
            "print('up', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(0.2)
        proc.send_signal(signal.SIGSTOP)
        text = dump_stacks(proc.pid)
        assert 'Thread' in text and '"MainThread"' in text and '"orch-heartbeat"' in text, text
        assert "beating (<string>:3)" in text, text
        assert kill(proc.pid) and proc.wait(timeout=10) == -signal.SIGKILL
        assert not kill(proc.pid)  # (gone: nothing to kill)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
