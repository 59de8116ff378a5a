"""`orch logs`: parsing the event file and the workers' parts, interleaving them by time, following
a job until it ends, and a worker's output captured at the file-descriptor level (a real child
process, a real local store)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.joblogs import (
    EventLog,
    Interleaver,
    Line,
    WorkerLogReader,
    format_time,
    parse_events,
    parse_part,
    part_name,
    rank_logs_uri,
    read_events,
    show_logs,
    stamp,
)
from orchestrator.storage import join_uri, open_store

T0 = 1_700_000_000.0


def test_event_lines_parse_with_their_time_and_continuations_keep_it():
    text = f"{format_time(T0 + 1.25)} j: RUNNING\n{format_time(T0 + 2)} j: FAILED: boom\n  detail\n"
    lines = parse_events(text)
    assert [round(line.t, 3) for line in lines] == [T0 + 1.25, T0 + 2, T0 + 2]
    assert lines[2].text == "  detail"
    # the old format (whole seconds) still reads
    assert parse_events(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(T0)) + " j: x\n")[0].t == T0


def test_part_lines_and_names():
    lines = parse_part(stamp(T0, "hello") + stamp(T0 + 1, "a b  c"), "[rank 1] ")
    assert [(line.t, line.text) for line in lines] == [(T0, "[rank 1] hello"), (T0 + 1, "[rank 1] a b  c")]
    assert part_name("s3://b/runs/j/logs/attempt-0000000000123/rank-2/000004.log").rank == 2
    assert part_name("file:///x/runs/j/logs/attempt-1/rank-0/traceback.log").seq == -1
    assert part_name("file:///x/runs/j/metrics/parts/a00001-000001.jsonl") is None


def test_interleaver_orders_by_time_keeps_ties_in_arrival_order_and_holds_back_late_lines():
    m = Interleaver()
    m.add([Line(T0 + 1, "e1"), Line(T0 + 5, "e2")])
    m.add([Line(T0 + 1, "w1"), Line(T0 + 3, "w2"), Line(T0 + 9, "w3")])
    assert m.take(until=T0 + 4) == ["e1", "w1", "w2"]
    m.add([Line(T0 + 4, "late")])  # uploaded after the first take, still before what is held back
    assert m.take() == ["late", "e2", "w3"]
    assert m.take() == []


def _write_part(store, run, attempt, rank, seq, lines):
    uri = join_uri(rank_logs_uri(run, attempt, rank), "traceback.log" if seq < 0 else f"{seq:06d}.log")
    store.put(uri, "".join(stamp(t, x) for t, x in lines).encode())


def test_worker_reader_shows_one_rank_and_every_other_ranks_traceback_each_part_once(tmp_path):
    store = open_store(f"file://{tmp_path}")
    run = f"file://{tmp_path}/runs/j"
    a1, a2 = "0001700000000000", "0001700000100000"
    _write_part(store, run, a1, 0, 1, [(T0, "r0 first")])
    _write_part(store, run, a1, 1, 1, [(T0, "r1 first")])
    _write_part(store, run, a1, 1, -1, [(T0 + 2, "Traceback (most recent call last):"), (T0 + 2, "ValueError: x")])
    _write_part(store, run, a1, 0, -1, [(T0 + 2, "rank 0's own traceback")])  # (in its output already)
    reader = WorkerLogReader(store, run, rank=0)
    first = reader.read()
    assert first[0].text == f"{format_time(T0)} [rank 0] r0 first"
    assert [line.text.split(" ", 2)[2] for line in first] == [
        "[rank 0] r0 first", "[rank 1] traceback: Traceback (most recent call last):",
        "[rank 1] traceback: ValueError: x"]
    assert reader.read() == []  # nothing new
    _write_part(store, run, a1, 0, 2, [(T0 + 1, "r0 second")])
    _write_part(store, run, a2, 0, 1, [(T0 + 100, "r0 again")])
    assert [line.text.split(" ", 2)[2] for line in reader.read()] == ["[rank 0] r0 second",
                                                                       "[attempt 2 rank 0] r0 again"]
    assert reader.ranks == {0, 1}
    assert sorted(line.text.split(" ", 2)[2] for line in WorkerLogReader(store, run, rank=1).read()) == [
        "[rank 0] traceback: rank 0's own traceback", "[rank 1] r1 first"]


def test_event_log_files_and_reading_whole_lines_from_an_offset(tmp_path):
    events = EventLog(tmp_path)
    events.write("p1-pretrain: RUNNING")
    events.write("connected to a cluster")
    events.write("p1-pretrain: SUCCEEDED")
    text, offset = read_events(tmp_path, "p1-pretrain")
    assert [line.split(" ", 2)[2] for line in text.splitlines()] == ["p1-pretrain: RUNNING", "p1-pretrain: SUCCEEDED"]
    assert "connected to a cluster" in (tmp_path / "logs" / "controller.log").read_text()
    with open(tmp_path / "logs" / "p1-pretrain.log", "a") as f:
        f.write("2024-01-01 00:00:00.000 half a li")  # still being written
    assert read_events(tmp_path, "p1-pretrain", offset) == ("", offset)
    assert read_events(tmp_path, "nope") == ("", 0)


class _Job:
    """A job whose events and worker lines appear over the polls of `show_logs`."""

    def __init__(self, polls: list[tuple[list[Line], list[Line], bool]]):
        self.polls, self.n, self.now = polls, 0, T0

    def read(self, offset):
        events, _, terminal = self.polls[min(self.n, len(self.polls) - 1)]
        text = "".join(f"{format_time(e.t)} {e.text}\n" for e in events) if offset < self.n + 1 else ""
        return {"text": text, "offset": self.n + 1, "terminal": terminal, "record": {}}

    def workers(self, record):
        job = self

        class Reader:
            def read(self):
                return job.polls[min(job.n, len(job.polls) - 1)][1]

        return Reader()

    def sleep(self, s):
        self.n += 1
        self.now += 10


def test_show_logs_follows_until_terminal_in_time_order():
    job = _Job([
        ([Line(T0 + 1, "j: RUNNING")], [Line(T0 + 0.5, "[rank 0] banner")], False),
        ([Line(T0 + 15, "j: step 5/10")], [Line(T0 + 12, "[rank 0] step 5")], False),
        ([Line(T0 + 21, "j: SUCCEEDED")], [Line(T0 + 20, "[rank 0] done")], True),
        ([], [], True),
    ])
    out = []
    show_logs(job.read, job.workers, out.append, follow=True, lag_s=5, clock=lambda: job.now, sleep=job.sleep)
    assert [line.split(" ", 2)[-1] if line[0].isdigit() else line for line in out] == [
        "[rank 0] banner", "j: RUNNING", "[rank 0] step 5", "j: step 5/10", "[rank 0] done", "j: SUCCEEDED"]
    assert job.n == 3  # it read once more after the job ended


def test_show_logs_without_the_store_still_shows_the_events_and_says_why_once():
    job = _Job([([Line(T0, "j: FAILED: x")], [], True)])
    out, warned = [], []

    def broken(record):
        raise OSError("connection refused")

    show_logs(job.read, broken, out.append, warn=warned.append)
    assert [line.endswith("j: FAILED: x") for line in out] == [True]
    assert len(warned) == 1 and "connection refused" in warned[0]

    def bad_rank(record):
        raise ConfigError("runs at most 2 worker(s)")

    with pytest.raises(ConfigError):
        show_logs(job.read, bad_rank, out.append)
    out.clear()
    show_logs(job.read, bad_rank, out.append, events_only=True)  # --controller: the store is not read
    assert len(out) == 1


CHILD = textwrap.dedent("""
    import os, sys, traceback
    from pathlib import Path
    from orchestrator.storage import open_store
    from orchestrator.train.output import WorkerOutput

    root = sys.argv[1]
    out = WorkerOutput(Path(root) / "spool" / "rank-1.log", interval_s=0.2).start()
    out.upload_to(open_store("file://" + root), "file://" + root + "/logs/rank-1")
    print("from python", flush=True)
    os.write(2, b"from fd 2, no newline")
    os.system("echo from a child process")
    try:
        raise ValueError("the loss is nan")
    except ValueError:
        out.failed("rank 1 failed:\\n" + traceback.format_exc())
    finally:
        out.close()
    print("after close")
