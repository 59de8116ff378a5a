"""DeepSpeed and the training loop, imported in each new worker while Ray Train sets it up.

A worker process imports torch, DeepSpeed and the loop (2-3 s of CPU) before its engine can be
built. Ray Train spends about as long again setting the new worker up (train context, process group
rendezvous with the other ranks, the controller's calls), much of it waiting. A callback of
`orchestrator.execution.ray_train` asks each new worker to start these imports in a background thread as soon
as its process is up; the train function then finds them done (or finishes them). A failed import
here is ignored: the train function imports the same modules and reports what fails. CPU workers
only: on a GPU, DeepSpeed's import may initialise CUDA, which must wait until Ray Train has set the
worker's CUDA_VISIBLE_DEVICES and device.

Nothing heavy is imported by this module itself: Ray Train's controller unpickles a reference to it.
"""

from __future__ import annotations

import os
import threading


def start_imports(accelerator: str) -> None:
    """Runs on the worker (Ray Train's `execute`), returns at once."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator)  # DeepSpeed picks its accelerator at import
    threading.Thread(target=_imports, name="orch-warm-imports", daemon=True).start()


def _imports() -> None:
    try:
        from orchestrator.train.extensions import import_deepspeed

        import_deepspeed()

        import orchestrator.train.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - imported again by the train function, which reports it
        pass
