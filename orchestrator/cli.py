"""`orch`: the command line. Parse, build, run; the logic lives in the modules it calls.

    orch run [OVERRIDES...] [--dry-run]     pretrain -> fine-tune on an embedded (or given) Ray cluster
    orch up [--nodes N] / orch down         a persistent local Ray cluster with the controller
    orch submit [OVERRIDES...] [--after J]  queue a pipeline's jobs on the controller; prints the ids
    orch status [JOB] [--json] [--watch]    job records (from the controller, else the state folder)
    orch sync JOB|PIPELINE                  upload the jobs' offline W&B runs (`wandb sync`)
    orch logs JOB [-f]                      a job's events: states, progress, failures
    orch cancel JOB [--now]                 checkpoint, then stop (--now: stop at once)
    orch scale JOB --workers N              checkpoint, restart at N workers from it
    orch export CHECKPOINT DIR              a checkpoint as a Hugging Face folder
    orch generate CHECKPOINT --prompt TEXT  sample from a model (KV cache)
    orch data prepare [OVERRIDES...]        tokenize the pipeline's datasets into the store

Errors print one line and exit 2 (usage, config, input) or 1 (a job failed); --debug adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

# Module-level imports are the standard library and the parts of orchestrator built on it alone;
# modules that load Hydra, boto3, numpy, YAML, torch or Ray are imported inside the command that
# needs them, so `orch --help` and the controller commands start fast.
from orchestrator import __version__
from orchestrator.client import connect_controller, down, resolve_address, up
from orchestrator.config.schema import RootConfig, is_plain_name
from orchestrator.config.typed import build, to_dict
from orchestrator.constants import DEFAULT_STATE_DIR, JOBS_DB, RAY_ADDRESS_ENV, STATE_DIR_ENV
from orchestrator.errors import ClusterError, ConfigError, JobNotFound, OrchError
from orchestrator.jobs.policy import job_demand
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.jobs.store import JobStore
from orchestrator.jobs_api import decode_jobs, encode_jobs, is_jobs_api_address, run_on_head


def _say(msg: str) -> None:
    print(f"[orch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _overrides(args) -> list[str]:
    # (only commands that compose call this)
    from orchestrator.config.compose import quote_value, with_config_dirs

    ov = list(args.overrides)
    if getattr(args, "address", None):
        ov.append(f"cluster.address={quote_value(args.address)}")
    if getattr(args, "state_dir", None):
        ov.append(f"state_dir={quote_value(os.path.abspath(args.state_dir))}")
    return with_config_dirs(ov, getattr(args, "config_dir", None) or [])


def _compose(args, after: Sequence[str] = ()) -> tuple[dict, RootConfig, list]:
    """The resolved config (a plain dict, then typed) and the pipeline's jobs, from conf/ and `args`."""
    # Lazy: composing loads boto3 (through orchestrator.storage), and Hydra when it runs.
    from orchestrator.config.compose import compose_dict, resolve_jobs  # (Hydra: not for --help)

    raw = compose_dict(_overrides(args))
    root = build(RootConfig, raw)
    return raw, root, resolve_jobs(root, after=after)


# ------------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    raw, root, jobs = _compose(args)
    if args.dry_run:
        _print_dry_run(raw, jobs)
        return 0
    from orchestrator.pipeline import run_pipeline  # (Ray, boto3: only when a pipeline runs)

    records = run_pipeline(root, jobs, say=_say, verbose=args.verbose)
    _print_summary(root, records)
    if args.debug:
        for r in records:
            if r.failure_detail:
                print(f"\n{r.id} failed:\n{r.failure_detail}", file=sys.stderr)
    return 0 if all(r.state.value == "SUCCEEDED" for r in records) else 1


