"""DeepSpeed's compiled ops, built once at setup instead of in the user's first run; and DeepSpeed
imported without compiling kernels orch never calls, with torch's optimizers kept from importing
TorchDynamo (`import_deepspeed`; `orchestrator.train.nodynamo`).

On CPU, DeepSpeed compiles its `deepspeed_shm_comm` op with g++ the first time a worker starts
(30-60 s on 2 cores). torch's default cache (`~/.cache/torch_extensions`) is shared by every
environment of the user, so another torch or DeepSpeed that used it last means a rebuild.
`scripts/setup.sh` and the images build it into the environment's own folder,
`<sys.prefix>/torch_extensions`, and every worker uses that folder (a wheel installed without the
build step builds there once, at its first run, if the environment is writable).

The build is driven by `ninja`, and two ninja versions invalidate each other's build log (1.11
writes MurmurHash command hashes, 1.12+ another hash): a worker that found the system's ninja on
its PATH while setup used the environment's would compile the op again, and the next process back.
So every build and every load here runs the environment's own ninja (the `ninja` wheel DeepSpeed
depends on) when it has one. On a GPU the op is not used and nothing is built.

    python -m orchestrator.train.extensions     # build (what setup and the images run)
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import time
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    return Path(sys.prefix) / "torch_extensions"


def _own_ninja_first() -> None:
    """Put this environment's scripts folder (its `ninja`) first on PATH, as activating it would."""
    scripts = Path(sys.executable).parent
    if (scripts / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[:1] != [str(scripts)]:
            os.environ["PATH"] = os.pathsep.join(p for p in (str(scripts), path) if p)


def use_prebuilt() -> None:
    """Point torch's extension loader at this environment's ops folder (unless the user chose a
    folder), built by setup, or at the first run when the environment is writable."""
    folder = extensions_dir()
    if not folder.is_dir():
        try:
            folder.mkdir()
        except OSError:
            return  # a read-only environment without a build: torch's default cache
    os.environ.setdefault(ENV, str(folder))
    _own_ninja_first()


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

    from orchestrator.train.nodynamo import defer_dynamo, plain_steps

    with _muon_lock:
        if MUON not in sys.modules:  # (once per process)
            defer_dynamo()  # (torch's optimizers: no TorchDynamo import where nothing compiles)
            plain_steps()
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


def build() -> str:
    folder = extensions_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    _own_ninja_first()
    t0 = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op  # (deepspeed: only when building)

    op = build_shm_op()
    if op is None:
        return "setup: no DeepSpeed op to prebuild for this accelerator"
    return f"setup: DeepSpeed's shm_comm op ready in {folder} ({time.perf_counter() - t0:.0f} s)"


if __name__ == "__main__":
    print(build())
