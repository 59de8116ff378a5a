"""Environment variable names and defaults, in one place."""

CONF_DIR_ENV = "ORCH_CONF_DIR"  # a config folder instead of the built-in one (conf/, linked as orchestrator/conf)
STATE_DIR_ENV = "ORCH_STATE_DIR"  # the state folder (default: ./.orch)
USER_ENV = "ORCH_USER"  # who submits (default: the OS user); what the submitter says, not authenticated
DEFAULT_STATE_DIR = ".orch"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a job the Jobs API runs
# Ray's single-machine mode ("0": the default on macOS and Windows): Ray keeps 127.0.0.1 as the
# node's address and listens there only, where on Linux it swaps in the machine's own address and
# listens on every interface. orch sets it for clusters of this machine alone (orchestrator.raycluster.connect).
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train V2's node-drain watcher
# How often Ray Train's controller polls its workers, which is when it sees that one died (its
# default: 2 s). 1 s halves the wait before a dead worker's group is restarted, for one small call
# per worker and second.
RAY_TRAIN_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_TRAIN_HEALTH_CHECK_S = "1.0"

JOBS_DB = "jobs.db"  # SQLite file of job records inside the state folder
RUN_LOCKS_DIR = "orch-run"  # <state folder>/orch-run/<pipeline id>.lock: held by the `orch run` driving it

# Layout of a run in the object store: <storage.root>/runs/<job id>/...
RUNS_PREFIX = "runs"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
COMMIT_MARKER = "COMMITTED.json"  # written last; a checkpoint exists only once this does
TRAINER_STATE = "trainer_state.json"
EVAL_RESULT = "eval.json"  # an eval job's numbers, in its run folder (orchestrator.train.evaluate)
MODEL_CONFIG = "model_config.json"  # in every checkpoint and export: the model architecture (family + fields)
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "export.json"  # written last in an export folder
# a job's final export runs in its runner up to this many parameters, in a Ray task beyond (ray_train.export_weights)
EXPORT_IN_RUNNER_MAX_PARAMS = 256_000_000

# Dataset layout: <dataset uri>/manifest.json (written last), tokenizer.json, <split>/shard-*.bin
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
DATASET_MARKER = ".orch-dataset"  # written first into an empty destination: orch may write (and clear) there
EXPORT_MARKER = ".orch-export"  # likewise for a Hugging Face folder written by `orch export`
DATASET_FORMAT_VERSION = 1

# Environment variables that may carry secrets: never logged, saved or forwarded into configs.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
)

LOCAL_DIR_ENV = "ORCH_LOCAL_DIR"  # node-local scratch for staging, restores and the shard cache (default: $TMPDIR/orch)

HISTORY_POLL_S = 10.0  # how often a job's runner feeds new metrics history rows to its W&B run
WORKER_LOG_UPLOAD_S = 5.0  # how often each worker uploads what it printed since (orchestrator.train.output)

# How long a new worker group waits for the controller to judge the failures before it (a node they
# blame may be quarantined, orchestrator.jobs.quarantine): the controller wakes on them at once, so
# the wait is this long only while it is away (restarting)
QUARANTINE_WAIT_S = 10.0
