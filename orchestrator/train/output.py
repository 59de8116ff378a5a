"""A worker's own output, kept in its run's folder in the store (`orchestrator.joblogs` has the layout).

`WorkerOutput` tees the process's file descriptors 1 and 2 through pipes: what Python, DeepSpeed,
torch, Ray or any C library writes there still goes where it went (Ray's worker log files, the
console), and each line is also stamped with the time it arrived and appended to a node-local spool
file. A thread uploads what the spool gained since its last upload as a new part, every
`WORKER_LOG_UPLOAD_S` seconds and at close; the training step never waits on the store. A rank
SIGKILLed keeps the parts uploaded before; one that raises writes its traceback first
(`failed`), and `close` uploads the rest.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from pathlib import Path

from orchestrator.constants import WORKER_LOG_UPLOAD_S
from orchestrator.joblogs import TRACEBACK, stamp

log = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024  # a longer line without a newline (a progress bar) is cut there


class WorkerOutput:
    def __init__(self, spool: Path, clock=time.time, interval_s: float = WORKER_LOG_UPLOAD_S):
        self.spool, self.clock, self.interval_s = spool, clock, interval_s
        self.lock = threading.Lock()
        self.written = 0  # bytes of whole stamped lines in the spool
        self.uploaded = 0
        self.parts = 0
        self.store = self.prefix = None
        self.stop = threading.Event()
        self.warned = False
        self.saved: dict[int, int] = {}  # fd -> a copy of what it was
        self.pumps: list[tuple[threading.Thread, int]] = []
        self.uploader: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()  # close() wakes the pumps through it
        spool.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a write the disk refuses leaves no bytes behind to fail again at close() (and
        # replace the error that ended the worker with "No space left on device").
        self.out = open(spool, "wb", buffering=0)

    # ----------------------------------------------------------------------------- capture
    def start(self) -> WorkerOutput:
        """From now on fds 1 and 2 go through this object (and on to where they went)."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            r, w = os.pipe()
            self.saved[fd] = os.dup(fd)
            os.dup2(w, fd)
            os.close(w)
            pump = threading.Thread(target=self._pump, args=(r, self.saved[fd]), name=f"orch-output-{fd}",
                                    daemon=True)
            pump.start()
            self.pumps.append((pump, r))
        return self

    def _pump(self, r: int, to: int) -> None:
        """Copy one pipe to the original fd and, line by line, into the spool. Never writes to fds
        1 or 2 itself (it is what drains them). Ends at the pipe's end, or once `close` has given
        the fds back and the pipe is drained: another copy of the pipe's write end may never close
        (DeepSpeed's compiler probe leaks a dup of fd 2; a child process may inherit fd 1 or 2)."""
        partial = b""
        closing = False
        while True:
            ready, _, _ = select.select([r] if closing else [r, self._wake_r], [], [], 0 if closing else None)
            if r not in ready:
                if closing:
                    break  # drained
                closing = True  # woken by close(): read what the pipe holds, then stop
                continue
            try:
                data = os.read(r, 65536)
            except OSError:
                break
            if not data:
                break
            _write_all(to, data)
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            if len(partial) > _MAX_LINE:
                lines.append(partial)
                partial = b""
            self._append(lines)
        if partial:
            self._append([partial])

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        t = self.clock()
        body = "".join(stamp(t, line.rstrip(b"\r").decode(errors="replace")) for line in lines).encode()
        with self.lock:
            try:
                self.written += self.out.write(body) or 0
            except (OSError, ValueError):  # a full disk, or closed: the output still reached its fd
                pass

    # ------------------------------------------------------------------------------ upload
    def upload_to(self, store, prefix: str) -> None:
        """Upload the spool to parts `<prefix>/<n>.log`, from the start, then every interval."""
        self.store, self.prefix = store, prefix
        self.uploader = threading.Thread(target=self._upload_loop, name="orch-output-upload", daemon=True)
        self.uploader.start()

    def _upload_loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.upload()

    def upload(self) -> None:
        """A new part of what the spool gained since the last one (nothing when it gained nothing)."""
        from orchestrator.storage import join_uri

        if self.store is None:
            return
        with self.lock:
            start, end = self.uploaded, self.written
        if end <= start:
            return
        with open(self.spool, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        uri = join_uri(self.prefix, f"{self.parts + 1:06d}.log")
        try:
            self.store.put(uri, body)
        except Exception as e:  # noqa: BLE001 - the logs never stop training: sent with the next part
            if not self.warned:
                self.warned = True
                log.warning("could not upload this worker's output to %s (%s); retrying with the next part", uri, e)
            return
        self.parts += 1
        self.uploaded = end

    def failed(self, text: str) -> None:
        """The traceback that ends this worker: to stderr (so into the output) and its own object."""
        _write_all(2, text.encode(errors="replace"))
        if self.store is not None:
            from orchestrator.storage import join_uri

            t = self.clock()
            body = "".join(stamp(t, line) for line in text.splitlines()).encode()
            try:
                self.store.put(join_uri(self.prefix, TRACEBACK), body)
            except Exception:  # noqa: BLE001 - it is in the output too
                pass

    def close(self) -> None:
        """Give fds 1 and 2 back, read what is left in the pipes, upload the rest."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)  # (closes the pipe's write end that fd held; what was written is in the pipe)
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for pump, r in self.pumps:
            pump.join(timeout=5)  # (only a writer that never pauses keeps it longer: leave it then)
            if not pump.is_alive():
                os.close(r)
        if self._wake_w >= 0 and not any(pump.is_alive() for pump, _ in self.pumps):
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        for saved in self.saved.values():
            os.close(saved)
        self.saved, self.pumps = {}, []
        self.stop.set()
        if self.uploader is not None:
            self.uploader.join()
        self.upload()
        with self.lock:
            try:
                self.out.close()
            except OSError:  # (nothing buffered; a file system gone bad may still refuse the close)
                pass
        if self.store is not None and self.uploaded == self.written:
            self.spool.unlink(missing_ok=True)  # all of it is in the store


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError:
            return
        data = data[n:]
