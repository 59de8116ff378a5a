"""Where the CPU goes: per-process and per-thread CPU seconds of everything on this machine over a
window, from /proc (utime + stime of each thread), with how often each woke up (voluntary context
switches: it slept, then ran again) and how often each thread was preempted (involuntary ones:
something else took its core). Run it while a job trains:

    .venv/bin/python bench/cpu_split.py 20        # a 20-second window
    .venv/bin/python bench/cpu_split.py 40 30     # 40 seconds, the 30 busiest processes

Used for bench/RESULTS.md's split of orch's steady steps (training threads vs Ray's daemons vs
orch's worker threads). On a machine whose cores are all training, every wake-up anywhere preempts
a training thread: compare the training threads' preemptions a second with the bare launcher's."""

from __future__ import annotations

import collections
import os
import re
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def _switches(pid: str, tid: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a thread so far."""
    counts = dict(line.split(":") for line in open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
                  if line.endswith(tuple("0123456789")) and "ctxt_switches" in line)
    return int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"])


def snapshot() -> dict[tuple[str, str], tuple[str, str, int, int, int]]:
    """(pid, tid) -> (command line, thread name, CPU ticks, voluntary and involuntary switches so
    far) of every thread."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            cmd = re.sub(r"\S*/site-packages/", "", cmd)[:80]  # (ray/_private/log_monitor.py, not a long path)
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[(pid, tid)] = (cmd, name, int(fields[11]) + int(fields[12]), *_switches(pid, tid))
        except (OSError, KeyError, ValueError):  # (gone meanwhile)
            pass
    return out


def main() -> None:
    window = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    before = snapshot()
    time.sleep(window)
    after = snapshot()
    procs: collections.Counter = collections.Counter()
    wakeups: collections.Counter = collections.Counter()
    threads: dict[tuple[str, str], tuple[float, float, float, str, str]] = {}
    for key, (cmd, name, ticks, vol, invol) in after.items():
        _, _, ticks0, vol0, invol0 = before.get(key, (cmd, name, ticks, vol, invol))
        used = (ticks - ticks0) / HZ
        procs[(key[0], cmd)] += used
        wakeups[(key[0], cmd)] += (vol - vol0) / window
        threads[key] = (used, (vol - vol0) / window, (invol - invol0) / window, name, cmd[:40])
    print(f"CPU seconds over {window:g} s: {sum(procs.values()):.1f} (of {window * os.cpu_count():.0f} available); "
          f"wake-ups machine-wide: {sum(wakeups.values()):.0f}/s")
    print("  CPU-s  wake-ups/s  pid command")
    for (pid, cmd), used in procs.most_common(top):
        print(f"  {used:6.2f}  {wakeups[(pid, cmd)]:8.0f}  {pid} {cmd}")
    print("threads:  CPU-s  wake-ups/s  preempted/s")
    busy = [kv for kv in threads.items() if kv[1][0] > 0 or kv[1][1] > 0]
    for (pid, _tid), (used, vol, invol, name, cmd) in sorted(busy, key=lambda kv: -kv[1][0])[:16]:
        print(f"  {used:6.2f}  {vol:8.0f}  {invol:8.0f}  {pid} {name:20s} {cmd}")


if __name__ == "__main__":
    main()
