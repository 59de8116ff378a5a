"""Typed configuration: one frozen dataclass per component, validated when built.

Hydra composes `conf/` into a tree that `orchestrator.config.compose` turns into a `RootConfig`
once, at submit time; each job of the pipeline is then resolved into a self-contained `JobConfig`
that is frozen into the job record. Everything past the entry points receives these objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from model.config import ModelConfig  # the family's config class (model.registry; torch-free)
from orchestrator.config.interval import parse_interval
from orchestrator.errors import ConfigError, FailureClass, OrchError

JobKind = Literal["pretrain", "finetune", "eval"]  # eval: no optimizer, numbers of given weights
# What an eval job can compute (trainer.eval_metrics): the validation split's loss (and perplexity),
# and the exact match of greedy answers to the held-out questions of a QA dataset
# (orchestrator.train.evaluate implements each).
EVAL_METRICS = ("loss", "qa_exact_match")


# A job or dataset name becomes one segment of store paths (runs/<pipeline id>-<job>/...,
# datasets/<name>/...) and of local file names (logs/<job id>.log, scratch): one segment, no way up.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME = 100  # characters in a job or dataset name (a job id adds the pipeline id in front)


def safe_name(value: object, setting: str, max_len: int = MAX_NAME) -> str:
    """`value` if it is a safe path segment; else a ValueError naming `setting`."""
    if (not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value
            or len(value) > max_len):
        raise ValueError(f"{setting}={value!r} is not a safe name: use 1-{max_len} letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit and without '..' (it becomes a path in the store)")
    return value


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be > 0")


def is_plain_name(value: object, max_len: int = 2 * MAX_NAME) -> bool:
    """Whether `value` passes `safe_name` (a job id is a pipeline id and a job name: twice as long)."""
    try:
        safe_name(value, "name", max_len)
    except ValueError:
        return False
    return True


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 0:
            raise ValueError(f"{name}={value} must be >= 0")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; the batch sizes come from the trainer and the worker count."""

    stage: Literal[1, 2, 3]  # ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # conf/: the cluster's precision (bf16 on GPU clusters)
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO-Offload of optimizer states
    offload_param: Literal["none", "cpu"] = "none"  # ZeRO-Infinity parameter offload (stage 3)
    overlap_comm: bool = False  # overlap gradient reduction with backward
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather bucket (stages 1-2)

    def __post_init__(self):
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError(f"offload_param={self.offload_param!r} needs stage=3 (got stage={self.stage})")


