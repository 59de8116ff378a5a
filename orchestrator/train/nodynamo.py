"""torch's optimizers without TorchDynamo in a worker that never compiles.

torch marks its optimizers' methods and update functions as not to be traced by TorchDynamo, and
each mark imports `torch._dynamo` (with sympy and torch.fx's symbolic shapes) at its first call:
`Optimizer.add_param_group` (so every optimizer's constructor), `zero_grad`, `state_dict`, the
functional AdamW, and the `step` wrapper, which also calls `torch._dynamo.graph_break()`. That is
about 1.2 s of CPU in every new training worker (a quarter of what a small job's worker spends
before its first step, measured in bench/RESULTS.md), for marks that only matter while TorchDynamo
traces, which it cannot do before it is imported.

`defer_dynamo()` gives each marked function of `torch.optim` the cached form torch would give it,
one that calls it directly while `torch._dynamo` is not imported and becomes torch's own disabled
form at the first call after it is. `plain_steps()` has each optimizer's `step` do what torch's
wrapper does outside TorchDynamo (no autograd recording for a non-differentiable optimizer) while
`torch._dynamo` is not imported, and run torch's own wrapper once it is (a model compiled by the
user). The update itself is torch's, unchanged: the losses are the same to the bit
(tests/unit/train/test_nodynamo.py). ZeRO-3 imports TorchDynamo anyway (DeepSpeed registers its
parameter hooks with `torch.compiler.disable`): there this saves nothing and changes nothing.
"""

from __future__ import annotations

import functools
import inspect
import sys

_CACHE = "__dynamo_disable"  # where torch._disable_dynamo keeps a function's disabled form
DYNAMO = "torch._dynamo"


def defer_dynamo() -> None:
    """Seed the disabled-form cache of every `torch._disable_dynamo`-wrapped function in torch.optim
    (methods of its classes, and the functions its maybe-fallback wrappers hold)."""
    import torch

    if DYNAMO in sys.modules:
        return
    inner = torch._disable_dynamo(lambda: None).__code__  # the wrapper's code, shared by every wrapped function
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if not inspect.isfunction(obj) or id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        cells = _closure(obj)
        if obj.__code__ is inner:
            _seed(cells["fn"], cells.get("recursive", True))
            return
        for value in cells.values():
            visit(value, depth + 1)

    for name, module in list(sys.modules.items()):
        if name.startswith("torch.optim") and module is not None:
            for value in list(vars(module).values()):
                for member in list(vars(value).values()) if isinstance(value, type) else [value]:
                    visit(member, 0)


def plain_steps() -> None:
    """Each torch.optim optimizer's `step` runs under what torch's `_use_grad` wrapper does outside
    TorchDynamo (autograd off unless the optimizer is differentiable), and under that wrapper itself
    once `torch._dynamo` is imported. Its profiling and hook wrapper (and what an LR scheduler adds
    on an instance) stay as torch made them."""
    import torch

    if DYNAMO in sys.modules:
        return
    for cls in list(vars(torch.optim).values()):
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or "step" not in vars(cls):
            continue
        step = vars(cls)["step"]
        if getattr(step, "hooked", False):  # an instance was built: the hook wrapper holds `_use_grad`
            cells = dict(zip(step.__code__.co_freevars, step.__closure__ or ()))
            cell = cells.get("func")
            if cell is not None and _is_use_grad(cell.cell_contents):
                cell.cell_contents = _plain(cell.cell_contents)
        elif _is_use_grad(step):
            cls.step = _plain(step)


def _is_use_grad(fn) -> bool:
    return inspect.isfunction(fn) and fn.__code__.co_name == "_use_grad" and "func" in fn.__code__.co_freevars


def _plain(use_grad):
    import torch

    func = _closure(use_grad)["func"]

    @functools.wraps(use_grad)
    def plain(*args, **kwargs):
        if DYNAMO in sys.modules:  # compiled code may be about: torch's own wrapper
            return use_grad(*args, **kwargs)
        with torch.set_grad_enabled(bool(args[0].defaults["differentiable"])):
            return func(*args, **kwargs)

    return plain


def _closure(fn) -> dict:
    cells = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # not bound yet
            pass
    return cells


def _seed(fn, recursive: bool) -> None:
    if getattr(fn, _CACHE, None) is not None:
        return

    @functools.wraps(fn)
    def until_dynamo(*args, **kwargs):
        if DYNAMO not in sys.modules:  # nothing can be tracing: call it as it is
            return fn(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(fn, recursive, wrapping=False)  # what torch caches at a first call
        setattr(fn, _CACHE, disabled)
        return disabled(*args, **kwargs)

    setattr(fn, _CACHE, until_dynamo)
