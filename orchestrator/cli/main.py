"""`orch`: the command line. Parse, build, run; the logic lives in the modules it calls.

    orch run [OVERRIDES...] [--dry-run]     pretrain -> fine-tune on an embedded (or given) Ray cluster
    orch run --resume [OVERRIDES...]        continue the interrupted `orch run` of these overrides
    orch run|submit -m OVERRIDES...         a sweep: one pipeline per combination (Hydra's syntax)
    orch up [--nodes N] / orch down         a persistent local Ray cluster with the controller
    orch submit [OVERRIDES...] [--after J]  queue a pipeline's jobs on the controller; prints the ids
    orch status [JOB] [--json] [--watch]    job records (from the controller, else the state folder)
    orch sync JOB|PIPELINE                  upload the jobs' offline W&B runs (`wandb sync`)
    orch report JOB|PIPELINE [--out DIR]    an HTML page and PNG plots of the jobs' training
    orch logs JOB [-f] [--rank N]           a job's workers' output among its events (--controller: events only)
    orch cancel JOB [--now]                 checkpoint, then stop (--now: stop at once)
    orch scale JOB --workers N              checkpoint, restart at N workers from it
    orch retry JOB                          queue a FAILED or CANCELLED job again, from its last checkpoint
    orch queue [--json]                     each queue's quota, use and share; why each waiting job waits
    orch queue set [OVERRIDES...]           replace the cluster's queues (conf/queues/) on the running controller
    orch nodes [--json]                     the nodes quarantined after repeated failures: until when, and why
    orch nodes release NODE                 let a quarantined node take workers again now
    orch export CHECKPOINT DIR              a checkpoint as a Hugging Face folder
    orch generate CHECKPOINT --prompt TEXT  sample from a model (KV cache)
    orch data prepare [OVERRIDES...]        tokenize the pipeline's datasets into the store
    orch completion bash|zsh|tcsh           a shell completion script (source <(orch completion bash))

Errors print one line and exit 2 (usage, config, input) or 1 (a job failed); --debug adds the
traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# Module-level imports are the standard library and the parts of orchestrator built on it alone;
# modules that load Hydra, boto3, numpy, YAML, torch or Ray are imported inside the command that
# needs them, so `orch --help` and the controller commands start fast.
from orchestrator import __version__
from orchestrator.cli.jobs import (
    cmd_cancel,
    cmd_logs,
    cmd_report,
    cmd_retry,
    cmd_scale,
    cmd_status,
    cmd_submit,
    cmd_sync,
)
from orchestrator.cli.nodes import cmd_nodes
from orchestrator.cli.queue import cmd_queue
from orchestrator.cli.resolve import state_dir
from orchestrator.cli.run import cmd_run, overrides, say
from orchestrator.constants import DEFAULT_STATE_DIR, JOBS_DB, STATE_DIR_ENV
from orchestrator.errors import ConfigError, JobNotFound, OrchError


# ------------------------------------------------------------------------------- orch up / down
def cmd_up(args) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1 (the head is one), got {args.nodes}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be a TCP port (1-65535), got {args.port}; the default is 6379")
    if args.cpus_per_node is not None and args.cpus_per_node < 1:  # (0 must not mean "the default")
        raise ConfigError(f"--cpus-per-node must be at least 1, got {args.cpus_per_node}; leave it out to share "
                          f"this machine's CPUs over the nodes")
    from orchestrator.service.client import up

    up(state_dir(args), args.nodes, args.cpus_per_node or max(1, (os.cpu_count() or 1) // args.nodes), args.port, say)
    return 0


def cmd_down(args) -> int:
    from orchestrator.raycluster.local_cluster import stop_cluster

    stop_cluster(state_dir(args), say)
    return 0


# ----------------------------------------------------------------------------------------- data
def cmd_data_prepare(args) -> int:
    """`orch data prepare [SRC DST] [OVERRIDES]` (orchestrator.service.data_prepare says what is prepared)."""
    # Lazy: these load boto3 and numpy (and Hydra, Ray when they run).
    from orchestrator.config.compose import compose_root  # (Hydra, boto3, numpy: not for --help)
    from orchestrator.service.data_prepare import datasets_to_prepare, describe, prepare_datasets

    uris = [a for a in args.overrides if "=" not in a]
    args.overrides = [a for a in args.overrides if "=" in a]
    root = compose_root(overrides(args))
    datasets = datasets_to_prepare(root, uris)
    if args.dry_run:
        print("\n".join(describe(d) for d in datasets))
        return 0
    from orchestrator.cli.progress import ConsoleProgress

    with ConsoleProgress() as progress:  # a bar per dataset on a terminal; the plain lines otherwise
        parts = progress.bar if progress.terminal else None
        prepare_datasets(root, datasets, say=progress.say, overwrite=args.overwrite, parts=parts)
    return 0


# --------------------------------------------------------------------------------- export/generate
def model_source(args):
    """What `args.checkpoint` names: a job id of the state folder (its latest committed checkpoint),
    else a URI or path (orchestrator.artifacts.resolve)."""
    from orchestrator import artifacts  # loads boto3; torch when a model is loaded
    from orchestrator.jobs.store import JobStore

    folder, ref = state_dir(args), args.checkpoint
    if "/" not in ref and os.path.exists(os.path.join(folder, JOBS_DB)):
        try:
            record = JobStore(folder).get(ref)
        except JobNotFound:
            record = None
        if record is not None:
            from orchestrator.execution.job_history import record_store

            return artifacts.job_source(record.id, record.checkpoint, record_store(record.config), record.state.value)
    return artifacts.resolve(ref, args.endpoint_url, state_dir=folder)


def cmd_export(args) -> int:
    from orchestrator import artifacts  # loads boto3; torch when a model is loaded

    source = model_source(args)
    artifact = artifacts.load(source)
    out = artifacts.write_hf(artifact, args.dir, overwrite=args.overwrite)
    say(f"exported {source.kind} {source.uri} -> {out} (Hugging Face {artifacts.hf_architecture(artifact)}, "
        f"safetensors)")
    return 0


def cmd_generate(args) -> int:
    from orchestrator import artifacts  # loads boto3; torch when a model is loaded

    if args.max_new_tokens <= 0 or args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise ConfigError("--max-new-tokens and --top-k must be > 0 and --temperature >= 0 "
                          f"(got {args.max_new_tokens}, {args.top_k}, {args.temperature})")
    artifact = artifacts.load(model_source(args))
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
MULTIRUN_HELP = ("a sweep: one pipeline per combination of the overrides, in Hydra's syntax (trainer.lr=1e-3,3e-3 "
                 "model=gpt_tiny,gpt_small; range(), choice(), glob()), grouped under one sweep id")


def _add_run(sub) -> None:
    run = sub.add_parser("run", parents=[ADDRESS, STATE_DIR, CONFIG_DIR],
                         help="run the pipeline (pretrain -> fine-tune) on an embedded or given Ray cluster")
    run.add_argument("overrides", nargs="*",
                     help="Hydra overrides, e.g. model=gpt_tiny trainer.max_steps=40 deepspeed=zero3")
    run.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    run.add_argument("-m", "--multirun", action="store_true", help=MULTIRUN_HELP + " (side by side when they fit)")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted (or failed) `orch run` of the same overrides in this state folder "
                          "from its committed checkpoints, without asking")
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
                    help="start only after JOB succeeded (and fine-tune from its weights); repeatable. "
                         "JOB@every:N / JOB@step:N: start once for each matching committed checkpoint of JOB, "
                         "from its weights")
    sb.add_argument("--user", help="who submits (default: ORCH_USER, else the OS user); taken as said, not "
                                   "authenticated")
    sb.add_argument("--queue", default="default", help="the queue (team) the jobs count against (default: default; "
                                                       "`orch queue` lists them)")
    sb.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    sb.add_argument("-m", "--multirun", action="store_true", help=MULTIRUN_HELP)
    sb.add_argument("--jobs-json", help=argparse.SUPPRESS)  # resolved jobs, from `orch submit --address http://...`
    sb.add_argument("--sweep-json", help=argparse.SUPPRESS)  # a sweep's resolved pipelines, likewise
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

    rp = sub.add_parser("report", parents=shared,
                        help="an HTML page and PNG plots of a job's or a pipeline's training (loss, lr, throughput, "
                             "MFU, restarts, GPU-hours)")
    rp.add_argument("target", metavar="JOB|PIPELINE", help="a job id, or a pipeline id (all its jobs)")
    rp.add_argument("--out", metavar="DIR", help="where to write index.html and the PNGs "
                                                 "(default: <state folder>/reports/JOB|PIPELINE)")
    rp.set_defaults(func=cmd_report)

    lg = sub.add_parser("logs", parents=shared,
                        help="a job's workers' output (rank 0; every failed rank's traceback) among its events")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    lg.add_argument("--rank", type=int, default=0, help="whose output: the worker of this rank (default 0)")
    lg.add_argument("--controller", action="store_true",
                    help="the job's events only: state changes, attempts, progress, failures")
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

    rt = sub.add_parser("retry", parents=shared,
                        help="queue a FAILED or CANCELLED job again from its last committed checkpoint (and the "
                             "dependents it blocked)")
    rt.add_argument("job")
    rt.set_defaults(func=cmd_retry)


def _add_sharing_commands(sub) -> None:
    """queue and nodes: what the jobs of a cluster share (its queues, its healthy nodes)."""
    shared = [ADDRESS, STATE_DIR]
    qu = sub.add_parser("queue", parents=[*shared, CONFIG_DIR],
                        help="each queue's quota, use, borrowing and fair share, and why each waiting job waits; "
                             "`orch queue set OVERRIDES` replaces the queues on the running controller")
    qu.add_argument("action", nargs="?", choices=("show", "set"), default="show",
                    help="show (default), or set: conf/queues composed with OVERRIDES, used from the next decision")
    qu.add_argument("overrides", nargs="*", help="for set: queues=OPTION and queues.KEY=VALUE, e.g. queues=two_teams "
                                                 "queues.teams.team-a.quota.workers=8")
    qu.add_argument("--json", action="store_true", help="machine-readable output")
    qu.add_argument("--queues-json", help=argparse.SUPPRESS)  # the composed queues, from `orch queue set --address http://...`
    qu.set_defaults(func=cmd_queue)

    nd = sub.add_parser("nodes", parents=shared,
                        help="the nodes quarantined after repeated failures (kept out of placement until a time); "
                             "`orch nodes release NODE` lets one back in")
    nd.add_argument("action", nargs="?", choices=("show", "release"), default="show",
                    help="show (default), or release NODE")
    nd.add_argument("node", nargs="?", help="for release: the node's id (or a prefix of it, or its address)")
    nd.add_argument("--json", action="store_true", help="machine-readable output")
    nd.set_defaults(func=cmd_nodes)


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


def cmd_completion(args) -> int:
    from orchestrator.cli.completion import script

    print(script(build_parser(), args.shell))
    return 0


def cmd_complete(args) -> int:
    """The words a completion script offers (`orch _complete jobs|overrides`); fast and never loud."""
    from orchestrator.cli.completion import job_ids, override_words

    words = job_ids(args.state_dir) if args.what == "jobs" else override_words()
    print("\n".join(words))
    return 0


def _add_completion_commands(sub) -> None:
    from orchestrator.cli.completion import SHELLS  # (the standard library only)

    comp = sub.add_parser("completion", help="print a shell completion script (source <(orch completion bash))")
    comp.add_argument("shell", choices=SHELLS)
    comp.set_defaults(func=cmd_completion)
    words = sub.add_parser("_complete", parents=[STATE_DIR])  # (hidden: see build_parser)
    words.add_argument("what", choices=("jobs", "overrides"))
    words.set_defaults(func=cmd_complete)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch",
                                description="Pretrain then fine-tune language models on Ray Train + DeepSpeed ZeRO.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"orch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_cluster_commands, _add_job_commands, _add_sharing_commands, _add_model_commands,
                _add_data_commands, _add_completion_commands):
        add(sub)
    for command in sub.choices.values():  # (the resolver rebuilds a command's arguments from its own parser)
        command.set_defaults(parser_of_command=command)
    # `_complete` is for the completion scripts: out of the help, and out of the commands they offer.
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "_complete"]
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
        if args.command == "run" and not args.dry_run:  # (a dry run only composes the config)
            _require_training_stack(args.command)
        return args.func(args)
    except OrchError as e:
        if args.debug:
            raise
        print(f"orch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("orch: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # a client-only install (no `train` extra) asked to train
        if args.debug or (e.name or "").split(".")[0] not in _training_stack():
            raise
        print(f"orch: error: {_needs_training_stack(args.command, [e.name])}", file=sys.stderr)
        return 2


def _needs_training_stack(command: str, missing: list[str]) -> str:
    return (f"`orch {command}` needs orch's training stack, which is not installed here (missing: "
            f"{', '.join(missing)}): pip install 'orch[train]' (from a checkout: bash scripts/setup.sh)")


def _require_training_stack(command: str) -> None:
    """A client-only install (`pip install orch`, no `train` extra) says so before it starts anything."""
    import importlib.util

    missing = sorted(m for m in _training_stack() if importlib.util.find_spec(m) is None)
    if missing:
        raise ConfigError(_needs_training_stack(command, missing))


def _training_stack() -> set[str]:
    """Top-level modules of orch's `train` extra, from the installed metadata (pyproject.toml is the list)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement  # (a dependency of Hydra's, so of every install)

    try:
        reqs = [Requirement(r) for r in requires("orch") or []]
    except PackageNotFoundError:
        return set()
    return {r.name.lower().replace("-", "_") for r in reqs if r.marker and r.marker.evaluate({"extra": "train"})
            and not r.marker.evaluate({"extra": ""})}


if __name__ == "__main__":
    sys.exit(main())

