"""The training loop that runs on every Ray Train worker: the only place that knows DeepSpeed.

Each worker builds the single-device GPT from `model/`, wraps it in a DeepSpeed ZeRO engine,
reads its slice of every global batch from the store, and checkpoints through the Checkpointer.
Rank 0 also tracks the run in W&B and reports progress to the controller.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from orchestrator.config.compose import job_config_from_dict
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.data.manifest import load_manifest
from orchestrator.data.order import eval_batch, micro_batches, rank_slice
from orchestrator.data.reader import SplitReader
from orchestrator.storage import join_uri
from orchestrator.workspace import local_scratch, open_job_store

log = logging.getLogger("orchestrator.train")


@dataclass
class TrainerState:
    """What, besides DeepSpeed's own state, a resume needs (saved in every checkpoint)."""

    step: int = 0  # optimizer steps done
    cursor: int = 0  # samples of the global order consumed (the data reader's whole state)
    tokens_seen: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    world_size: int = 0
    wandb_run_id: str | None = None
    zero_stage: int | None = None
    config_hash: str | None = None  # of what decides the loss curve: model, data, trainer (see config_hash)
    extra: dict = field(default_factory=dict)


def config_hash(job: JobConfig) -> str:
    """sha256 of the settings a resume must share with its checkpoint to continue the same curve
    (model, data, trainer); worker count, ZeRO stage, cluster and storage may change."""
    import hashlib
    import json

    keep = {k: to_dict(job)[k] for k in ("model", "data", "trainer")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """What the launcher hands each worker besides the job's frozen config."""

    job_id: str
    run_uri: str  # <storage.root>/runs/<job id>
    group: str  # W&B group: the pipeline id
    init_from: str | None  # export URI of the dependency whose weights this job starts from
    reporter: object | None  # Ray actor handle receiving rank 0's progress (or None)
    wandb_root: str | None = None  # where W&B writes (None: node-local scratch)


def train_worker(args: dict) -> None:
    """Entry point of each Ray Train worker (`train_loop_per_worker`)."""
    job = job_config_from_dict(args["job"])
    spec = RunSpec(**args["spec"])
    # DeepSpeed picks its accelerator when first imported: decide it from the config, never assume.
    os.environ["DS_ACCELERATOR"] = job.cluster.accelerator
    import torch

    torch.set_num_threads(job.trainer.threads_per_worker)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _Trainer(job, spec).run()


class _Trainer:
    def __init__(self, job: JobConfig, spec: RunSpec):
        import ray.train

        ctx = ray.train.get_context()
        self.job, self.spec = job, spec
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.store = open_job_store(job)
        self.scratch = local_scratch(spec.job_id)
        self._closers: list = []  # run at the end of run(), in reverse
        self._control = None  # rank 0's pending question to the runner: stop?

    # ------------------------------------------------------------------------------ building
    def _build_engine(self, load_universal: bool = False, fresh_weights: bool = True):
        import deepspeed
        import torch
        from torch.optim.lr_scheduler import LambdaLR

        from model.gpt import GPT
        from orchestrator.train.deepspeed_config import deepspeed_config, lr_factor

        job = self.job
        torch.manual_seed(job.trainer.seed)
        model = GPT(job.model.gpt_config())
        if self.spec.init_from and fresh_weights:  # (a resumed job's weights come from its checkpoint)
            model.load_state_dict(self._initial_weights(self.spec.init_from))
            log.info("initialised from %s", self.spec.init_from)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": job.trainer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        tr = job.trainer

        def schedule(optimizer):
            return LambdaLR(optimizer, lambda s: lr_factor(s, max_steps=tr.max_steps, warmup_steps=tr.warmup_steps, lr=tr.lr, min_lr=tr.min_lr))

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                               config=deepspeed_config(job, self.world, load_universal=load_universal),
                                               lr_scheduler=schedule)
        return engine

    def _initial_weights(self, init_from: str) -> dict:
        """fp32 weights to start from: an orch export (the pipeline's hand-off), a checkpoint or an HF folder."""
        from orchestrator import artifacts

        return artifacts.load(artifacts.resolve(init_from, endpoint_url=self.job.storage.endpoint_url)).state_dict

    def _reset_weight_decay(self, engine) -> None:
        """Repair two things DeepSpeed's ZeRO-3 universal loader (0.19) gets wrong for an optimizer
        with several parameter groups: it copies group 0's hyperparameters onto every group (so
        restore each group's weight decay as configured: group 0 matrices, group 1 biases and norms),
        and it gives every group's state one shared `step` tensor (which torch's AdamW then advances
        once per group per step: give each its own)."""
        import torch

        groups = engine.optimizer.param_groups
        if len(groups) == 2:
            groups[0]["weight_decay"], groups[1]["weight_decay"] = self.job.trainer.weight_decay, 0.0
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    # ------------------------------------------------------------------------------ helpers
    def _device_name(self) -> str | None:
        import torch

        if self.job.cluster.accelerator == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return None

    def _sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a small vector over all ranks (one all-reduce)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _mean(self, values: list[float]) -> float:
        """Mean of a per-rank list of floats over all ranks."""
        total, n = self._sum([sum(values), len(values)])
        return total / n

    def _stop_requested(self) -> bool:
        """Rank 0 only: whether the runner asked for a stop (polled without waiting: the answer to
        the previous step's question)."""
        if self.rank != 0 or self.spec.reporter is None:
            return False
        import ray

        if self._control is None:
            self._control = self.spec.reporter.control.remote()
        ready, _ = ray.wait([self._control], timeout=0)
        if not ready:
            return False
        try:
            answer = ray.get(self._control)
        except Exception:  # noqa: BLE001 - the runner is gone: keep training, Ray Train decides
            answer = None
        self._control = None
        return answer == "stop"

    def _report(self, **fields) -> None:
        if self.rank == 0 and self.spec.reporter is not None:
            self.spec.reporter.update.remote(fields)

    def _evaluate(self, engine, val: SplitReader) -> float:
        import torch

        tr = self.job.trainer
        engine.eval()
        losses = []
        with torch.no_grad():
            for k in range(tr.eval_batches):
                mine = rank_slice(eval_batch(val.num_samples, tr.global_batch_size, k), self.rank, self.world)
                for mb in micro_batches(mine, tr.micro_batch_size):
                    x, y = val.batch(mb)
                    _, loss = engine(x.to(self.device), y.to(self.device))
                    losses.append(float(loss))
        engine.train()
        return self._mean(losses)

    # --------------------------------------------------------------------------------- loop
    def run(self) -> None:
        from deepspeed.accelerator import get_accelerator

        from orchestrator.checkpoint.checkpointer import Checkpointer
        from orchestrator.tracking import make_tracker

        job = self.job
        self._report(event="attempt", world_size=self.world)
        self.device = get_accelerator().current_device_name()
        manifest = load_manifest(self.store, job.data.uri)
        cache = self.scratch / "cache" / f"rank-{self.rank}"  # a cache folder belongs to one process
        train = SplitReader.from_config(self.store, job.data, manifest, "train", cache)
        val = SplitReader.from_config(self.store, job.data, manifest, "val", cache=train.cache)  # one limit for both

        import json

        from orchestrator.constants import MODEL_CONFIG, TOKENIZER

        tokenizer = self.store.get(join_uri(job.data.uri, manifest.tokenizer_key))
        ckpt = Checkpointer(
            self.store, self.spec.run_uri, self.scratch, self.rank, self.world, job.checkpoint, job.deepspeed.stage,
            rank0_files={TOKENIZER: tokenizer, MODEL_CONFIG: json.dumps(to_dict(job.model), indent=1).encode()},
            on_commit=lambda ref: self._report(checkpoint=ref.uri, checkpoint_step=ref.step),
            resume_from=job.resume_from,
        )
        # Which checkpoint to resume from decides how the engine is built: one saved at another
        # world size or ZeRO stage loads as a DeepSpeed universal checkpoint.
        restore = ckpt.find_restore()
        engine = self._build_engine(load_universal=bool(restore and restore.universal),
                                    fresh_weights=restore is None)
        state = TrainerState()
        if restore is not None:
            state = TrainerState(**ckpt.load(engine, restore))
            self._reset_weight_decay(engine)
            if not restore.ref.uri.startswith(self.spec.run_uri + "/"):
                state.wandb_run_id = None  # another run's state: this job logs to its own W&B run
            self._report(event="resumed", resumed_step=state.step, resumed_from=restore.ref.uri,
                         skipped=[r.uri for r in restore.skipped], universal=restore.universal)
        else:
            self._report(event="ready")
        state.world_size = self.world
        state.zero_stage = job.deepspeed.stage
        digest = config_hash(job)
        if state.config_hash and state.config_hash != digest and self.rank == 0:
            log.warning("resuming a checkpoint saved with other model/data/trainer settings (config hash %s, now %s)",
                        state.config_hash, digest)
        state.config_hash = digest
        wandb_id = state.wandb_run_id or self.spec.job_id
        tracker = make_tracker(
            job.tracking, self.rank, run_id=wandb_id, name=f"{job.name}-{self.spec.job_id}", group=self.spec.group,
            job_type=job.kind, config={"job_id": self.spec.job_id, "world_size": self.world, **to_dict(job)},
            root_dir=self.spec.wandb_root or str(self.scratch),
        )
        state.wandb_run_id = wandb_id
        if self.rank == 0:
            self._report(wandb_run_id=wandb_id, wandb_dir=tracker.run_dir)
        exit_code = 1
        try:
            self._loop(engine, state, train, val, ckpt, tracker)
            exit_code = 0
        finally:
            for close in reversed(self._closers):
                close()
            train.close()  # stops the download threads (val shares train's cache)
            tracker.finish(exit_code)

    def _loop(self, engine, state: TrainerState, train: SplitReader, val: SplitReader, ckpt, tracker) -> None:
        job, tr = self.job, self.job.trainer
        from model.gpt import flops_per_token
        from orchestrator.train.mfu import mfu, peak_flops

        tokens_per_step = tr.global_batch_size * job.data.seq_len
        model_flops = flops_per_token(job.model.gpt_config(), job.data.seq_len)
        peak = peak_flops(self._device_name(), job.cluster.peak_flops_per_device)
        from orchestrator.checkpoint.interval import CheckpointSchedule, parse_interval

        schedule = CheckpointSchedule(parse_interval(job.checkpoint.interval), job.checkpoint.mtbf_hours * 3600)
        last_saved = state.step if state.step else None
        t_saved = time.perf_counter()
        blocking: list[float] = []
        order = train.order(tr.seed, job.data.shuffle_window, tr.global_batch_size)
        data_wait, shard_wait_at, steps_since_log = 0.0, train.wait_s, 0
        t_last = time.perf_counter()
        # The next step's batch is assembled on a thread while this step computes (torch releases
        # the GIL in its kernels); the loop only waits when it is not ready yet.
        from concurrent.futures import ThreadPoolExecutor

        assembler = ThreadPoolExecutor(1, thread_name_prefix="orch-batch")
        self._closers.append(lambda: assembler.shutdown(wait=True, cancel_futures=True))

        def read(cursor: int):
            return train.read_rank_share(order, cursor, self.rank, self.world, tr.micro_batch_size)

        upcoming = assembler.submit(read, state.cursor)
        while state.step < tr.max_steps:
            t0 = time.perf_counter()
            micro = upcoming.result()
            data_wait += time.perf_counter() - t0
            if state.step + 1 < tr.max_steps:
                upcoming = assembler.submit(read, state.cursor + tr.global_batch_size)
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step)
            losses = []
            for x, y in micro:
                _, loss = engine(x.to(self.device), y.to(self.device))
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
            state.step += 1
            state.cursor += tr.global_batch_size
            state.tokens_seen += tokens_per_step
            steps_since_log += 1
            # One all-reduce per step carries the loss and, for time-based intervals, whether any
            # rank's clock says a checkpoint is due (so every rank decides the same).
            due = schedule.due(state.step, time.perf_counter() - t_saved) and state.step < tr.max_steps
            stop = self._stop_requested() and state.step < tr.max_steps  # rank 0 asks the job's runner
            loss_sum, loss_n, due_votes, stop_votes = self._sum([sum(losses), len(losses), float(due), float(stop)])
            loss_mean = loss_sum / loss_n
            if state.first_loss is None:
                state.first_loss = loss_mean
            state.last_loss = loss_mean
            if state.step % tr.log_interval == 0 or state.step == tr.max_steps or state.step == 1:
                now = time.perf_counter()
                step_time = (now - t_last) / steps_since_log
                tokens_per_s = tokens_per_step / step_time
                metrics = {"train/loss": loss_mean, "train/lr": lr, "train/tokens": state.tokens_seen,
                           "perf/step_time_s": step_time, "perf/data_wait_s": data_wait / steps_since_log,
                           "perf/data_wait_fraction": data_wait / (now - t_last),
                           "perf/shard_wait_s": (train.wait_s - shard_wait_at) / steps_since_log, "perf/tokens_per_s": tokens_per_s,
                           "perf/model_tflops_per_device": tokens_per_s * model_flops / self.world / 1e12}
                utilisation = mfu(tokens_per_s, model_flops, self.world, peak)
                if utilisation is not None:
                    metrics["perf/mfu"] = utilisation
                tracker.log(metrics, step=state.step)
                self._report(step=state.step, loss=loss_mean, first_loss=state.first_loss, tokens=state.tokens_seen)
                t_last, data_wait, steps_since_log, shard_wait_at = now, 0.0, 0, train.wait_s
            if tr.eval_interval and state.step % tr.eval_interval == 0 and state.step < tr.max_steps:
                eval_loss = self._evaluate(engine, val)
                tracker.log({"eval/loss": eval_loss}, step=state.step)
                self._report(eval_loss=eval_loss)
            if due_votes > 0:
                blocked = ckpt.save(engine, state.step, _as_dict(state))
                blocking.append(blocked)
                schedule.measured(blocked)
                tracker.log({"ckpt/blocking_s": blocked, "ckpt/previous_upload_s": ckpt.last_upload_s,
                             "ckpt/interval_s": schedule.seconds}, step=state.step)
                if schedule.reason and self.rank == 0:
                    log.info(schedule.reason)
                self._report(ckpt_blocking_s=blocked)
                last_saved, t_saved = state.step, time.perf_counter()
            if stop_votes > 0:
                # A requested stop (cancel, or a new worker count): commit this step and leave; the
                # runner restarts from it or ends the job.
                if last_saved != state.step:
                    ckpt.save(engine, state.step, _as_dict(state))
                ckpt.wait()
                self._report(event="stopped", stopped_step=state.step)
                import torch.distributed as dist

                dist.barrier()
                return

        eval_loss = self._evaluate(engine, val)
        tracker.log({"eval/loss": eval_loss}, step=state.step)
        tracker.summary({"eval/loss": eval_loss, "first_loss": state.first_loss})
        state.eval_loss = eval_loss
        if last_saved != state.step:  # the final checkpoint; the launcher exports it after the group ends
            blocking.append(ckpt.save(engine, state.step, _as_dict(state)))
        ckpt.wait()  # every upload done and committed before the worker group reports success
        if blocking:
            tracker.summary({"ckpt/blocking_s_mean": sum(blocking) / len(blocking), "ckpt/saves": len(blocking)})
        self._report(eval_loss=eval_loss)
        import torch.distributed as dist

        dist.barrier()  # rank 0's commit is in the store before any rank leaves


def _as_dict(state: TrainerState) -> dict:
    from dataclasses import asdict

    return asdict(state)

