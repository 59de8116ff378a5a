"""The next step's batch, assembled on a thread while this step computes.

torch releases the GIL in its kernels, so reading and collating the next batch overlaps the
forward and backward passes; the loop only waits when the batch is not ready yet.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class BatchPrefetcher:
    """Reads `read(cursor)` one step ahead, for cursors start, start + stride, ..."""

    def __init__(self, read: Callable[[int], list], start: int, stride: int):
        self._read, self._stride = read, stride
        self._cursor = start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="orch-batch")
        self._upcoming = self._pool.submit(read, start)

    def next(self, more: bool) -> tuple[list, float]:
        """This step's batch and the seconds waited for it; `more`: a later step will want one."""
        t0 = time.perf_counter()
        batch = self._upcoming.result()
        waited = time.perf_counter() - t0
        if more:
            self._cursor += self._stride
            self._upcoming = self._pool.submit(self._read, self._cursor)
        return batch, waited

    def close(self) -> None:
        """Stops the thread (a pending read is cancelled or finished)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