def _print_dry_run(raw: dict, jobs) -> None:
    import yaml  # only --dry-run prints YAML

    print("# resolved config")
    print(yaml.safe_dump(raw, sort_keys=False, width=10**6, allow_unicode=True), end="")  # one line per value
    print("# resources (each job is admitted only when all its workers fit at once)")
    for j in jobs:
        rec = JobRecord(id=j.name, pipeline_id="", name=j.name, kind=j.kind, state=JobState.PENDING,
                        priority=j.priority, depends_on=list(j.depends_on), config=to_dict(j), created_at=0)
        per = ", ".join(f"{k}: {v:g}" for k, v in j.resources_per_worker().items())
        total = ", ".join(f"{k}: {v:g}" for k, v in job_demand(rec).items())
        after = f", after {', '.join(j.depends_on)}" if j.depends_on else ""
        count = (f"{j.workers} workers" if not j.max_workers
                 else f"{j.workers}-{j.max_workers} workers (elastic; the gang admitted is {j.workers})")
        print(f"{j.name}: {j.kind}, {count} x {{{per}}} = {{{total}}} ({j.cluster.placement_strategy}), "
              f"ZeRO-{j.deepspeed.stage} {j.deepspeed.precision} over {j.cluster.backend}, global batch "
              f"{j.trainer.global_batch_size} = {j.workers} x {j.trainer.micro_batch_size} x "
              f"{j.gradient_accumulation_steps(j.workers)} accumulation, {j.trainer.max_steps} steps{after}")


