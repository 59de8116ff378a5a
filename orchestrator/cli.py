"""`orch`: the command line. Parse, build, run; the logic lives in the modules it calls.

    orch run [OVERRIDES...] [--dry-run]     pretrain -> fine-tune on an embedded (or given) Ray cluster
    orch up [--nodes N] / orch down         a persistent local Ray cluster with the controller
    orch submit [OVERRIDES...] [--after J]  queue a pipeline's jobs on the controller; prints the ids
    orch status [JOB] [--json] [--watch]    job records (from the controller, else the state folder)
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

from orchestrator.constants import DEFAULT_STATE_DIR, STATE_DIR_ENV
from orchestrator.errors import OrchError


def _say(msg: str) -> None:
    print(f"[orch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _quoted(value: str) -> str:
    """A Hydra override value taken literally (commas, brackets, spaces and all)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _overrides(args) -> list[str]:
    ov = list(args.overrides)
    if getattr(args, "address", None):
        ov.append(f"cluster.address={_quoted(args.address)}")
    if getattr(args, "state_dir", None):
        ov.append(f"state_dir={_quoted(os.path.abspath(args.state_dir))}")
    return ov


# ------------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    from orchestrator.config.compose import compose_dict, resolve_jobs
    from orchestrator.config.typed import build
    from orchestrator.config.schema import RootConfig

    raw = compose_dict(_overrides(args))
    root = build(RootConfig, raw)
    jobs = resolve_jobs(root)
    if args.dry_run:
        _print_dry_run(raw, jobs)
        return 0
    from orchestrator.pipeline import run_pipeline

    records = run_pipeline(root, jobs, say=_say, verbose=args.verbose)
    _print_summary(root, records)
    if args.debug:
        for r in records:
            if r.failure_detail:
                print(f"\n{r.id} failed:\n{r.failure_detail}", file=sys.stderr)
    return 0 if all(r.state.value == "SUCCEEDED" for r in records) else 1


def _print_dry_run(raw: dict, jobs) -> None:
    import yaml

    from orchestrator.jobs.policy import job_demand
    from orchestrator.jobs.record import JobRecord
    from orchestrator.jobs.state import JobState
    from orchestrator.config.typed import to_dict

    print("# resolved config")
    print(yaml.safe_dump(raw, sort_keys=False, width=10**6), end="")  # one line per value
    print("# resources (each job is admitted only when all its workers fit at once)")
    for j in jobs:
        rec = JobRecord(id=j.name, pipeline_id="", name=j.name, kind=j.kind, state=JobState.PENDING, priority=j.priority,
                        depends_on=list(j.depends_on), config=to_dict(j), created_at=0)
        per = ", ".join(f"{k}: {v:g}" for k, v in j.resources_per_worker().items())
        total = ", ".join(f"{k}: {v:g}" for k, v in job_demand(rec).items())
        after = f", after {', '.join(j.depends_on)}" if j.depends_on else ""
        count = f"{j.workers} workers" if not j.max_workers else f"{j.workers}-{j.max_workers} workers (elastic; the gang admitted is {j.workers})"
        print(f"{j.name}: {j.kind}, {count} x {{{per}}} = {{{total}}} ({j.cluster.placement_strategy}), "
              f"ZeRO-{j.deepspeed.stage} {j.deepspeed.precision} over {j.cluster.backend}, global batch "
              f"{j.trainer.global_batch_size} = {j.workers} x {j.trainer.micro_batch_size} x {j.gradient_accumulation_steps(j.workers)} "
              f"accumulation, {j.trainer.max_steps} steps{after}")


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
    print()
    for r in records:
        if r.checkpoint:
            print(f"checkpoint  {r.id}: {r.checkpoint}")
        if r.export:
            print(f"weights     {r.id}: {r.export}")
    for r in records:
        if r.wandb.get("dir"):
            print(f"W&B run     {r.id}: {r.wandb['dir']}")
    if root.tracking.mode == "offline" and any(r.wandb.get("dir") for r in records):
        print("            (offline: upload with `wandb sync DIR` once WANDB_API_KEY is set)")
    print(f"job records {root.state_dir} (`orch status`)")


