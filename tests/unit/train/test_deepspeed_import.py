"""DeepSpeed imported the cheap way in a new worker: its Muon module without TorchInductor."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.train.extensions import _compile_on_first_call


def test_deepspeed_imported_without_inductor_and_torch_compile_restored():
    code = (
        "import sys, torch; real = torch.compile\n"
        "from orchestrator.train.extensions import import_deepspeed, MUON\n"
        "import_deepspeed()\n"
        "assert MUON in sys.modules and hasattr(sys.modules[MUON], 'MuonWithAuxAdam')\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'TorchInductor imported'\n"
        "assert torch.compile is real\n"
        "torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())\n"
        "from deepspeed.runtime.zero.utils import is_zero_supported_optimizer\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'TorchInductor imported later'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_kernel_compiles_on_its_first_call_only_with_its_options():
    calls = []

    def compile_(fn, **options):
        calls.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    def double(x):
        return 2 * x

    def triple(x):
        return 3 * x

    double = _compile_on_first_call(compile_, double)  # @torch.compile
    with_options = _compile_on_first_call(compile_, mode="max-autotune")(triple)  # @torch.compile(mode=...)
    assert calls == []  # nothing compiled at decoration
    assert double(2) == ("compiled", 4) and double(3) == ("compiled", 6)
    assert with_options(1) == ("compiled", 3)
    assert calls == [{}, {"mode": "max-autotune"}]  # once each, with the decorator's options
    assert double.__name__ == "double"