def _fmt(v, spec=".4f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _print_summary(root, records) -> None:
    print()
    print(f"{'JOB':<28} {'KIND':<9} {'STATE':<10} {'STEPS':>6} {'FIRST LOSS':>11} {'LAST LOSS':>10} {'EVAL LOSS':>10}")
    for r in records:
        m = r.metrics
        print(f"{r.id:<28} {r.kind:<9} {r.state.value:<10} {m.get('step', '-'):>6} {_fmt(m.get('first_loss')):>11} "
              f"{_fmt(m.get('loss')):>10} {_fmt(m.get('eval_loss')):>10}")
    for r in records:
        if r.failure_reason:
            print(f"{r.id}: {r.failure_reason}")
    scored = [r for r in records if r.metrics.get("qa_questions")]
    if scored:  # fine-tunes asked about facts only pretraining's stories state (orchestrator.train.qa_eval)
        print("held-out QA exact match: " + " vs ".join(
            f"{r.name}{' (from random weights)' if r.config.get('from_scratch') else ''} "
            f"{r.metrics['qa_correct']}/{r.metrics['qa_questions']} "
            f"({r.metrics['qa_correct'] / r.metrics['qa_questions']:.0%})" for r in scored))
    print()
    for r in records:
        if r.checkpoint:
            print(f"checkpoint  {r.id}: {r.checkpoint}")
        if r.export:
            print(f"weights     {r.id}: {r.export}")
    for r in records:
        if r.wandb.get("url") or r.wandb.get("dir"):
            print(f"W&B run     {r.id}: {r.wandb.get('url') or r.wandb['dir']}")
    if any(r.wandb.get("mode") == "offline" and r.wandb.get("dir") for r in records):
        print(f"            (offline: upload with `orch sync {records[0].pipeline_id}` once WANDB_API_KEY is set)")
    print(f"job records {root.state_dir} (`orch status`)")


# --------------------------------------------------------------------------------------- status
def _state_dir(args) -> str:
    path = os.path.abspath(args.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"the state folder {path} is a file; pass --state-dir (or {STATE_DIR_ENV}) a folder")
    return path


def _check_job_id(job: str) -> None:
    """A job id is one name (`p1a2b3c-pretrain`): it becomes part of paths in the store and the state
    folder, so `../x`, `/etc` or `a/b` are refused before anything reads or writes."""
    if not is_plain_name(job):
        raise ConfigError(f"{job!r} is not a job id: an id is one name like p1a2b3c-pretrain, without '/' or '..'; "
                          f"`orch status` lists the jobs")


def metrics_history(record: JobRecord, unreachable: dict | None = None) -> dict:
    """The job's metrics history from its run folder in the store: one row per logged step (what
    the model produced, after any resume), with the attempts and their markers. `unreachable`:
    stores that failed before (by root and endpoint), not asked again."""
    # Lazy: the storage backends load boto3.
    from orchestrator.checkpoint.layout import run_uri
    from orchestrator.storage import open_store
    from orchestrator.train.history import history_uri, read_history

    storage = record.config.get("storage") or {}
    run = run_uri(storage.get("root", ""), record.id)
    where = (storage.get("root"), storage.get("endpoint_url"))
    unreachable = {} if unreachable is None else unreachable
    if where in unreachable:
        return {"uri": history_uri(run), "error": unreachable[where]}
    try:
        store = open_store(storage["root"], endpoint_url=storage.get("endpoint_url"), region=storage.get("region"))
        return read_history(store, run)
    except Exception as e:  # noqa: BLE001 - status shows what it can
        first = (str(e).strip().splitlines() or [""])[0][:200]
        unreachable[where] = f"{type(e).__name__}: {first}"
        return {"uri": history_uri(run), "error": unreachable[where]}


def _history_summary(history: dict) -> dict:
    rows = history.pop("rows", [])
    return {**history, "rows": len(rows), "last": rows[-1] if rows else None}


def status_rows(records, metrics: str | None = None) -> list[dict]:
    """What `orch status --json` prints for each job: its record (`history`: its state changes)
    and, with `metrics`, its metrics history from the store (`metrics_history`): "rows" every row
    (one per logged step), "summary" how many and the last."""
    out, unreachable = [], {}
    for r in records:
        d = r.to_json()
        d.pop("config")
        d["workers"] = r.workers
        if metrics:
            history = metrics_history(r, unreachable)
            d["metrics_history"] = history if metrics == "rows" else _history_summary(history)
        out.append(d)
    return out


def _print_status(args, records) -> None:
    if args.json:
        print(json.dumps(status_rows(records, metrics="rows" if args.job else "summary"), indent=1))
        return
    print(f"{'JOB':<28} {'KIND':<9} {'STATE':<10} {'WORKERS':>7} {'STEP':>6} {'LOSS':>8} {'RESTARTS':>8}  DEPENDS ON")
    for r in records:
        m = r.metrics
        workers = str(m.get("world_size") or r.workers) if r.state.active else str(r.workers)
        if r.config.get("max_workers"):
            workers = f"{workers} ({r.workers}-{r.config['max_workers']})"
        print(f"{r.id:<28} {r.kind:<9} {r.state.value:<10} {workers:>7} {m.get('step', '-'):>6} "
              f"{_fmt(m.get('loss')):>8} {r.restarts:>8}  {', '.join(r.depends_on) or '-'}")
        if args.job:
            if r.wandb.get("url") or r.wandb.get("dir"):
                print(f"W&B run: {r.wandb.get('url') or r.wandb['dir']} ({r.wandb.get('mode', '?')}, "
                      f"group {r.wandb.get('group', r.pipeline_id)})")
            print(json.dumps(status_rows([r])[0], indent=1))
    for r in records:
        if r.failure_reason and not args.job:
            print(f"{r.id}: {r.failure_reason}")


def cmd_status(args) -> int:
    if args.job:
        _check_job_id(args.job)
    api = _jobs_api(args)
    if api:
        watch = ["--watch", "--interval", str(args.interval)] if args.watch else []
        return _on_head(args, api, ["status", *([args.job] if args.job else []), *(["--json"] if args.json else []),
                                    *watch])
    state_dir = _state_dir(args)
    address = resolve_address(args.address, state_dir)
    if address:
        with connect_controller(address, state_dir, start=False) as client:
            while True:
                records = [JobRecord.from_json(d) for d in client.status(args.job)]
                if args.watch:
                    print("\033[2J\033[H" if sys.stdout.isatty() else "", end="")
                    print(f"# {time.strftime('%H:%M:%S')}  {address}")
                _print_status(args, records)
                if not args.watch or all(r.state.terminal for r in records):
                    return 0
                sys.stdout.flush()
                time.sleep(args.interval)
    if not os.path.exists(os.path.join(state_dir, JOBS_DB)):
        raise ConfigError(f"no job records in {state_dir} and no cluster to ask; run `orch run` or `orch up` first, "
                          f"or pass --state-dir / --address")
    store = JobStore(state_dir)
    _print_status(args, [store.get(args.job)] if args.job else store.list())
    return 0


def cmd_sync(args) -> int:
    """Upload the offline W&B runs of a job, or of every job of a pipeline, with `wandb sync`
    (again after a partial upload: the run id and steps are the same, so it completes the run)."""
    import subprocess

    _check_job_id(args.target)
    state_dir = _state_dir(args)
    address = resolve_address(args.address, state_dir)
    if address:
        with connect_controller(address, state_dir, start=False) as client:
            records = [JobRecord.from_json(d) for d in client.status(None)]
    elif os.path.exists(os.path.join(state_dir, JOBS_DB)):
        records = JobStore(state_dir).list()
    else:
        raise ConfigError(f"no job records in {state_dir} and no cluster to ask; pass --state-dir / --address")
    chosen = [r for r in records if args.target in (r.id, r.pipeline_id)]
    if not chosen:
        raise JobNotFound(f"no job or pipeline {args.target!r} in {state_dir}; `orch status` lists the jobs")
    failed = 0
    for r in chosen:
        folder = r.wandb.get("dir")
        if not folder or not os.path.isdir(folder):
            _say(f"{r.id}: no offline W&B run to upload ({r.wandb.get('url') or 'tracking off, or not started'})")
            continue
        _say(f"{r.id}: wandb sync {folder}")
        done = subprocess.run([sys.executable, "-m", "wandb", "sync", "--include-synced", folder])
        if done.returncode != 0:
            failed += 1
            print(f"orch: {r.id}: `wandb sync` failed (exit {done.returncode}); run `orch sync {args.target}` again "
                  f"(set WANDB_API_KEY, check the network)", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------- the persistent controller
def _jobs_api(args) -> str | None:
    """The head's Jobs API (http[s]://HEAD:8265) when --address or RAY_ADDRESS is one: the command
    then runs on the head as a Ray job (orchestrator.jobs_api)."""
    address = args.address or os.environ.get(RAY_ADDRESS_ENV)
    return address if is_jobs_api_address(address) else None


def _on_head(args, address: str, argv: list[str]) -> int:
    """`orch ARGV` on the head: --state-dir (a path there) and --debug go along when given."""
    given = getattr(args, "given_state_dir", args.state_dir)
    head = [*(["--debug"] if args.debug else []), *argv, *(["--state-dir", given] if given else [])]
    return run_on_head(address, head)


def _controller(args, start: bool = False):
    """A client of the controller on the cluster `args` names (--address, RAY_ADDRESS, `orch up`'s);
    `start`: start the controller there if it is not running."""
    state_dir = _state_dir(args)
    address = resolve_address(args.address, state_dir)
    if not address:
        raise ClusterError(f"no cluster to submit to: start one with `orch up` (state folder {state_dir}), or pass "
                           f"--address / set RAY_ADDRESS; `orch run` runs a pipeline on an embedded cluster instead")
    return connect_controller(address, state_dir, start=start)


def _job_controller(args, action: str):
    """The controller, for a command on one job (logs, cancel, scale). The id is checked first; with
    no cluster to ask, the state folder's records say whether the job exists at all."""
    _check_job_id(args.job)
    state_dir = _state_dir(args)
    if not resolve_address(args.address, state_dir):
        if os.path.exists(os.path.join(state_dir, JOBS_DB)):
            JobStore(state_dir).get(args.job)  # an unknown id: JobNotFound, which names it
        raise ClusterError(f"no cluster to {action} job {args.job} on: the controller runs on the cluster `orch up` "
                           f"started (state folder {state_dir}); start it again, or pass --address / set RAY_ADDRESS")
    return _controller(args)


def cmd_up(args) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1 (the head is one), got {args.nodes}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be a TCP port (1-65535), got {args.port}; the default is 6379")
    if args.cpus_per_node is not None and args.cpus_per_node < 1:  # (0 must not mean "the default")
        raise ConfigError(f"--cpus-per-node must be at least 1, got {args.cpus_per_node}; leave it out to share "
                          f"this machine's CPUs over the nodes")
    up(_state_dir(args), args.nodes, args.cpus_per_node or max(1, (os.cpu_count() or 1) // args.nodes), args.port, _say)
    return 0


def cmd_down(args) -> int:
    down(_state_dir(args), _say)
    return 0


def cmd_submit(args) -> int:
    args.given_state_dir = args.state_dir
    args.state_dir = _state_dir(args)
    for job in args.after:
        _check_job_id(job)
    if args.jobs_json:  # on the head, sent by `orch submit --address http://...`: composed there
        job_dicts = decode_jobs(args.jobs_json)
    else:
        raw, _, jobs = _compose(args, after=args.after)
        from orchestrator.preflight import check_no_secrets  # (it reaches the storage backends: boto3)

        for job in jobs:
            check_no_secrets(job)
        if args.dry_run:
            _print_dry_run(raw, jobs)
            return 0
        job_dicts = [to_dict(j) for j in jobs]
        api = _jobs_api(args)
        if api:
            after = [w for job in args.after for w in ("--after", job)]
            return _on_head(args, api, ["submit", "--jobs-json", encode_jobs(job_dicts), *after])
    with _controller(args, start=True) as client:
        ids = client.submit(job_dicts, list(args.after))
    for job_id in ids:
        print(job_id)
    return 0


def cmd_logs(args) -> int:
    _check_job_id(args.job)
    api = _jobs_api(args)
    if api:
        return _on_head(args, api, ["logs", args.job, *(["--follow"] if args.follow else [])])
    with _job_controller(args, "read the logs of") as client:
        offset = 0
        while True:
            out = client.logs(args.job, offset)
            print(out["text"], end="", flush=True)
            offset = out["offset"]
            if not args.follow or out["terminal"]:
                return 0
            time.sleep(1.0)


def cmd_cancel(args) -> int:
    _check_job_id(args.job)
    api = _jobs_api(args)
    if api:
        return _on_head(args, api, ["cancel", args.job, *(["--now"] if args.now else [])])
    with _job_controller(args, "cancel") as client:
        rec = client.cancel(args.job, args.now)
    if rec["state"] == "CANCELLED":
        print(f"{args.job}: CANCELLED")
    else:
        print(f"{args.job}: cancelling: checkpointing step {rec['metrics'].get('step', 0)}+, then stopping "
              f"(`orch status {args.job}`)")
    return 0


def cmd_scale(args) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}; `orch cancel {args.job}` stops a job")
    _check_job_id(args.job)
    api = _jobs_api(args)
    if api:
        return _on_head(args, api, ["scale", args.job, "--workers", str(args.workers)])
    with _job_controller(args, "scale") as client:
        client.scale(args.job, args.workers)
    print(f"{args.job}: scaling to {args.workers} workers: checkpoint, then restart from it (`orch status {args.job}`)")
    return 0


# ----------------------------------------------------------------------------------------- data
def cmd_data_prepare(args) -> int:
    """`orch data prepare [SRC DST] [OVERRIDES]` (orchestrator.data.plan says what is prepared)."""
    # Lazy: these load boto3 and numpy (and Hydra, Ray when they run).
    from orchestrator.config.compose import compose_root  # (Hydra, boto3, numpy: not for --help)
    from orchestrator.data.plan import datasets_to_prepare, describe, prepare_datasets

    uris = [a for a in args.overrides if "=" not in a]
    args.overrides = [a for a in args.overrides if "=" in a]
    root = compose_root(_overrides(args))
    datasets = datasets_to_prepare(root, uris)
    if args.dry_run:
        print("\n".join(describe(d) for d in datasets))
        return 0
    prepare_datasets(root, datasets, say=_say, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------------- export/generate
def cmd_export(args) -> int:
    from orchestrator import artifacts  # loads boto3; torch when a model is loaded

    source = artifacts.resolve(args.checkpoint, _state_dir(args), args.endpoint_url)
    artifact = artifacts.load(source)
    out = artifacts.write_hf(artifact, args.dir, overwrite=args.overwrite)
    _say(f"exported {source.kind} {source.uri} -> {out} (Hugging Face {artifacts.hf_architecture(artifact)}, "
         f"safetensors)")
    return 0


def cmd_generate(args) -> int:
    from orchestrator import artifacts  # loads boto3; torch when a model is loaded

    if args.max_new_tokens <= 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise ConfigError("--max-new-tokens and --top-k must be > 0 and --temperature >= 0 "
                          f"(got {args.max_new_tokens}, {args.top_k}, {args.temperature})")
    artifact = artifacts.load(artifacts.resolve(args.checkpoint, _state_dir(args), args.endpoint_url))
    text = artifacts.sample(artifact, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0


# --------------------------------------------------------------------------------------- parser
def _option(*flags: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser of one option: the commands that take it list it in `parents`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


ADDRESS = _option("--address", help="Ray cluster address: HOST:PORT of its GCS, or http://HEAD:8265 (the head's Ray "
                                    "Jobs API: submit/status/logs/cancel/scale then run on the head as a Ray job) "
                                    "(default: RAY_ADDRESS, else the cluster `orch up` started; run and data "
                                    "prepare start an embedded local one instead)")
STATE_DIR = _option("--state-dir", help=f"state folder: job records, the cluster `orch up` started "
                                        f"(default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
ENDPOINT_URL = _option("--endpoint-url", help="S3 endpoint for s3:// URIs (default: AWS_ENDPOINT_URL_S3)")
CONFIG_DIR = _option("--config-dir", action="append", default=[], metavar="DIR",
                     help="a folder of your own config groups (DIR/model/my_model.yaml -> model=my_model), searched "
                          "after the built-in ones; repeatable (the same as hydra.searchpath=[file://DIR])")
DRY_RUN_HELP = "print the resolved config and resources; start or submit nothing"


def _add_run(sub) -> None:
    run = sub.add_parser("run", parents=[ADDRESS, STATE_DIR, CONFIG_DIR],
                         help="run the pipeline (pretrain -> fine-tune) on an embedded or given Ray cluster")
    run.add_argument("overrides", nargs="*",
                     help="Hydra overrides, e.g. model=gpt_tiny trainer.max_steps=40 deepspeed=zero3")
    run.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    run.add_argument("--verbose", action="store_true", help="stream Ray and worker logs")
    run.set_defaults(func=cmd_run)


def _add_cluster_commands(sub) -> None:
    upp = sub.add_parser("up", parents=[STATE_DIR],
                         help="start a persistent local Ray cluster (several raylets with --nodes) and the controller")
    upp.add_argument("--nodes", type=int, default=1, help="raylets, the head included (default 1)")
    upp.add_argument("--cpus-per-node", type=int, default=None,
                     help="CPUs each node offers (default: this machine's / nodes)")
    upp.add_argument("--port", type=int, default=6379, help="the head's GCS port (default 6379)")
    upp.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", parents=[STATE_DIR], help="stop the cluster `orch up` started (job records stay)")
    dn.set_defaults(func=cmd_down)


def _add_job_commands(sub) -> None:
    """submit, status, logs, cancel, scale: they talk to the controller (status reads the state folder without one)."""
    shared = [ADDRESS, STATE_DIR]
    sb = sub.add_parser("submit", parents=[*shared, CONFIG_DIR],
                        help="queue a pipeline's jobs on the controller (prints the job ids)")
    sb.add_argument("overrides", nargs="*",
                    help="Hydra overrides, e.g. pipeline=pretrain pipeline.jobs.pretrain.priority=5")
    sb.add_argument("--after", action="append", default=[], metavar="JOB",
                    help="start only after JOB succeeded (and fine-tune from its weights); repeatable")
    sb.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    sb.add_argument("--jobs-json", help=argparse.SUPPRESS)  # resolved jobs, from `orch submit --address http://...`
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", parents=shared, help="list jobs and their states")
    st.add_argument("job", nargs="?", help="one job id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until every job listed has ended")
    st.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    st.set_defaults(func=cmd_status)

    sy = sub.add_parser("sync", parents=shared, help="upload the offline W&B runs of a job or a pipeline")
    sy.add_argument("target", metavar="JOB|PIPELINE", help="a job id, or a pipeline id (all its jobs)")
    sy.set_defaults(func=cmd_sync)

    lg = sub.add_parser("logs", parents=shared, help="a job's events: state changes, progress, failures")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(func=cmd_logs)

    cn = sub.add_parser("cancel", parents=shared, help="checkpoint a job, then stop it (its dependents become BLOCKED)")
    cn.add_argument("job")
    cn.add_argument("--now", action="store_true", help="stop at once, without a checkpoint")
    cn.set_defaults(func=cmd_cancel)

    sc = sub.add_parser("scale", parents=shared,
                        help="restart a running job at N workers from a checkpoint (same global batch)")
    sc.add_argument("job")
    sc.add_argument("--workers", type=int, required=True)
    sc.set_defaults(func=cmd_scale)


def _add_model_commands(sub) -> None:
    shared = [STATE_DIR, ENDPOINT_URL]
    exp = sub.add_parser("export", parents=shared,
                         help="write a checkpoint as a Hugging Face folder (model class, safetensors, tokenizer)")
    exp.add_argument("checkpoint", help="job id, checkpoint URI (.../checkpoints/step-N), run URI or export URI")
    exp.add_argument("dir", help="output folder")
    exp.add_argument("--overwrite", action="store_true",
                     help="write into DIR even if it holds files orch did not write")
    exp.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", parents=shared,
                         help="sample text from a checkpoint, export or Hugging Face folder")
    gen.add_argument("checkpoint", help="job id, checkpoint URI, run URI, export URI or HF folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="dataset commands")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prep = dsub.add_parser("prepare", parents=[ADDRESS, STATE_DIR, CONFIG_DIR],
                           help="tokenize a corpus (SRC: .txt/.jsonl files, local or s3://) into shards at DST")
    prep.add_argument("overrides", nargs="*", metavar="[SRC DST] OVERRIDES",
                      help="source and destination URIs, then Hydra overrides "
                           "(data.seq_len=..., data=qa, storage=s3 ...)")
    prep.add_argument("--dry-run", action="store_true", help="print what would be prepared, and where")
    prep.add_argument("--overwrite", action="store_true",
                      help="prepare into DST even if it holds files orch did not write (they may be replaced)")
    prep.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch",
                                description="Pretrain then fine-tune language models on Ray Train + DeepSpeed ZeRO.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_cluster_commands, _add_job_commands, _add_model_commands, _add_data_commands):
        add(sub)
    return p


def _exit_on_sigterm(signum, frame) -> None:
    # Unwind normally (finally blocks record interrupted jobs and stop the embedded cluster).
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`orch run --state-dir s model=gpt_tiny`).
    if extra:
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except OrchError as e:
        if args.debug:
            raise
        print(f"orch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("orch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
