"""The training loop that runs on every Ray Train worker: the only place that knows DeepSpeed.

Each worker builds the job's single-device model from `model/` (through its family's registry
entry), wraps it in a DeepSpeed ZeRO engine, reads its slice of every global batch from the store,
and checkpoints through the Checkpointer. Rank 0 also appends every logged row to the job's
metrics history in the store (which the job's runner feeds to W&B) and sends typed reports to the
job's runner (`orchestrator.train.reports`), which tells the controller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field, fields

import ray
import ray.train
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from model.registry import family_of
from orchestrator import artifacts
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.constants import MODEL_CONFIG, TOKENIZER
from orchestrator.data.manifest import load_manifest
from orchestrator.data.order import eval_batch, micro_batches, rank_slice
from orchestrator.data.reader import SplitReader
from orchestrator.joblogs import rank_logs_uri
from orchestrator.storage import join_uri
from orchestrator.train.cadence import CheckpointCadence
from orchestrator.train.deepspeed_config import deepspeed_config, lr_factor
from orchestrator.train.extensions import import_deepspeed, use_prebuilt
from orchestrator.train.heartbeat import CHECKPOINT, COLLECTIVE, DATA, EVAL, FORWARD_BACKWARD, OPTIMIZER_STEP, Heartbeat
from orchestrator.train.history import HistoryWriter, NullHistory
from orchestrator.train.metrics import IntervalMetrics, grad_norm, system_metrics
from orchestrator.train.mfu import peak_flops
from orchestrator.train.output import WorkerOutput
from orchestrator.train.prefetch import BatchPrefetcher
from orchestrator.train.qa_eval import QAScore, ask, heldout_questions, rank_share
from orchestrator.train.reports import (
    REPORTS,
    CheckpointCommitted,
    EngineReady,
    Evaluated,
    Progress,
    Report,
    StragglerFound,
)
from orchestrator.train.stragglers import MAX_RANK_COLUMNS, ForwardTimer, StragglerDetector
from orchestrator.train.vote import all_mean, all_sum, step_vote
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
    qa_correct: int | None = None  # held-out questions answered exactly (orchestrator.train.qa_eval)
    qa_questions: int | None = None  # held-out questions asked (None: the data has none)
    world_size: int = 0
    zero_stage: int | None = None
    config_hash: str | None = None  # of what decides the loss curve: model, data, trainer (see config_hash)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_saved(cls, saved: dict) -> TrainerState:
        """The state a checkpoint saved; the keys of fields since removed (`wandb_run_id`) are
        dropped, so a checkpoint written by an earlier version still resumes."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


WATCHDOG_KEYS = ("stall_timeout_s", "stall_floor_s", "stall_factor", "heartbeat_interval_s", "collective_timeout_s",
                 "max_restarts_per_class", "same_failure_limit", "straggler_factor", "straggler_window")