# --------------------------------------------------------------------------------------- status
def _state_dir(args) -> str:
    return os.path.abspath(args.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def status_rows(records) -> list[dict]:
    """What `orch status --json` prints for each job."""
    out = []
    for r in records:
        d = r.to_json()
        d.pop("config")
        d["workers"] = r.workers
        out.append(d)
    return out


def _records(dicts: list[dict]):
    from orchestrator.jobs.record import JobRecord
    from orchestrator.jobs.state import JobState

    return [JobRecord(**{**d, "state": JobState(d["state"])}) for d in dicts]


def _print_status(args, records) -> None:
    if args.json:
        print(json.dumps(status_rows(records), indent=1))
        return
    print(f"{'JOB':<28} {'KIND':<9} {'STATE':<10} {'WORKERS':>7} {'STEP':>6} {'LOSS':>8} {'RESTARTS':>8}  DEPENDS ON")
    for r in records:
        m = r.metrics
        workers = str(m.get("world_size") or r.workers) if r.state.active else str(r.workers)
        if r.config.get("max_workers"):
            workers = f"{workers} ({r.workers}-{r.config['max_workers']})"
        print(f"{r.id:<28} {r.kind:<9} {r.state.value:<10} {workers:>7} {m.get('step', '-'):>6} {_fmt(m.get('loss')):>8} "
              f"{r.restarts:>8}  {', '.join(r.depends_on) or '-'}")
        if args.job:
            print(json.dumps(status_rows([r])[0], indent=1))
    for r in records:
        if r.failure_reason and not args.job:
            print(f"{r.id}: {r.failure_reason}")


def cmd_status(args) -> int:
    from orchestrator.client import connect_controller, resolve_address
    from orchestrator.constants import JOBS_DB
    from orchestrator.errors import ConfigError
    from orchestrator.jobs.store import JobStore

    state_dir = _state_dir(args)
    address = resolve_address(args.address, state_dir)
    if address:
        with connect_controller(address, state_dir, start=False) as client:
            while True:
                records = _records(client.status(args.job))
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


# ------------------------------------------------------------------- the persistent controller
def _address_or_fail(args, state_dir: str) -> str:
    from orchestrator.client import resolve_address
    from orchestrator.errors import ClusterError

    address = resolve_address(args.address, state_dir)
    if not address:
        raise ClusterError(f"no cluster to submit to: start one with `orch up` (state folder {state_dir}), or pass "
                           f"--address / set RAY_ADDRESS; `orch run` runs a pipeline on an embedded cluster instead")
    return address


def cmd_up(args) -> int:
    from orchestrator.client import up

    up(_state_dir(args), args.nodes, args.cpus_per_node or max(1, (os.cpu_count() or 1) // args.nodes), args.port, _say)
    return 0


def cmd_down(args) -> int:
    from orchestrator.client import down

    down(_state_dir(args), _say)
    return 0


def cmd_submit(args) -> int:
    from orchestrator.client import connect_controller
    from orchestrator.config.compose import compose_dict, resolve_jobs
    from orchestrator.config.schema import RootConfig
    from orchestrator.config.typed import build, to_dict
    from orchestrator.preflight import check_no_secrets

    state_dir = _state_dir(args)
    args.state_dir = state_dir
    raw = compose_dict(_overrides(args))
    root = build(RootConfig, raw)
    jobs = resolve_jobs(root, after=args.after)
    for job in jobs:
        check_no_secrets(job)
    if args.dry_run:
        _print_dry_run(raw, jobs)
        return 0
    with connect_controller(_address_or_fail(args, state_dir), state_dir) as client:
        ids = client.submit([to_dict(j) for j in jobs], list(args.after))
    for job_id in ids:
        print(job_id)
    return 0


def cmd_logs(args) -> int:
    from orchestrator.client import connect_controller

    state_dir = _state_dir(args)
    with connect_controller(_address_or_fail(args, state_dir), state_dir, start=False) as client:
        offset = 0
        while True:
            out = client.logs(args.job, offset)
            print(out["text"], end="", flush=True)
            offset = out["offset"]
            if not args.follow or out["terminal"]:
                return 0
            time.sleep(1.0)


def cmd_cancel(args) -> int:
    from orchestrator.client import connect_controller

    state_dir = _state_dir(args)
    with connect_controller(_address_or_fail(args, state_dir), state_dir, start=False) as client:
        rec = client.cancel(args.job, args.now)
    if rec["state"] == "CANCELLED":
        print(f"{args.job}: CANCELLED")
    else:
        print(f"{args.job}: cancelling: checkpointing step {rec['metrics'].get('step', 0)}+, then stopping "
              f"(`orch status {args.job}`)")
    return 0


def cmd_scale(args) -> int:
    from orchestrator.client import connect_controller

    state_dir = _state_dir(args)
    with connect_controller(_address_or_fail(args, state_dir), state_dir, start=False) as client:
        client.scale(args.job, args.workers)
    print(f"{args.job}: scaling to {args.workers} workers: checkpoint, then restart from it (`orch status {args.job}`)")
    return 0


# ----------------------------------------------------------------------------------------- data
def cmd_data_prepare(args) -> int:
    """`orch data prepare [SRC DST] [OVERRIDES]`: SRC/DST prepare one dataset (the `data` group's
    settings, e.g. data.seq_len=1024); without them, every dataset the pipeline's jobs use."""
    import dataclasses

    from orchestrator.cluster import connect
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.data.prepare import check_prepare_destination, prepare_dataset
    from orchestrator.errors import ConfigError
    from orchestrator.storage import open_store, to_uri

    positional = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    args.overrides = overrides
    root = compose_root(_overrides(args))
    if len(positional) == 2:
        src, dst = (to_uri(p) if "://" not in p else p for p in positional)
        name = dst.rstrip("/").rsplit("/", 1)[-1]
        data = dataclasses.replace(root.data, source=src, uri=dst.rstrip("/"), name=name)
        if data.kind == "sft" and (not data.tokenizer_uri or data.tokenizer_uri == root.data.uri):
            raise ConfigError("an sft dataset needs the tokenizer of a prepared dataset or model: set data.tokenizer_uri=URI")
        datasets = [data]
    elif not positional:
        datasets = []
        for job in resolve_jobs(root):
            if job.data.uri not in [d.uri for d in datasets]:
                datasets.append(job.data)
    else:
        raise ConfigError(f"orch data prepare takes SRC and DST (or neither), got {' '.join(positional)!r}; "
                          f"e.g. orch data prepare s3://raw/texts/ s3://bucket/datasets/web data.seq_len=1024")
    if args.dry_run:
        for d in datasets:
            print(f"{d.kind} dataset '{d.name}' from {d.source} -> {d.uri} (seq_len {d.seq_len}, vocab {d.vocab_size})")
        return 0
    storage = root.storage
    stores = [open_store(d.uri, endpoint_url=storage.endpoint_url, region=storage.region) for d in datasets]
    for store, d in zip(stores, datasets):  # refuse a bad destination before starting a cluster
        store.check(d.uri)
        check_prepare_destination(store, d, overwrite=args.overwrite)
    with connect(root.cluster, needed_cpus=1):
        for store, d in zip(stores, datasets):
            m = prepare_dataset(store, d, progress=_say, overwrite=args.overwrite)
            _say(f"dataset {m.name} ready at {d.uri}: {m.splits['train'].tokens:,} train tokens, "
                 f"{m.splits['train'].samples:,} samples of {m.seq_len} tokens")
    return 0


# --------------------------------------------------------------------------------- export/generate
def cmd_export(args) -> int:
    from orchestrator import artifacts

    source = artifacts.resolve(args.checkpoint, _state_dir(args), args.endpoint_url)
    artifact = artifacts.load(source)
    out = artifacts.write_hf(artifact, args.dir, overwrite=args.overwrite)
    _say(f"exported {source.kind} {source.uri} -> {out} (Hugging Face GPT2LMHeadModel, safetensors)")
    return 0


def cmd_generate(args) -> int:
    from orchestrator import artifacts
    from orchestrator.errors import ConfigError

    if args.max_new_tokens <= 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise ConfigError("--max-new-tokens and --top-k must be > 0 and --temperature >= 0 "
                          f"(got {args.max_new_tokens}, {args.top_k}, {args.temperature})")
    artifact = artifacts.load(artifacts.resolve(args.checkpoint, _state_dir(args), args.endpoint_url))
    text = artifacts.sample(artifact, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Pretrain then fine-tune GPT models on Ray Train + DeepSpeed ZeRO.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from orchestrator import __version__

    p.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline (pretrain -> fine-tune) on an embedded or given Ray cluster")
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt_tiny trainer.max_steps=40 deepspeed=zero3")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and resources, start nothing")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")
    run.add_argument("--state-dir", help=f"state folder (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    run.add_argument("--verbose", action="store_true", help="stream Ray and worker logs")
    run.set_defaults(func=cmd_run)

    addr_help = "Ray cluster address (default: RAY_ADDRESS, else the cluster `orch up` started)"
    sd_help = f"state folder (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})"

    upp = sub.add_parser("up", help="start a persistent local Ray cluster (several raylets with --nodes) and the controller")
    upp.add_argument("--nodes", type=int, default=1, help="raylets, the head included (default 1)")
    upp.add_argument("--cpus-per-node", type=int, default=None, help="CPUs each node offers (default: this machine's / nodes)")
    upp.add_argument("--port", type=int, default=6379, help="the head's GCS port (default 6379)")
    upp.add_argument("--state-dir", help=sd_help)
    upp.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", help="stop the cluster `orch up` started (job records stay)")
    dn.add_argument("--state-dir", help=sd_help)
    dn.set_defaults(func=cmd_down)

    sb = sub.add_parser("submit", help="queue a pipeline's jobs on the controller (prints the job ids)")
    sb.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline=pretrain pipeline.jobs.pretrain.priority=5")
    sb.add_argument("--after", action="append", default=[], metavar="JOB",
                    help="start only after JOB succeeded (and fine-tune from its weights); repeatable")
    sb.add_argument("--dry-run", action="store_true", help="print the resolved config and resources, submit nothing")
    sb.add_argument("--address", help=addr_help)
    sb.add_argument("--state-dir", help=sd_help)
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="list jobs and their states")
    st.add_argument("job", nargs="?", help="one job id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until every job listed has ended")
    st.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    st.add_argument("--address", help=addr_help)
    st.add_argument("--state-dir", help=sd_help)
    st.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="a job's events: state changes, progress, failures")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--address", help=addr_help)
    lg.add_argument("--state-dir", help=sd_help)
    lg.set_defaults(func=cmd_logs)

    cn = sub.add_parser("cancel", help="checkpoint a job, then stop it (its dependents become BLOCKED)")
    cn.add_argument("job")
    cn.add_argument("--now", action="store_true", help="stop at once, without a checkpoint")
    cn.add_argument("--address", help=addr_help)
    cn.add_argument("--state-dir", help=sd_help)
    cn.set_defaults(func=cmd_cancel)

    sc = sub.add_parser("scale", help="restart a running job at N workers from a checkpoint (same global batch)")
    sc.add_argument("job")
    sc.add_argument("--workers", type=int, required=True)
    sc.add_argument("--address", help=addr_help)
    sc.add_argument("--state-dir", help=sd_help)
    sc.set_defaults(func=cmd_scale)

    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (GPT2LMHeadModel, safetensors, tokenizer)")
    exp.add_argument("checkpoint", help="job id, checkpoint URI (.../checkpoints/step-N), run URI or export URI")
    exp.add_argument("dir", help="output folder")
    exp.add_argument("--state-dir", help="state folder (to find job ids)")
    exp.add_argument("--endpoint-url", help="S3 endpoint for s3:// URIs (default: AWS_ENDPOINT_URL_S3)")
    exp.add_argument("--overwrite", action="store_true", help="write into DIR even if it holds files orch did not write")
    exp.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="sample text from a checkpoint, export or Hugging Face folder")
    gen.add_argument("checkpoint", help="job id, checkpoint URI, run URI, export URI or HF folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--state-dir", help="state folder (to find job ids)")
    gen.add_argument("--endpoint-url", help="S3 endpoint for s3:// URIs (default: AWS_ENDPOINT_URL_S3)")
    gen.set_defaults(func=cmd_generate)

    data = sub.add_parser("data", help="dataset commands")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prep = dsub.add_parser("prepare", help="tokenize a corpus (SRC: .txt/.jsonl files, local or s3://) into shards at DST")
    prep.add_argument("overrides", nargs="*", metavar="[SRC DST] OVERRIDES",
                      help="source and destination URIs, then Hydra overrides (data.seq_len=..., data=qa, storage=s3 ...)")
    prep.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local cluster)")
    prep.add_argument("--state-dir", help="state folder")
    prep.add_argument("--dry-run", action="store_true", help="print what would be prepared, and where")
    prep.add_argument("--overwrite", action="store_true",
                      help="prepare into DST even if it holds files orch did not write (they may be replaced)")
    prep.set_defaults(func=cmd_data_prepare)
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
