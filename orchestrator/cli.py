"""`orch`: the command line. Parse, build, run; the logic lives in the modules it calls.

    orch run [OVERRIDES...] [--dry-run]     pretrain -> fine-tune on an embedded (or given) Ray cluster
    orch status [JOB] [--json]              job records from the state folder
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
        print(f"{j.name}: {j.kind}, {j.workers} workers x {{{per}}} = {{{total}}} ({j.cluster.placement_strategy}), "
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


def cmd_status(args) -> int:
    from orchestrator.errors import ConfigError
    from orchestrator.jobs.store import JobStore
    from orchestrator.constants import JOBS_DB

    state_dir = _state_dir(args)
    if not os.path.exists(os.path.join(state_dir, JOBS_DB)):
        raise ConfigError(f"no job records in {state_dir}; run `orch run` first, or pass --state-dir / set {STATE_DIR_ENV}")
    store = JobStore(state_dir)
    records = [store.get(args.job)] if args.job else store.list()
    if args.json:
        print(json.dumps(status_rows(records), indent=1))
        return 0
    print(f"{'JOB':<28} {'KIND':<9} {'STATE':<10} {'WORKERS':>7} {'STEP':>6} {'LOSS':>8}  DEPENDS ON")
    for r in records:
        m = r.metrics
        print(f"{r.id:<28} {r.kind:<9} {r.state.value:<10} {r.workers:>7} {m.get('step', '-'):>6} {_fmt(m.get('loss')):>8}  "
              f"{', '.join(r.depends_on) or '-'}")
        if args.job:
            print(json.dumps(status_rows([r])[0], indent=1))
    return 0


# ----------------------------------------------------------------------------------------- data
def cmd_data_prepare(args) -> int:
    """`orch data prepare [SRC DST] [OVERRIDES]`: SRC/DST prepare one dataset (the `data` group's
    settings, e.g. data.seq_len=1024); without them, every dataset the pipeline's jobs use."""
    import dataclasses

    from orchestrator.cluster import connect
    from orchestrator.config.compose import compose_root, resolve_jobs
    from orchestrator.data.prepare import prepare_dataset
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
    with connect(root.cluster, needed_cpus=1):
        for d in datasets:
            store = open_store(d.uri, endpoint_url=storage.endpoint_url, region=storage.region)
            store.check(d.uri)
            m = prepare_dataset(store, d, progress=_say)
            _say(f"dataset {m.name} ready at {d.uri}: {m.splits['train'].tokens:,} train tokens, "
                 f"{m.splits['train'].samples:,} samples of {m.seq_len} tokens")
    return 0


# --------------------------------------------------------------------------------- export/generate
def cmd_export(args) -> int:
    from orchestrator import artifacts

    source = artifacts.resolve(args.checkpoint, _state_dir(args), args.endpoint_url)
    artifact = artifacts.load(source)
    out = artifacts.write_hf(artifact, args.dir)
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

    st = sub.add_parser("status", help="list jobs and their states")
    st.add_argument("job", nargs="?", help="one job id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--state-dir", help=f"state folder (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    st.set_defaults(func=cmd_status)

    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (GPT2LMHeadModel, safetensors, tokenizer)")
    exp.add_argument("checkpoint", help="job id, checkpoint URI (.../checkpoints/step-N), run URI or export URI")
    exp.add_argument("dir", help="output folder")
    exp.add_argument("--state-dir", help="state folder (to find job ids)")
    exp.add_argument("--endpoint-url", help="S3 endpoint for s3:// URIs (default: AWS_ENDPOINT_URL_S3)")
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
