"""Where the CPU goes: per-process and per-thread CPU seconds of everything on this machine over a
window, from /proc (utime + stime of each thread). Run it while a job trains:

    .venv/bin/python bench/cpu_split.py 20        # a 20-second window

Used for bench/RESULTS.md's split of orch's steady steps (training threads vs Ray's daemons vs
orch's worker threads)."""

from __future__ import annotations

import collections
import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[tuple[str, str], tuple[str, str, int]]:
    """(pid, tid) -> (command line, thread name, CPU ticks so far) of every thread."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:80]
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[(pid, tid)] = (cmd, name, int(fields[11]) + int(fields[12]))  # utime + stime
        except OSError:  # (gone meanwhile)
            pass
    return out


def main() -> None:
    window = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    before = snapshot()
    time.sleep(window)
    after = snapshot()
    procs: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    for key, (cmd, name, ticks) in after.items():
        used = (ticks - before.get(key, (cmd, name, ticks))[2]) / HZ
        if used > 0:
            procs[(key[0], cmd)] += used
            threads[(key[0], name, cmd[:40])] += used
    print(f"CPU seconds over {window:g} s: {sum(procs.values()):.1f} (of {window * os.cpu_count():.0f} available)")
    for (pid, cmd), used in procs.most_common(12):
        print(f"  {used:6.2f}  {pid} {cmd}")
    print("threads:")
    for (pid, name, cmd), used in threads.most_common(16):
        print(f"  {used:6.2f}  {pid} {name:20s} {cmd}")


if __name__ == "__main__":
    main()
