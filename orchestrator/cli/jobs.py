"""The commands on jobs: submit, status, sync, report, logs, cancel, scale, retry. Each asks the
resolver (orchestrator.cli.resolve.where) where the jobs live and does its few lines there."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.cli.queue import submitter
from orchestrator.cli.resolve import Head, check_job_id, state_dir, where
from orchestrator.cli.run import combinations, compose, print_dry_run, print_sweep, say
from orchestrator.config.schema import dependency_job
from orchestrator.config.typed import to_dict
from orchestrator.errors import ConfigError, JobNotFound
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState
from orchestrator.raycluster.jobs_api import decode_jobs, encode_jobs


# --------------------------------------------------------------------------------------- submit
def cmd_submit(args) -> int:
    for job in args.after:
        check_job_id(dependency_job(job))  # (JOB@every:N: a checkpoint trigger, checked with the config)
    args.user = submitter(args.user)  # (resolved here: a command forwarded to the head keeps the user said here)
    if args.multirun or args.sweep_json:
        return _submit_sweep(args)
    if args.jobs_json:  # on the head, sent by `orch submit --address http://...`: composed there
        job_dicts = decode_jobs(args.jobs_json)
    else:
        raw, _, jobs = compose(args, after=args.after)
        _check_no_secrets(jobs)
        if args.dry_run:
            print_dry_run(raw, jobs)
            return 0
        job_dicts = [to_dict(j) for j in jobs]
    with where(args, control="submit", start=True) as target:
        if isinstance(target, Head):
            return target.forward(args, jobs_json=encode_jobs(job_dicts), overrides=[])
        ids = target.client.submit(job_dicts, list(args.after), owner(args))
    print("\n".join(ids))
    return 0


def owner(args) -> dict:
    """Who submits, to which queue (the controller refuses a queue it does not have)."""
    return {"user": args.user, "queue": args.queue}


def _check_no_secrets(jobs) -> None:
    from orchestrator.execution.preflight import check_no_secrets  # (it reaches the storage backends: boto3)

    for job in jobs:
        check_no_secrets(job)


def _submit_sweep(args) -> int:
    """`orch submit -m`: every combination's pipeline, queued at once (all or none) under one sweep id."""
    from orchestrator.jobs.controller import new_sweep_id

    if args.sweep_json:  # on the head, sent by `orch submit -m --address http://...`: composed there
        (sent,) = decode_jobs(args.sweep_json)
        pipelines, sweep = sent["pipelines"], sent["sweep"]
    else:
        combos = combinations(args, after=args.after)
        _check_no_secrets([job for *_, jobs in combos for job in jobs])
        if args.dry_run:
            print_sweep(combos)
            return 0
        pipelines = [[to_dict(j) for j in jobs] for *_, jobs in combos]
        sweep = {"id": new_sweep_id(), "overrides": [combo for combo, *_ in combos]}
    with where(args, control="submit", start=True) as target:
        if isinstance(target, Head):
            sent = encode_jobs([{"pipelines": pipelines, "sweep": sweep}])
            return target.forward(args, sweep_json=sent, overrides=[], multirun=False)
        ids = target.client.submit_sweep(pipelines, list(args.after), sweep, owner(args))
    print(f"sweep {sweep['id']}: {len(ids)} pipeline(s) queued (their W&B group: {sweep['id']})")
    for job_ids, combo in zip(ids, sweep["overrides"]):
        print(f"{' '.join(job_ids)}  {' '.join(combo)}")
    return 0


# ------------------------------------------------------------------------------ reading records
def cmd_status(args) -> int:
    if args.job:
        check_job_id(args.job)
    with where(args) as target:
        if isinstance(target, Head):
            return target.forward(args)
        from orchestrator.cli.nodes import status_lines
        from orchestrator.cli.status import show_status

        nodes = target.quarantined()  # (the cluster's, shown under the header and in every --json row)
        return show_status(args, lambda: target.records(args.job), target.header + status_lines(nodes), nodes)