@dataclass(frozen=True)
class TrainerConfig:
    """The optimisation loop of one job."""

    max_steps: int  # optimizer steps
    global_batch_size: int  # sequences per optimizer step; fixed whatever the worker count
    micro_batch_size: int  # sequences per worker per forward/backward
    lr: float  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm (0 disables)
    log_interval: int = 1  # steps between metric logs
    eval_interval: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 2  # global batches of the validation split per evaluation
    # what a job of kind eval computes (orchestrator.train.evaluate): any of EVAL_METRICS
    eval_metrics: tuple[str, ...] = ("loss", "qa_exact_match")
    seed: int = 1337  # seeds init, dropout and the data order
    threads_per_worker: int = 1  # torch intra-op threads in each worker
    # Hangs (orchestrator.execution.watchdog): no rank entering a new phase or step for this long is a
    # stall (its stacks are dumped, the ranks behind named, the group restarted). null: the larger of
    # stall_floor_s and stall_factor x the job's median step time.
    stall_timeout_s: Optional[float] = None
    stall_floor_s: float = 300.0  # the automatic stall timeout is never below this
    stall_factor: float = 20.0  # ... nor below this many median step times
    heartbeat_interval_s: float = 1.0  # how often each rank tells the runner its step and phase
    # a collective (all-reduce, barrier) that waits longer raises (the process group's timeout);
    # above the stall timeout, so the watchdog names the stuck rank first
    collective_timeout_s: float = 1800.0
    # restarts each failure class may use ({stall: 2, oom: 0, ...}; orchestrator.errors.FailureClass):
    # a class not named, or null, has only the job's max_failures
    max_restarts_per_class: dict = field(default_factory=dict)
    same_failure_limit: int = 3  # the same class of failure at the same step this many times in a row stops the job
    # a rank whose forward time is this many times the other ranks' median, over straggler_window
    # logged steps (in most of them), is reported as a straggler with its node
    straggler_factor: float = 1.5
    straggler_window: int = 10

    def __post_init__(self):
        _positive(self, "max_steps", "global_batch_size", "micro_batch_size", "lr", "log_interval",
                  "threads_per_worker", "eval_batches", "stall_timeout_s", "stall_floor_s", "stall_factor",
                  "heartbeat_interval_s", "collective_timeout_s", "straggler_factor", "straggler_window")
        classes = [c.value for c in FailureClass]
        for name, budget in self.max_restarts_per_class.items():
            if name not in classes:
                raise ValueError(f"trainer.max_restarts_per_class names {name!r}, which is no failure class; "
                                 f"use one of {', '.join(classes)}")
            if budget is not None and (not isinstance(budget, int) or budget < 0):
                raise ValueError(f"trainer.max_restarts_per_class.{name}={budget!r} must be an integer >= 0")
        _non_negative(self, "same_failure_limit")
        stall = self.stall_timeout_s if self.stall_timeout_s is not None else self.stall_floor_s
        if self.collective_timeout_s <= stall:
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s} must be above the stall timeout "
                             f"({stall} s, trainer.stall_timeout_s or stall_floor_s), so that the watchdog names "
                             f"a stuck rank before a collective gives up; raise trainer.collective_timeout_s")
        _non_negative(self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1) (Adam's moment decay)")
        unknown = [m for m in self.eval_metrics if m not in EVAL_METRICS]
        if unknown:
            raise ValueError(f"eval_metrics names {', '.join(map(repr, unknown))}: not a metric orch computes; "
                             f"choose from {', '.join(EVAL_METRICS)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be divisible by "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= lr={self.lr}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When to save, how to upload, and how many to keep."""

    interval: Union[int, str] = 0  # steps (an int; 0: only the final one), a duration ("90s", "10m", "2h"), or "auto"
    mtbf_hours: float = 24.0  # interval=auto: the mean time between failures Young/Daly balances saving against
    keep_last: int = 2  # committed checkpoints kept (the newest is never deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, as a milestone (0: none)
    async_upload: bool = True  # upload in the background while training goes on (false: the loop waits)
    upload_limit_mbps: Optional[float] = None  # cap each worker's background upload rate (MB/s), to spare the network
    commit_timeout_s: float = 3600.0  # how long rank 0 waits for every rank's upload before the save fails

    def __post_init__(self):
        parse_interval(self.interval)  # raises ValueError with the accepted forms
        _positive(self, "keep_last", "mtbf_hours", "upload_limit_mbps", "commit_timeout_s")
        if self.keep_every < 0:
            raise ValueError(f"keep_every={self.keep_every} must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """A tokenized dataset in the object store and how to make it if it is missing."""

    name: str  # dataset name; the prepared dataset lives at `uri`
    kind: Literal["text", "sft"]  # text: pretraining tokens; sft: prompt/response with a loss mask
    uri: str  # where the prepared shards and manifest live (s3://... or file://...)
    # what to prepare from: "generated:stories"/"generated:qa", a URI of .txt/.jsonl(.gz/.zst), .parquet
    # or .arrow files or of a Hugging Face `datasets` folder (save_to_disk), or null (already prepared at `uri`)
    source: Optional[str]
    seq_len: int  # tokens per training sample
    vocab_size: int = 512  # vocabulary of the tokenizer a text dataset trains (without tokenizer_uri)
    # the tokenizer to reuse instead of training one (sft: required): a prepared dataset, an orch export or
    # checkpoint, a Hugging Face model folder (its tokenizer.json), or a tokenizer.json file
    tokenizer_uri: Optional[str] = None
    text_field: str = "text"  # the JSONL field / Parquet or Arrow column that holds a document's text
    read_batch_mb: float = 16.0  # source text a task reads and tokenizes at a time: bounds a task's memory
    num_documents: int = 2000  # generated sources: documents (or examples) to generate
    shard_tokens: int = 65536  # tokens per shard (text) / approx. tokens per shard (sft)
    val_fraction: float = 0.05  # documents held out for evaluation
    seed: int = 0  # seed of generated sources and of the train/val split
    unit_mb: float = 64.0  # source megabytes per tokenization task (Ray tasks run in parallel)
    # Reading (does not change the prepared bytes):
    shuffle_window: int = 8  # shards whose samples are shuffled together (reads stay mostly sequential)
    cache_limit_mb: int = 1024  # node-local shard cache per worker; least recently used shards are evicted
    prefetch_batches: int = 4  # global batches whose shards are fetched ahead in the background
    download_workers: int = 4  # background download threads per worker

    def __post_init__(self):
        safe_name(self.name, "name")
        _positive(self, "seq_len", "vocab_size", "num_documents", "shard_tokens", "unit_mb", "shuffle_window",
                  "cache_limit_mb", "download_workers", "read_batch_mb")
        if not self.text_field:
            raise ValueError("text_field is empty; name the JSONL field or table column that holds the text")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches={self.prefetch_batches} must be >= 0")
        if self.kind == "text" and self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for a byte-level BPE: "
                             f"use at least 257 (256 bytes + end-of-text)")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 0.5)")


@dataclass(frozen=True)
class StorageConfig:
    """The object store: a local directory (embedded default) or S3 through boto3."""

    backend: Literal["local", "s3"]
    root: str  # URI under which datasets and runs live: file:///abs/path or s3://bucket/prefix
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, R2, ...); null for AWS
    region: Optional[str] = None  # S3 region; null uses the AWS default chain
    shared: bool = False  # local backend: root is a filesystem every node mounts (NFS, FSx), so multi-node works

    def __post_init__(self):
        if self.backend == "s3" and not self.root.startswith("s3://"):
            raise ValueError(f"root={self.root!r} must start with s3:// when backend='s3' (set storage.root=s3://BUCKET/PREFIX)")
        if self.backend == "local" and self.root.startswith("s3://"):
            raise ValueError(f"root={self.root!r} is an S3 URI but backend='local'; choose storage=s3")
        if self.endpoint_url is not None:
            from orchestrator.storage.base import check_endpoint_url  # (the storage package loads boto3)

            try:
                check_endpoint_url(self.endpoint_url)
            except OrchError as e:
                raise ValueError(str(e)) from None


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases. Keys come from WANDB_API_KEY in the environment, never from here."""

    backend: Literal["wandb", "none"] = "wandb"
    project: str = "orch"
    entity: Optional[str] = None
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline runs upload later with `wandb sync`
    dir: Optional[str] = None  # where W&B writes its files (default: <state_dir>)
    tags: tuple[str, ...] = ()


QUARANTINE_CLASSES = ("worker_crash", "node_lost", "stall", "straggler")  # what blames a node by default


@dataclass(frozen=True)
class QuarantineConfig:
    """Bad-node quarantine (orchestrator.jobs.quarantine): a node blamed for `failures` failures within
    `window_s` gets no worker of a later worker group (of any job) for `ttl_s`, or until `orch nodes
    release NODE`. The config of the job whose failure completes the count decides."""

    enabled: bool = True
    failures: int = 3  # K: blames of one node within the window that quarantine it
    window_s: float = 3600.0  # the window the K blames must fall in
    ttl_s: float = 3600.0  # how long the node stays out of placement (then it is let back in)
    # the failure classes that blame the rank's node (FailureClass values, and "straggler": a rank
    # persistently slower than the others)
    classes: tuple[str, ...] = QUARANTINE_CLASSES

    def __post_init__(self):
        _positive(self, "failures", "window_s", "ttl_s")
        known = [c.value for c in FailureClass] + ["straggler"]
        bad = [c for c in self.classes if c not in known]
        if bad:
            raise ValueError(f"quarantine.classes has {', '.join(map(repr, bad))}: the classes are {', '.join(known)}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where jobs run and what each worker asks for."""

    name: str  # cluster preset name
    address: Optional[str] = None  # Ray address (ray://, auto, host:port); null: start an embedded local cluster
    num_cpus: Optional[int] = None  # embedded cluster only: logical CPUs (null: enough for the largest job)
    # embedded cluster only: start Ray's dashboard too (ten processes waking ~300 times a second, ~1% of
    # a 2-core machine's CPU taken from the training; `orch up` clusters always have one)
    dashboard: bool = False
    backend: Literal["gloo", "nccl"] = "gloo"  # torch.distributed backend
    accelerator: Literal["cpu", "cuda"] = "cpu"  # what DeepSpeed runs on
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # the precision DeepSpeed trains in here unless deepspeed.precision says otherwise (conf/deepspeed
    # follows it): bf16 on GPU clusters, fp32 on CPUs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    peak_flops_per_device: Optional[float] = None  # peak FLOP/s for MFU (null: from the GPU's name; unknown on CPU)
    autoscaling: bool = False  # nodes join on demand: admit a job alone even if it does not fit yet
    elastic_resize_interval_s: float = 60.0  # elastic jobs: how often Ray Train checks for room to grow
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)  # bad nodes kept out of placement

    def __post_init__(self):
        _positive(self, "num_cpus", "cpus_per_worker", "peak_flops_per_device")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker} must be >= 0")
        if self.accelerator == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError("accelerator='cuda' needs gpus_per_worker > 0 (one worker per GPU: 1)")
        if self.accelerator == "cpu" and self.backend == "nccl":
            raise ValueError("backend='nccl' needs accelerator='cuda'; use backend=gloo on CPU")


@dataclass(frozen=True)
class JobSpec:
    """One job of a pipeline, as written in conf/pipeline/*.yaml (before resolution)."""

    kind: JobKind
    depends_on: tuple[str, ...] = ()  # names of jobs in the same pipeline that must succeed first
    workers: int = 2  # Ray Train workers (one DeepSpeed rank each); `workers=[MIN,MAX]` sets max_workers
    max_workers: Optional[int] = None  # elastic: Ray Train grows the group up to this when nodes have room
    priority: int = 0  # higher runs first among queued jobs
    max_failures: int = 0  # worker-group restarts Ray Train may make before the job fails
    data: Optional[DataConfig] = None  # null: the top-level `data`
    trainer: dict = field(default_factory=dict)  # overrides of the top-level `trainer` for this job
    # overrides of the top-level `deepspeed` for this job (a fine-tune at ZeRO-1 after a ZeRO-3 pretraining)
    deepspeed: dict = field(default_factory=dict)
    init_from: Optional[str] = None  # weights to start from: a Hugging Face folder, or an orch export/checkpoint URI
    # continue another run's training state (a checkpoint or run URI), at any worker count
    resume_from: Optional[str] = None
    # start from random weights even after a dependency (a baseline: what the dependency's weights add)
    from_scratch: bool = False
    step_time_s: Optional[float] = None  # expected seconds per step (backfill), until the job has measured its own

    def __post_init__(self):
        _positive(self, "workers", "step_time_s")
        if self.from_scratch and self.init_from:
            raise ValueError(f"from_scratch=true and init_from={self.init_from} contradict each other; drop one")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ValueError(f"max_workers={self.max_workers} is below workers={self.workers}; "
                             f"use workers=[MIN,MAX] with MIN <= MAX")
        if self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures} must be >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    """A named set of jobs with dependencies (pretraining, then fine-tuning)."""

    name: str
    jobs: dict[str, JobSpec]

    def __post_init__(self):
        if not self.jobs:
            raise ValueError("a pipeline needs at least one job")
        for name in self.jobs:
            safe_name(name, "job name")
        self.job_order()  # an unknown dependency or a cycle fails here, when the config is built

    def job_order(self) -> list[str]:
        """The job names, each after the jobs it depends on (`JOB@every:N` depends on JOB)."""
        return dependency_order({n: tuple(map(dependency_job, s.depends_on)) for n, s in self.jobs.items()})


