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

import functools
import importlib
import os
import sys
import threading


def start_imports(accelerator: str) -> None:
    """Runs on the worker (Ray Train's `execute`), returns at once."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator)  # DeepSpeed picks its accelerator at import
    threading.Thread(target=_imports, name="orch-warm-imports", daemon=True).start()


def _imports() -> None:
    try:
        import_deepspeed()

        import orchestrator.train.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - imported again by the train function, which reports it
        pass


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
_muon_lock = threading.Lock()


def import_deepspeed():
    """DeepSpeed, with its Muon optimizer module imported the cheap way. DeepSpeed 0.19 imports that
    module whenever it builds an engine or reduces gradients (to ask whether the optimizer is Muon),
    and the module `torch.compile`s its kernels when imported: that imports TorchInductor, about
    1.2 s of CPU in every new worker, for kernels that only a Muon optimizer ever calls (orch's is
    AdamW). Imported here with `torch.compile` deferred to each kernel's first call, the module is
    the same; its kernels compile when (if ever) called, as torch.compile's own do on first call."""
    import deepspeed

    with _muon_lock:
        if MUON not in sys.modules:
            import torch

            real = torch.compile
            torch.compile = functools.partial(_compile_on_first_call, real)
            try:
                importlib.import_module(MUON)
            finally:
                torch.compile = real
    return deepspeed


def _compile_on_first_call(compile_, model=None, **options):
    if model is None:  # decorator with options: @torch.compile(...)
        return lambda fn: _compile_on_first_call(compile_, fn, **options)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = compile_(model, **options)
        return compiled(*args, **kwargs)

    return call