def target_records(args) -> list[JobRecord]:
    """The job `args.target` names, or every job of the pipeline it names (submission order)."""
    check_job_id(args.target)
    with where(args, head=False) as target:
        records = target.records()
    chosen = sorted((r for r in records if args.target in (r.id, r.pipeline_id)), key=lambda r: (r.seq, r.created_at))
    if not chosen:
        raise JobNotFound(f"no job or pipeline {args.target!r} in {state_dir(args)}; `orch status` lists the jobs")
    return chosen


def cmd_sync(args) -> int:
    """Upload the offline W&B runs of a job, or of every job of a pipeline, with `wandb sync`
    (again after a partial upload: the run id and steps are the same, so it completes the run)."""
    failed = 0
    for r in target_records(args):
        folder = r.wandb.get("dir")
        if not folder or not os.path.isdir(folder):
            say(f"{r.id}: no offline W&B run to upload ({r.wandb.get('url') or 'tracking off, or not started'})")
            continue
        say(f"{r.id}: wandb sync {folder}")
        done = subprocess.run([sys.executable, "-m", "wandb", "sync", "--include-synced", folder])
        if done.returncode != 0:
            failed += 1
            print(f"orch: {r.id}: `wandb sync` failed (exit {done.returncode}); run `orch sync {args.target}` again "
                  f"(set WANDB_API_KEY, check the network)", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args) -> int:
    """`orch report JOB|PIPELINE [--out DIR]`: orchestrator.cli.report's page and PNGs, from the jobs'
    records and their metrics histories in the store."""
    from orchestrator.cli.report import default_dir, write_report  # (matplotlib, boto3: only here)
    from orchestrator.execution.job_history import metrics_history

    records = target_records(args)
    print(write_report(records, args.out or default_dir(state_dir(args), args.target), metrics_history))
    return 0


def cmd_logs(args) -> int:
    """The job's events and its workers' own output (rank 0, or --rank; every failed rank's
    traceback), by time: from the controller, else the state folder; the workers' from the store."""
    check_job_id(args.job)
    if args.rank < 0:
        raise ConfigError(f"--rank must be a worker's rank (0, 1, ...), got {args.rank}")
    with where(args) as target:
        if isinstance(target, Head):
            return target.forward(args)
        from orchestrator.execution.job_history import worker_log_reader
        from orchestrator.joblogs import show_logs

        show_logs(lambda offset: target.events(args.job, offset), lambda record: worker_log_reader(record, args.rank),
                  lambda line: print(line, flush=True), follow=args.follow, events_only=args.controller,
                  warn=lambda msg: print(f"orch: {msg}", file=sys.stderr))
    return 0


# ------------------------------------------------------------------------------ changing a job
def cmd_cancel(args) -> int:
    check_job_id(args.job)
    with where(args, control="cancel") as target:
        if isinstance(target, Head):
            return target.forward(args)
        rec = target.client.cancel(args.job, args.now)
    if JobState(rec["state"]) is JobState.CANCELLED:
        print(f"{args.job}: CANCELLED")
    else:
        print(f"{args.job}: cancelling: checkpointing step {rec['metrics'].get('step', 0)}+, then stopping "
              f"(`orch status {args.job}`)")
    return 0


def cmd_scale(args) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}; `orch cancel {args.job}` stops a job")
    check_job_id(args.job)
    with where(args, control="scale") as target:
        if isinstance(target, Head):
            return target.forward(args)
        target.client.scale(args.job, args.workers)
    print(f"{args.job}: scaling to {args.workers} workers: checkpoint, then restart from it (`orch status {args.job}`)")
    return 0


def cmd_retry(args) -> int:
    """Queue a FAILED or CANCELLED job of the controller again, from its last committed checkpoint."""
    check_job_id(args.job)
    with where(args, control="retry") as target:
        if isinstance(target, Head):
            return target.forward(args)
        rec = target.client.retry(args.job)
    from orchestrator.checkpoint.layout import checkpoint_name  # (the storage backends: boto3)

    start = checkpoint_name(rec["checkpoint"]) if rec["checkpoint"] else "the start"
    print(f"{args.job}: queued again (PENDING): continues from {start} (`orch status {args.job}`)")
    return 0