_TRIGGER = re.compile(r"(every|step):([1-9][0-9]*)")


def dependency_job(dep: str) -> str:
    """The job a dependency names: `pretrain` of `pretrain` and of the trigger `pretrain@every:200`."""
    return dep.partition("@")[0]


def trigger_matches(trigger: str, step: int) -> bool:
    """Whether checkpoint trigger `trigger` (`every:N`: each multiple of N; `step:N`: step N) takes a
    committed checkpoint of step `step` (orchestrator.jobs.triggers)."""
    m = _TRIGGER.fullmatch(trigger)
    if not m:
        raise ValueError(f"the trigger {trigger!r} is not a checkpoint trigger; write JOB@every:N (each committed "
                         f"checkpoint at a multiple of N steps) or JOB@step:N (the one at step N), N >= 1")
    n = int(m.group(2))
    return step > 0 and (step % n == 0 if m.group(1) == "every" else step == n)


def _check_trigger(trigger: str, depends_on: tuple[str, ...]) -> None:
    trigger_matches(trigger, 0)  # (raises the one line for a malformed rule)
    if len(depends_on) != 1:
        raise ValueError(f"a job triggered by checkpoints ({trigger}) depends on exactly one job, the one whose "
                         f"checkpoints start it; it names {len(depends_on)}")


