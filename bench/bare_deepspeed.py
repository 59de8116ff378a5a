"""The bare side of bench/overhead.py: the same model, DeepSpeed config and batch as an `orch` job,
trained by a plain loop under the `deepspeed` launcher (no Ray, no orch runtime), on random tokens.

    deepspeed --num_gpus 2 bench/bare_deepspeed.py -- OVERRIDES...     (bench/overhead.py runs it)

It composes the job's config with orch's own config code (so model, ZeRO stage, batch, optimizer,
gradient clipping and the learning-rate schedule are the job's) and builds the model through the
model registry; nothing else of orch runs. Rank 0 prints one JSON line: process start, the time of
every step, and the tokens per step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T_IMPORT = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # (after DS_ACCELERATOR)
    from torch.optim.lr_scheduler import LambdaLR

    from model.registry import family_of
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.train.deepspeed_config import deepspeed_config, lr_factor
    from orchestrator.train.extensions import use_prebuilt

    use_prebuilt()
    (job,) = resolve_jobs(compose_root(overrides))
    tr = job.trainer
    torch.set_num_threads(tr.threads_per_worker)
    deepspeed.init_distributed(dist_backend=job.cluster.backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    t_init = time.time()
    torch.manual_seed(tr.seed)
    model = family_of(job.model).build(job.model)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": tr.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    schedule = lambda opt: LambdaLR(opt, lambda s: lr_factor(s, max_steps=tr.max_steps, warmup_steps=tr.warmup_steps,
                                                             lr=tr.lr, min_lr=tr.min_lr))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(job, world), lr_scheduler=schedule)
    t_engine = time.time()
    device = engine.device
    accum = job.gradient_accumulation_steps(world)
    gen = torch.Generator().manual_seed(tr.seed + rank)
    T, V = job.data.seq_len, job.model.vocab_size

    def batch():
        x = torch.randint(0, V, (tr.micro_batch_size, T + 1), generator=gen)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    times = []
    for _ in range(tr.max_steps):
        for _ in range(accum):
            x, y = batch()
            _, loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
        times.append(time.time())
    if rank == 0:
        print("BARE " + json.dumps({"process_start": psutil.Process().create_time(), "imported": T_IMPORT,
                                    "dist_init": t_init, "engine": t_engine, "step_times": times,
                                    "tokens_per_step": tr.global_batch_size * T, "loss": float(loss)}), flush=True)


if __name__ == "__main__":
    main()
