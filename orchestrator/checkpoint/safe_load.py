"""Checkpoints are loaded as data, never as code: every `torch.load` of a checkpoint file, ours and
DeepSpeed's, runs with `weights_only=True` (a checkpoint from a store is untrusted input: a pickle
may run any code when it is loaded).

Besides tensors and plain containers, DeepSpeed's files hold a few of its own small classes (the
loss scaler, the ZeRO stage enum, fragment addresses in optimizer states); those, and only those,
are allowed. DeepSpeed itself asks for `weights_only=False`, so its loads run inside
`weights_only_loads()`, which makes every `torch.load` meanwhile a weights-only one;
`python -m orchestrator.checkpoint.safe_load MODULE ARGS` runs a DeepSpeed tool the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import runpy
import sys
from typing import Any

import torch

from orchestrator.errors import CheckpointError

# DeepSpeed classes its checkpoint files pickle (module, names): allowed when they exist.
_DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler", "LossScaleProfile", "LossScaleConfig")),
    ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
    ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
)


def allowed_classes() -> list[type]:
    out = []
    for module, names in _DEEPSPEED_CLASSES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return out


def load(f, map_location: Any = None, mmap: bool | None = None, **kwargs) -> Any:
    """`torch.load` of a checkpoint file, weights only; anything else in it is a CheckpointError."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # weights_only has its own unpickler
    with torch.serialization.safe_globals(allowed_classes()):
        try:
            return torch.serialization.load(f, map_location=map_location, mmap=mmap, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
            raise CheckpointError(f"{f} holds pickled objects besides weights ({detail}); orch loads checkpoints with "
                                  f"weights_only=True and runs no code from them: use a checkpoint orch or "
                                  f"DeepSpeed wrote") from None


@contextlib.contextmanager
def weights_only_loads():
    """Within this block every `torch.load` (DeepSpeed's too, whatever it asks for) is `load`."""
    original = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def main(argv: list[str]) -> None:
    """`python -m orchestrator.checkpoint.safe_load MODULE ARGS...`: run MODULE as a script with
    every `torch.load` weights-only (e.g. deepspeed.checkpoint.ds_to_universal)."""
    module, *args = argv
    sys.argv = [module, *args]
    with weights_only_loads():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