""")


def test_worker_output_is_teed_at_the_fd_level_uploaded_in_parts_with_the_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Everything still reached the process's own streams.
    assert "from python" in done.stdout and "from a child process" in done.stdout and "after close" in done.stdout
    assert "from fd 2, no newline" in done.stderr and "ValueError: the loss is nan" in done.stderr
    parts = sorted((tmp_path / "logs" / "rank-1").glob("0*.log"))
    assert parts, list(tmp_path.rglob("*"))
    lines = [line for p in parts for line in parse_part(p.read_text(), "")]
    texts = [line.text for line in lines]
    for needle in ("from python", "from a child process", "from fd 2, no newline", "ValueError: the loss is nan"):
        assert any(needle in t for t in texts), texts
    assert "after close" not in texts
    assert all(abs(line.t - time.time()) < 60 for line in lines)
    tb = parse_part((tmp_path / "logs" / "rank-1" / "traceback.log").read_text(), "")
    assert tb[0].text == "rank 1 failed:" and tb[-1].text == "ValueError: the loss is nan"
    assert not (tmp_path / "spool" / "rank-1.log").exists()  # all of it was uploaded


LEAKED = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from orchestrator.train.output import WorkerOutput

    out = WorkerOutput(Path(sys.argv[1]) / "rank-0.log").start()
    leaked = os.dup(2)  # as DeepSpeed's compiler probe leaves one: the pipe's write end never closes
    for i in range(2000):
        print(f"line {i}", flush=True)
    os.write(2, b"last words on fd 2")
    out.close()
    print("pumps left:", [t.name for t in threading.enumerate() if t.name.startswith("orch-output")])
""")


def test_output_closes_at_once_when_a_copy_of_the_pipe_stays_open_and_keeps_every_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", LEAKED, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The pumps ended once the pipes were drained (they used to wait for an end of file that never
    # came, until a 5 s timeout at every worker group's end, and then stayed blocked).
    assert "pumps left: []" in done.stdout, done.stdout[-300:]
    spooled = (tmp_path / "rank-0.log").read_text()
    assert "line 1999" in spooled and "last words on fd 2" in spooled  # drained before it stopped
    assert done.stdout.count("line ") == 2000


FULL_DISK = textwrap.dedent("""
    from pathlib import Path
    from orchestrator.train.output import WorkerOutput

    out = WorkerOutput(Path("/dev/full")).start()  # every write to it fails: ENOSPC
    try:
        print("a line that cannot be spooled", flush=True)
        raise ValueError("cannot stage the checkpoint: the disk is full")
    finally:
        out.close()
""")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_full_spool_disk_never_hides_the_error_that_ends_the_worker():
    # (CI saw a worker's staging error replaced by the spool's own "No space left on device" from
    # close(): the bytes a failed flush left in the buffer were flushed again there, and raised.)
    done = subprocess.run([sys.executable, "-c", FULL_DISK], capture_output=True, text=True, timeout=60)
    assert "a line that cannot be spooled" in done.stdout  # still reached the process's own stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last == "ValueError: cannot stage the checkpoint: the disk is full", done.stderr[-2000:]