def dependency_order(deps: dict[str, tuple[str, ...]]) -> list[str]:
    """The names of `deps` ({job: the jobs it depends on}), each after its dependencies: the one
    walk over a pipeline's `depends_on`. An unknown name or a cycle is a ConfigError that says
    which and what to change."""
    order: list[str] = []
    done: set[str] = set()

    def visit(n: str, path: tuple[str, ...]) -> None:
        if n in done:
            return
        if n in path:
            cycle = " -> ".join(path[path.index(n):] + (n,))
            raise ConfigError(f"pipeline.jobs has a dependency cycle: {cycle}; remove one of these depends_on")
        for d in deps[n]:
            if d not in deps:
                raise ConfigError(f"pipeline.jobs.{n}.depends_on names {d!r}, which is not a job of the pipeline "
                                  f"({', '.join(deps)}); for a job already submitted use `orch submit --after JOB_ID`")
            visit(d, path + (n,))
        done.add(n)
        order.append(n)

    for n in deps:
        visit(n, ())
    return order


RESOURCES = ("workers", "GPU", "CPU")  # what a queue's quota counts: a job's gang in workers, and what they hold


@dataclass(frozen=True)
class Resources:
    """An amount of each resource a quota counts; null: no limit on that one."""

    workers: Optional[float] = None  # Ray Train workers (an elastic job counts at its maximum)
    GPU: Optional[float] = None
    CPU: Optional[float] = None

    def __post_init__(self):
        _non_negative(self, *RESOURCES)

    def get(self, resource: str) -> Optional[float]:
        return getattr(self, resource)


