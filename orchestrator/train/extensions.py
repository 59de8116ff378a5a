"""DeepSpeed's compiled ops, built once at setup instead of in the user's first run.

On CPU, DeepSpeed compiles its `deepspeed_shm_comm` op with g++ the first time a worker starts
(about a minute on 2 cores), into a cache shared by every environment of the user (and rebuilt
whenever another torch or DeepSpeed used it). `scripts/setup.sh` (and the image) builds it into the
environment's own folder, `<sys.prefix>/torch_extensions`; every worker uses that folder when it
exists. On a GPU the op is not used and nothing is built.

    python -m orchestrator.train.extensions     # build (what setup runs)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    return Path(sys.prefix) / "torch_extensions"


def use_prebuilt() -> None:
    """Point torch's extension loader at this environment's prebuilt ops (unless the user chose a folder)."""
    folder = extensions_dir()
    if folder.is_dir():
        os.environ.setdefault(ENV, str(folder))


def build() -> str:
    folder = extensions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    t0 = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op  # (deepspeed: only when building)

    op = build_shm_op()
    if op is None:
        return "setup: no DeepSpeed op to prebuild for this accelerator"
    return f"setup: DeepSpeed's shm_comm op ready in {folder} ({time.perf_counter() - t0:.0f} s)"


if __name__ == "__main__":
    print(build())