def config_hash(job: JobConfig) -> str:
    """sha256 of the settings a resume must share with its checkpoint to continue the same curve
    (model, data, trainer); worker count, ZeRO stage, cluster and storage may change."""
    keep = {k: to_dict(job)[k] for k in ("model", "data", "trainer")}
    for key in WATCHDOG_KEYS:  # (how hangs are watched and failures retried does not change the curve)
        keep["trainer"].pop(key, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """What the job's runner hands each worker besides the job's config (both in Ray Train's train_loop_config)."""

    job_id: str
    run_uri: str  # <storage.root>/runs/<job id>
    init_from: str | None  # export URI of the dependency whose weights this job starts from
    reporter: object | None  # the job's runner actor, to which rank 0 sends its reports (or None)


def train_worker(args: dict) -> None:
    """Entry point of each Ray Train worker (`train_loop_per_worker`); `args` is Ray Train's
    train_loop_config: {"job": JobConfig, "spec": RunSpec}, as the runner built them (Ray pickles
    them: no conversion on the way). What the worker prints goes to the run's folder in the store as
    well (`orch logs`), its traceback first if it fails."""
    run_worker(args, Trainer)


def run_worker(args: dict, worker_class: type) -> None:
    """A worker of `worker_class` (this module's trainer, or orchestrator.train.evaluate's) run with
    its output kept in the store and its accelerator, ops and threads set up."""
    entered = time.time()
    job, spec = args["job"], args["spec"]
    rank = ray.train.get_context().get_world_rank()
    output = WorkerOutput(local_scratch(spec.job_id) / "logs" / f"rank-{rank}-{os.getpid()}.log").start()
    try:
        group = _attempt_name()
        output.upload_to(open_job_store(job), rank_logs_uri(spec.run_uri, group, rank))
        # DeepSpeed picks its accelerator when first imported: decide it from the config, never assume.
        os.environ["DS_ACCELERATOR"] = job.cluster.accelerator
        use_prebuilt()  # DeepSpeed's ops built at setup, not compiled in this worker
        torch.set_num_threads(job.trainer.threads_per_worker)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        worker_class(job, spec, entered, group).run()
    except Exception:
        output.failed(f"rank {rank} failed:\n{traceback.format_exc()}")
        raise
    finally:
        output.close()


def _attempt_name() -> str:
    """This worker group's name in the logs, the same on every rank: when its rank 0 got here (ms)."""
    name = [f"{int(time.time() * 1000):013d}"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _process_start() -> float:
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return time.time()


class Trainer:
    """One worker's training run: builds everything, runs the loop, closes everything."""

    def __init__(self, job: JobConfig, spec: RunSpec, entered: float | None = None, group: str = "0"):
        ctx = ray.train.get_context()
        # Where this attempt's start-up time goes (rank 0 records it in the history at its first step).
        self.startup = {"process_start": _process_start(), "entered": entered or time.time()}
        self.job, self.spec = job, spec
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.store = open_job_store(job)
        self.scratch = local_scratch(spec.job_id)
        self._closers: list = []  # run at the end of run(), in reverse
        self._control = None  # rank 0's pending question to the runner: stop?
        self._asked_at = float("-inf")  # when it was asked (time.monotonic)
        self.history: HistoryWriter | NullHistory = NullHistory()  # rank 0's, once restored
        # this rank's step and phase, which a thread sends to the runner's watchdog (from the first step on)
        self.hb = Heartbeat.of_this_worker(spec.reporter, group, self.rank, self.world,
                                           job.trainer.heartbeat_interval_s)

    # ------------------------------------------------------------------------------ building
    def _build_engine(self, load_universal: bool = False, fresh_weights: bool = True):
        # Lazy: DeepSpeed picks its accelerator when first imported, after train_worker sets DS_ACCELERATOR.
        deepspeed = import_deepspeed()

        job = self.job
        torch.manual_seed(job.trainer.seed)
        model = family_of(job.model).build(job.model)
        if self.spec.init_from and fresh_weights:  # (a resumed job's weights come from its checkpoint)
            model.load_state_dict(self._initial_weights(self.spec.init_from))
            log.info("initialised from %s", self.spec.init_from)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": job.trainer.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        tr = job.trainer

        def schedule(optimizer):
            return LambdaLR(optimizer, lambda s: lr_factor(s, max_steps=tr.max_steps, warmup_steps=tr.warmup_steps,
                                                           lr=tr.lr, min_lr=tr.min_lr))

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                               config=deepspeed_config(job, self.world, load_universal=load_universal),
                                               lr_scheduler=schedule)
        return engine

    def _initial_weights(self, init_from: str) -> dict:
        """fp32 weights to start from: an orch export (the pipeline's hand-off), a checkpoint or an HF folder."""
        return artifacts.load(artifacts.resolve(init_from, endpoint_url=self.job.storage.endpoint_url)).state_dict

    def _reset_weight_decay(self, engine) -> None:
        """Repair two things DeepSpeed's ZeRO-3 universal loader (0.19) gets wrong for an optimizer
        with several parameter groups: it copies group 0's hyperparameters onto every group (so
        restore each group's weight decay as configured: group 0 matrices, group 1 biases and norms),
        and it gives every group's state one shared `step` tensor (which torch's AdamW then advances
        once per group per step: give each its own)."""
        groups = engine.optimizer.param_groups
        if len(groups) == 2:
            groups[0]["weight_decay"], groups[1]["weight_decay"] = self.job.trainer.weight_decay, 0.0
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def _checkpointer(self, tokenizer: bytes) -> Checkpointer:
        """The run's Checkpointer; rank 0 adds the tokenizer and model config to every checkpoint."""
        job = self.job
        return Checkpointer(
            self.store, self.spec.run_uri, self.scratch, self.rank, self.world, job.checkpoint, job.deepspeed.stage,
            rank0_files={TOKENIZER: tokenizer, MODEL_CONFIG: json.dumps(to_dict(job.model), indent=1).encode()},
            on_commit=self._committed,
            resume_from=job.resume_from,
        )

    def _committed(self, ref) -> None:
        """Rank 0, in the upload thread, once checkpoint `ref` is committed: a marker in the history,
        the history compacted up to it, and the runner told."""
        self.history.append(ref.step, events=[{"kind": "checkpoint", "uri": ref.uri}])
        self.history.compact(ref.step)
        self._report(CheckpointCommitted(uri=ref.uri, step=ref.step))

    def _restore(self, ckpt: Checkpointer) -> tuple[object, TrainerState]:
        """The engine and the trainer state: restored from the checkpoint to resume from, or fresh."""
        # Which checkpoint to resume from decides how the engine is built: one saved at another
        # world size or ZeRO stage loads as a DeepSpeed universal checkpoint.
        restore = ckpt.find_restore()
        engine = self._build_engine(load_universal=bool(restore and restore.universal),
                                    fresh_weights=restore is None)
        if restore is None:
            self._report(EngineReady())
            return engine, TrainerState()
        state = TrainerState.from_saved(ckpt.load(engine, restore))
        self._reset_weight_decay(engine)
        self._report(EngineReady(resumed_from=restore.ref.uri, step=state.step,
                                 skipped=tuple(r.uri for r in restore.skipped), universal=restore.universal))
        return engine, state

    def _stamp(self, state: TrainerState) -> None:
        """Record this attempt's world size, ZeRO stage and config hash (warning when the hash changed)."""
        state.world_size = self.world
        state.zero_stage = self.job.deepspeed.stage
        digest = config_hash(self.job)
        if state.config_hash and state.config_hash != digest and self.rank == 0:
            log.warning("resuming a checkpoint saved with other model/data/trainer settings (config hash %s, now %s)",
                        state.config_hash, digest)
        state.config_hash = digest

    def _begin_attempt(self) -> str:
        """Tell the runner this worker group started (rank 0); why it started: first, failure, resize, ..."""
        if self.rank != 0 or self.spec.reporter is None:
            return "first"
        try:
            return ray.get(self.spec.reporter.begin_attempt.remote(self.world), timeout=60)
        except Exception:  # noqa: BLE001 - the runner is gone: Ray Train decides; the history still records
            log.warning("could not tell the job's runner that a worker group started", exc_info=True)
            return "unknown"

    def _open_history(self, state: TrainerState, reason: str) -> None:
        """Rank 0: this attempt's rows go to the job's history in the store, from the step it resumed at."""
        if self.rank == 0:
            kind = {"first": "start", "failure": "restart", "relaunch": "restart"}.get(reason, reason)
            self.history = HistoryWriter(self.store, self.spec.run_uri, world_size=self.world, start_step=state.step,
                                         reason=kind, background=True)

    def _metrics(self, train: SplitReader) -> IntervalMetrics:
        """The per-interval metrics row's bookkeeping, with this model's FLOPs and this device's peak."""
        job, tr = self.job, self.job.trainer
        return IntervalMetrics(
            log_interval=tr.log_interval, max_steps=tr.max_steps,
            tokens_per_step=tr.global_batch_size * job.data.seq_len,
            flops_per_token=family_of(job.model).flops_per_token(job.model, job.data.seq_len), world_size=self.world,
            peak_flops=peak_flops(self._device_name(), job.cluster.peak_flops_per_device), shard_wait_s=train.wait_s,
        )

    def _prefetcher(self, train: SplitReader, cursor: int) -> BatchPrefetcher:
        """This rank's share of each global batch from `cursor` on, read one step ahead."""
        tr = self.job.trainer
        order = train.order(tr.seed, self.job.data.shuffle_window, tr.global_batch_size)

        def read(at: int):
            return train.read_rank_share(order, at, self.rank, self.world, tr.micro_batch_size)

        batches = BatchPrefetcher(read, cursor, tr.global_batch_size)
        self._closers.append(batches.close)
        return batches

    # ------------------------------------------------------------------------------ helpers
    def _device_name(self) -> str | None:
        if self.job.cluster.accelerator == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return None

    STOP_POLL_S = 1.0  # how often rank 0 asks the runner whether to stop (one actor call each time)

    def _stop_requested(self) -> bool:
        """Rank 0 only: whether the runner asked for a stop. Asked at most once per STOP_POLL_S and
        never waited for: a step sees the answer to a question asked at an earlier one."""
        if self.rank != 0 or self.spec.reporter is None:
            return False
        if self._control is None:
            now = time.monotonic()
            if now - self._asked_at < self.STOP_POLL_S:
                return False
            self._control, self._asked_at = self.spec.reporter.control.remote(), now
        ready, _ = ray.wait([self._control], timeout=0)
        if not ready:
            return False
        try:
            answer = ray.get(self._control)
        except Exception:  # noqa: BLE001 - the runner is gone: keep training, Ray Train decides
            answer = None
        self._control = None
        return answer == "stop"

    def _record_startup(self, step: int) -> None:
        """Rank 0, after this attempt's first step: when each start-up stage ended, as the `startup`
        field of that step's history row (bench/overhead.py reads it: process start, imports, data,
        engine + restore, batch)."""
        self.startup["first_step"] = time.time()
        self.history.append(step, startup=dict(self.startup))

    def _report(self, report: Report) -> None:
        """Rank 0: one typed report to the job's runner (orchestrator.train.reports); not waited for."""
        assert isinstance(report, REPORTS), report
        if self.rank == 0 and self.spec.reporter is not None:
            self.spec.reporter.report.remote(report)

    def _evaluate(self, engine, val: SplitReader) -> float:
        """The mean loss over trainer.eval_batches fixed global batches of the validation split, the
        ranks sharing each; `engine`: a DeepSpeed engine or a plain model (left in the mode it was in)."""
        tr = self.job.trainer
        was_training = engine.training
        engine.eval()
        losses = []
        with torch.no_grad():
            for k in range(tr.eval_batches):
                mine = rank_slice(eval_batch(val.num_samples, tr.global_batch_size, k), self.rank, self.world)
                for mb in micro_batches(mine, tr.micro_batch_size):
                    x, y = val.batch(mb)
                    _, loss = engine(x.to(self.device), y.to(self.device))
                    losses.append(float(loss))
        engine.train(was_training)
        return all_mean(losses, self.device)

    def _logged_eval(self, engine, val: SplitReader, step: int) -> float:
        """The validation loss (and perplexity), logged to the history at `step`."""
        eval_loss = self._evaluate(engine, val)
        self.history.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0))}, step=step)
        return eval_loss

    def _heldout_qa(self, module, step: int, eot: int) -> QAScore | None:
        """Greedy exact-match answers to the data's held-out questions (orchestrator.train.qa_eval),
        the ranks sharing them; logged to the history at `step`. None when the data has none."""
        questions = heldout_questions(self.job.data.source, self.job.data.seed)
        if not questions:
            return None
        from model.tokenizer import tokenizer_from_json

        tok = tokenizer_from_json(self.tokenizer.decode())
        mine = rank_share(len(questions), self.rank, self.world)
        (correct,) = all_sum([ask(module, tok, questions, mine, eot, self.device)], self.device)
        score = QAScore(int(correct), len(questions))
        self.history.log({"eval/qa_exact_match": score.accuracy, "eval/qa_correct": score.correct,
                          "eval/qa_questions": score.questions}, step=step)
        return score

    def _train_step(self, engine, micro: list) -> list:
        """One optimizer step over this rank's micro-batches (DeepSpeed accumulates their gradients
        and steps the optimizer at the last); their losses, as tensors on the device (read once per
        step, in the step's vote: no wait for the device per micro-batch)."""
        losses = []
        for i, (x, y) in enumerate(micro):
            self.hb.phase(FORWARD_BACKWARD)
            self.forward_timer.start()
            _, loss = engine(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            self.forward_timer.stop()
            engine.backward(loss)
            if i == len(micro) - 1:
                self.hb.phase(OPTIMIZER_STEP)
            engine.step()
            losses.append(loss.detach())
        return losses

    def _compute_shares(self, meter: IntervalMetrics, step: int) -> list[float]:
        """At a logged step: this rank's mean forward time per step of the interval, in its own slot of
        a vector every rank sends with the step's vote (so rank 0 gets all of them); else nothing."""
        if not meter.due(step):
            return []
        shares = [0.0] * self.world
        shares[self.rank] = self.forward_timer.take() / max(1, meter.steps)
        return shares

    def _compute_metrics(self, vote, step: int) -> dict[str, float]:
        """Rank 0, at a logged step: the ranks' compute times (the slowest rank and its ratio to the
        others' median; each rank's up to MAX_RANK_COLUMNS ranks), and a report for each rank found to
        be persistently slower (trainer.straggler_factor over trainer.straggler_window logged steps)."""
        shares = list(vote.shares)
        if len(shares) < 2:
            return {}
        ratios = StragglerDetector.ratios(shares)
        slowest = max(range(len(shares)), key=ratios.__getitem__)
        metrics = {"perf/slowest_rank": slowest, "perf/slowest_rank_ratio": ratios[slowest]}
        if len(shares) <= MAX_RANK_COLUMNS:
            metrics.update({f"perf/compute_s/rank_{r}": s for r, s in enumerate(shares)})
        for found in self.stragglers.add(step, shares):
            log.warning("rank %d is a straggler: %.2fx the other ranks' compute time over %d logged steps",
                        found.rank, found.ratio, found.window)
            self._report(StragglerFound(rank=found.rank, ratio=found.ratio, step=found.step, window=found.window))
        return metrics

    # --------------------------------------------------------------------------------- loop
    def run(self) -> None:
        """Open the data, restore or start the engine and state, open the tracker, train, close."""
        # Lazy: DeepSpeed picks its accelerator when first imported, after train_worker sets DS_ACCELERATOR.
        from deepspeed.accelerator import get_accelerator

        job = self.job
        reason = self._begin_attempt()
        self.device = get_accelerator().current_device_name()
        self.forward_timer = ForwardTimer(self.device)  # this rank's compute time (stragglers)
        self.stragglers = StragglerDetector(job.trainer.straggler_factor, job.trainer.straggler_window)
        manifest = load_manifest(self.store, job.data.uri)
        cache = self.scratch / "cache" / f"rank-{self.rank}"  # a cache folder belongs to one process
        train = SplitReader.from_config(self.store, job.data, manifest, "train", cache)
        val = SplitReader.from_config(self.store, job.data, manifest, "val", cache=train.cache)  # one limit for both
        self.tokenizer = self.store.get(join_uri(job.data.uri, manifest.tokenizer_key))  # (checkpoints, QA)
        ckpt = self._checkpointer(self.tokenizer)
        self.startup["data_opened"] = time.time()
        engine, state = self._restore(ckpt)
        self.startup["restored"] = time.time()
        log.info("rank %d of %d on %s: ZeRO-%d engine ready at step %d of %d", self.rank, self.world, self.device,
                 job.deepspeed.stage, state.step, job.trainer.max_steps)
        self._stamp(state)
        self._open_history(state, reason)
        self.hb.start(state.step + 1)
        try:
            self._loop(engine, state, train, val, ckpt)
        finally:
            self.hb.close()
            for close in reversed(self._closers):
                close()
            train.close()  # stops the download threads (val shares train's cache)
            self.history.finish()

    def _loop(self, engine, state: TrainerState, train: SplitReader, val: SplitReader, ckpt: Checkpointer) -> None:
        """Train from `state` to trainer.max_steps, or until the ranks vote to stop."""
        tr = self.job.trainer
        meter = self._metrics(train)
        cadence = CheckpointCadence(self.job.checkpoint, ckpt, self.history, rank=self.rank, step=state.step,
                                    max_steps=tr.max_steps)
        batches = self._prefetcher(train, state.cursor)
        began = None
        while state.step < tr.max_steps:
            now = time.time()
            self.hb.stepped(state.step + 1, now - began if began else None)
            self.hb.phase(DATA)
            began = now
            micro, waited = batches.next(more=state.step + 1 < tr.max_steps)
            if "first_batch" not in self.startup:
                self.startup["first_batch"] = time.time()
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step)
            losses = self._train_step(engine, micro)
            state.step += 1
            state.cursor += tr.global_batch_size
            state.tokens_seen += meter.tokens_per_step
            meter.stepped(waited)
            if "first_step" not in self.startup:
                self._record_startup(state.step)
            # One all-reduce per step carries the loss and, for time-based intervals, whether any
            # rank's clock says a checkpoint is due (so every rank decides the same).
            due = cadence.due(state.step)
            stop = self._stop_requested() and state.step < tr.max_steps  # rank 0 asks the job's runner
            self.hb.phase(COLLECTIVE)
            vote = step_vote(losses, due, stop, self.device, self._compute_shares(meter, state.step))
            if state.first_loss is None:
                state.first_loss = vote.loss
            state.last_loss = vote.loss
            if meter.due(state.step):
                row = meter.row(loss=vote.loss, lr=lr, tokens_seen=state.tokens_seen, shard_wait_s=train.wait_s)
                if self.rank == 0:
                    row.update(grad_norm(engine), **system_metrics(self.device),
                               **self._compute_metrics(vote, state.step))
                self.history.log(row, step=state.step)
                self._report(Progress(step=state.step, loss=vote.loss, first_loss=state.first_loss,
                                      tokens=state.tokens_seen, tokens_per_s=row["perf/tokens_per_s"],
                                      step_time_s=row["perf/step_time_s"], mfu=row.get("perf/mfu")))
            if tr.eval_interval and state.step % tr.eval_interval == 0 and state.step < tr.max_steps:
                self.hb.phase(EVAL)
                self._report(Evaluated(eval_loss=self._logged_eval(engine, val, state.step)))
            if vote.checkpoint_due:
                self.hb.phase(CHECKPOINT)
                cadence.save(engine, state)  # (its blocking time goes to the history: ckpt/blocking_s)
            if vote.stop:
                # A requested stop (cancel, or a new worker count): commit this step and leave; the
                # runner restarts from it or ends the job (it reads the step from that checkpoint).
                self.hb.phase(CHECKPOINT)
                cadence.save_at_stop(engine, state)
                dist.barrier()
                return
        self._finish(engine, state, val, cadence)

    def _finish(self, engine, state: TrainerState, val: SplitReader, cadence: CheckpointCadence) -> None:
        """After the last step: the final evaluation and checkpoint, then every rank waits for the commit."""
        self.hb.phase(EVAL)
        eval_loss = self._logged_eval(engine, val, state.step)
        state.eval_loss = eval_loss
        qa = self._heldout_qa(engine.module, state.step, val.manifest.eot_id)
        if qa is not None:
            state.qa_correct, state.qa_questions = qa.correct, qa.questions
        self.hb.phase(CHECKPOINT)
        cadence.save_final(engine, state)
        self._report(Evaluated(eval_loss=eval_loss))
        dist.barrier()  # rank 0's commit is in the store before any rank leaves