@dataclass(frozen=True)
class QueueSpec:
    """One queue (a team): what it is entitled to, what it may borrow, its weight in fair share."""

    quota: Resources = field(default_factory=Resources)  # nominal: always its own (others' borrowing is preempted)
    borrow: Resources = field(default_factory=Resources)  # beyond the quota, from room others leave idle (null: any)
    weight: float = 1.0  # its entitled share of the cluster is weight / the sum of the weights

    def __post_init__(self):
        _positive(self, "weight")


@dataclass(frozen=True)
class QueuesConfig:
    """The cluster's queues (conf/queues/*.yaml): `orch queue set` replaces them on a running controller."""

    teams: dict[str, QueueSpec]  # queue name -> its quota, borrowing limit and weight
    half_life_s: float = 3600.0  # fair share: past usage (worker-seconds) counts half after this long
    min_runtime_s: float = 300.0  # a running job is never preempted before it ran this long
    preempt_deadline_s: float = 300.0  # a victim's time to commit a checkpoint before it is stopped anyway

    def __post_init__(self):
        if not self.teams:
            raise ValueError("queues.teams is empty; define at least one queue (e.g. queues=default)")
        for name in self.teams:
            safe_name(name, "queue name")
        _positive(self, "half_life_s")
        _non_negative(self, "min_runtime_s", "preempt_deadline_s")


@dataclass(frozen=True)
class RootConfig:
    """The whole composed configuration of one submission."""

    state_dir: str  # job records, W&B offline files, local staging (absolute after compose)
    model: ModelConfig
    deepspeed: DeepSpeedConfig
    data: DataConfig
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    storage: StorageConfig
    tracking: TrackingConfig
    cluster: ClusterConfig
    pipeline: PipelineConfig
    queues: Optional[QueuesConfig] = None  # the queues of a cluster (conf/queues/); a job names one at submit


