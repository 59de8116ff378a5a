"""A worker's optimizer steps without importing TorchDynamo (orchestrator.train.nodynamo), with the
same losses, to the bit, as torch's own wrappers give."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ENGINE = """
import json, os, sys, tempfile
if sys.argv[1] == "dynamo-first":
    import torch._dynamo  # (as a user's torch.compile would): torch's own wrappers from then on
import torch
from orchestrator.train.extensions import import_deepspeed

ds = import_deepspeed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
          "zero_optimization": {"stage": int(sys.argv[2])}, "steps_per_print": 10**9}
schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
engine, *_ = ds.initialize(model=model, model_parameters=model.parameters(), config=config, lr_scheduler=schedule)
x, y = torch.randn(4, 16), torch.randn(4, 1)
losses = []
for step in range(6):
    if step == 3:  # through a checkpoint: the optimizer's state_dict / load_state_dict
        folder = tempfile.mkdtemp()
        engine.save_checkpoint(folder, tag="t")
        engine.load_checkpoint(folder, tag="t")
    loss = ((engine(x) - y) ** 2).mean()
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print(json.dumps({"losses": losses, "dynamo": "torch._dynamo" in sys.modules}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, stage: int) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", ENGINE, mode, str(stage)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_zero_engine_trains_without_torchdynamo_and_with_the_same_losses():
    plain, torchs = _run("plain", 2), _run("dynamo-first", 2)
    assert not plain["dynamo"]  # AdamW's constructor, step, zero_grad, state_dict, load: none imported it
    assert torchs["dynamo"]
    assert plain["losses"] == torchs["losses"]  # the same update, to the bit (through a checkpoint too)
    assert plain["losses"][-1] < plain["losses"][0]


def test_after_torchdynamo_is_imported_the_step_is_torchs_own_again():
    code = (
        "import sys, torch\n"
        "from orchestrator.train.nodynamo import defer_dynamo, plain_steps\n"
        "defer_dynamo(); plain_steps()\n"
        "p = torch.nn.Parameter(torch.ones(2))\n"
        "opt = torch.optim.AdamW([p], lr=0.1)\n"
        "p.grad = torch.ones(2); opt.step()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "import torch._dynamo\n"
        "p.grad = torch.ones(2); opt.step(); opt.zero_grad()\n"  # torch's wrappers: they need dynamo, now there
        "from orchestrator.train.nodynamo import _CACHE\n"
        "fn = torch.optim.Optimizer.zero_grad.__wrapped__\n"
        "assert getattr(fn, _CACHE).__name__ != 'until_dynamo', 'the real disabled form is cached now'\n"
        "print(p.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