@dataclass(frozen=True)
class JobConfig:
    """A fully resolved job: everything a worker needs, frozen into the job record at submit."""

    name: str
    kind: JobKind
    pipeline: str  # pipeline name (W&B group is the pipeline id)
    depends_on: tuple[str, ...]
    workers: int  # the gang admitted (elastic: the minimum)
    priority: int
    max_failures: int
    state_dir: str
    model: ModelConfig
    deepspeed: DeepSpeedConfig
    data: DataConfig
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    storage: StorageConfig
    tracking: TrackingConfig
    cluster: ClusterConfig
    init_from: Optional[str] = None  # weights to start from (else: the dependency's exported weights)
    resume_from: Optional[str] = None  # a checkpoint (or run) whose whole training state this job continues
    max_workers: Optional[int] = None  # elastic upper bound (Ray Train resizes between workers and this)
    from_scratch: bool = False  # random initial weights, even after a dependency (a baseline to compare with)
    step_time_s: Optional[float] = None  # expected seconds per step: a waiting job may backfill by it
    # `every:N` / `step:N`: a trigger, run once per matching committed checkpoint of its one dependency
    # (orchestrator.jobs.triggers), from that checkpoint's weights
    trigger: Optional[str] = None

    @property
    def needs_coordinator(self) -> bool:
        """Whether the job's Ray Train run needs Ray's cluster-wide AutoscalingCoordinator actor for
        itself: an elastic job asks it how many workers the cluster has room for, and on an
        autoscaling cluster it is how the run's resource request reaches the autoscaler. The
        coordinator counts a node's total resources less what runs registered, so where an elastic
        job may share the cluster every job must register (RayLauncher's `coordinator`). A fixed-size
        job on a cluster of fixed size with no elastic job beside it has no use for it: the actor is
        then neither started nor called (an idle Ray actor is one more process waking 100 times a
        second)."""
        return bool(self.max_workers) or self.cluster.autoscaling

    def __post_init__(self):
        safe_name(self.name, "name")  # also for jobs that reach the controller as dicts (`orch submit`)
        if self.trigger is not None:
            _check_trigger(self.trigger, self.depends_on)
        if self.kind in ("finetune", "eval") and not (self.depends_on or self.init_from or self.from_scratch):
            raise ValueError(f"a{'n' if self.kind == 'eval' else ''} {self.kind} job needs weights: depends_on a job "
                             f"that trains them (or `orch submit --after JOB_ID`), or init_from=MODEL")
        if self.data.kind == "sft" and not self.data.tokenizer_uri and not self.depends_on:
            raise ValueError(
                f"sft data '{self.data.name}' needs data.tokenizer_uri "
                f"(the dataset or model folder whose tokenizer it uses), or the job's init_from"
            )
        for n in range(self.workers, (self.max_workers or self.workers) + 1):  # every size Ray Train may pick
            per_step = self.trainer.micro_batch_size * n
            if self.trainer.global_batch_size % per_step:
                raise ValueError(
                    f"trainer.global_batch_size={self.trainer.global_batch_size} is not divisible by "
                    f"workers x trainer.micro_batch_size = {n} x {self.trainer.micro_batch_size}; "
                    f"change one of them" + (" (an elastic job must divide it at every size from min to max)"
                                             if self.max_workers else "")
                )
        if self.data.seq_len > self.model.block_size:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.block_size={self.model.block_size}; "
                f"lower data.seq_len or pick a larger model"
            )
        if self.data.kind == "text" and self.data.vocab_size > self.model.vocab_size:
            raise ValueError(
                f"data.vocab_size={self.data.vocab_size} (the tokenizer to train) exceeds "
                f"model.vocab_size={self.model.vocab_size}; lower data.vocab_size or raise model.vocab_size"
            )
        if self.kind == "finetune" and self.data.kind != "sft":
            raise ValueError(f"a finetune job needs an sft dataset, got data '{self.data.name}' "
                             f"of kind {self.data.kind!r}")
        if self.kind == "pretrain" and self.data.kind != "text":
            raise ValueError(f"a pretrain job needs a text dataset, got data '{self.data.name}' "
                             f"of kind {self.data.kind!r}")

    def gradient_accumulation_steps(self, world_size: int) -> int:
        return self.trainer.global_batch_size // (self.trainer.micro_batch_size * world_size)

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cluster.cpus_per_worker}
        if self.cluster.gpus_per_worker:
            res["GPU"] = self.cluster.gpus_per_worker
        return res
