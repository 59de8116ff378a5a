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
    orch export CHECKPOINT DIR              a checkpoint as a Hugging Face folder
    orch generate CHECKPOINT --prompt TEXT  sample from a model (KV cache)
    orch data prepare [OVERRIDES...]        tokenize the pipeline's datasets into the store
    orch completion bash|zsh|tcsh           a shell completion script (source <(orch completion bash))

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
    from orchestrator.progress import stamp

    print(stamp(msg), flush=True)


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


def _combinations(args, after: Sequence[str] = ()) -> list[tuple[list[str], dict, RootConfig, list]]:
    """(overrides, raw, root, jobs) of each pipeline: one, or with -m one per combination of the sweep."""
    if not args.multirun:
        return [(list(args.overrides), *_compose(args, after))]
    from orchestrator.config.sweep import expand_sweep  # (Hydra: not for --help)

    out = []
    for combo in expand_sweep(args.overrides, getattr(args, "config_dir", None) or []):
        try:
            out.append((combo, *_compose(argparse.Namespace(**{**vars(args), "overrides": combo}), after)))
        except ConfigError as e:
            raise ConfigError(f"sweep combination {' '.join(combo) or '(none)'}: {e}") from None
    return out


def _print_sweep(combos) -> None:
    """`-m --dry-run`: each combination and its jobs."""
    print(f"# sweep: {len(combos)} pipeline(s), one per combination; nothing submitted")
    for i, (combo, _raw, _root, jobs) in enumerate(combos, 1):
        print(f"# {i}/{len(combos)}: {' '.join(combo) or '(no overrides)'}")
        _print_jobs(jobs)


# ------------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    combos = _combinations(args)
    if args.dry_run:
        _print_sweep(combos) if args.multirun else _print_dry_run(combos[0][1], combos[0][3])
        return 0
    from orchestrator.controller import new_sweep_id
    from orchestrator.pipeline import Plan, run_pipelines  # (Ray, boto3: only when a pipeline runs)
    from orchestrator.progress import ConsoleProgress

    plans = [Plan(root, jobs, combo) for combo, _raw, root, jobs in combos]
    _choose_resumes(args, plans)
    root = plans[0].root
    with ConsoleProgress() as progress:  # bars on a terminal; the plain lines otherwise
        records = run_pipelines(plans, say=progress.say, verbose=args.verbose,
                                sweep_id=new_sweep_id() if args.multirun else None, watch=progress.jobs)
    report = _run_report(root, records)
    _print_summary(root, records, report)
    if args.debug:
        for r in records:
            if r.failure_detail:
                print(f"\n{r.id} failed:\n{r.failure_detail}", file=sys.stderr)
    return 0 if all(r.state.value == "SUCCEEDED" for r in records) else 1


def _choose_resumes(args, plans) -> None:
    """Which earlier, unfinished `orch run` pipeline each plan continues: with --resume, each one
    there is; else, for one that was interrupted, the user's answer on a terminal, and a hint that
    names --resume (then a new pipeline) otherwise."""
    from orchestrator.pipeline import find_interrupted  # (Ray: only when a pipeline runs)

    found = [find_interrupted(p.root, p.jobs) for p in plans]
    if args.resume:
        if not any(res for res, _ in found):
            raise ConfigError(f"--resume: nothing to continue in {plans[0].root.state_dir}: {found[0][1]}; "
                              f"run without --resume to start a new pipeline")
        for plan, (res, _) in zip(plans, found):
            plan.resume = res
        return
    ask = sys.stdin.isatty() and sys.stdout.isatty()
    for plan, (res, _) in zip(plans, found):
        if res is None or not res.interrupted:
            continue
        what = f"pipeline {res.pipeline_id} in {plan.root.state_dir} was interrupted ({res.describe()})"
        if not ask:
            _say(f"{what}; starting a new pipeline: `orch run --resume` with the same overrides continues it instead")
            continue
        try:
            answer = input(f"{what}. Continue it from its committed checkpoints? [Y/n] ").strip().lower()
        except EOFError:
            answer = "n"
        if answer in ("", "y", "yes"):
            plan.resume = res


def _print_dry_run(raw: dict, jobs) -> None:
    import yaml  # only --dry-run prints YAML

    print("# resolved config")
    print(yaml.safe_dump(raw, sort_keys=False, width=10**6, allow_unicode=True), end="")  # one line per value
    _print_jobs(jobs)


def _print_jobs(jobs) -> None:
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


REPORT_ENV = "ORCH_REPORT"


def _run_report(root, records) -> str | None:
    """`orch run`'s report of its pipeline (orchestrator.report), in the state folder; a report
    that cannot be made is said in one line and never fails the run."""
    if os.environ.get(REPORT_ENV, "1").lower() in ("0", "false", "off", "no"):
        return None  # (ORCH_REPORT=0: no report; the test suite sets it, where only a few runs check one)
    from orchestrator.report import default_dir, write_report  # (matplotlib: only when a report is made)

    try:
        return write_report(records, default_dir(root.state_dir, records[0].pipeline_id), metrics_history)
    except Exception as e:  # noqa: BLE001 - the jobs' outcome stands without a report
        _say(f"no report: {e}")
        return None


def _print_summary(root, records, report: str | None = None) -> None:
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
    if report:
        print(f"report      {report} (`orch report {records[0].pipeline_id}` writes it again)")


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


def status_rows(records, metrics: str | None = None, now: float | None = None) -> list[dict]:
    """What `orch status --json` prints for each job: its record (`history`: its state changes),
    what the table shows (max_steps, started_at, finished_at, elapsed_s, eta_s, tokens_per_s, mfu)
    and, with `metrics`, its metrics history from the store (`metrics_history`): "rows" every row
    (one per logged step), "summary" how many and the last."""
    from orchestrator.status_view import job_row

    out, unreachable = [], {}
    for r in records:
        d = r.to_json()
        d.pop("config")
        d["workers"] = r.workers
        shown = job_row(r, now)
        shown.pop("workers_shown")
        d.update(shown)
        if metrics:
            history = metrics_history(r, unreachable)
            d["metrics_history"] = history if metrics == "rows" else _history_summary(history)
        out.append(d)
    return out


def _print_status(args, records, header: list[str]) -> None:
    if args.json:
        print(json.dumps(status_rows(records, metrics="rows" if args.job else "summary"), indent=1))
        return
    from orchestrator.status_view import show, status_view

    show(lambda width: status_view(records, header, width=width))
    if args.job:
        for r in records:
            if r.wandb.get("url") or r.wandb.get("dir"):
                print(f"W&B run: {r.wandb.get('url') or r.wandb['dir']} ({r.wandb.get('mode', '?')}, "
                      f"group {r.wandb.get('group', r.pipeline_id)})")
            print(json.dumps(status_rows([r])[0], indent=1))


def _show_status(args, read, header: list[str]) -> int:
    """Print the jobs `read()` returns; with --watch, again every --interval seconds until every job
    shown has ended: redrawn in place on a terminal (rich Live), one block per refresh otherwise."""
    if not args.watch:
        _print_status(args, read(), header)
        return 0
    from orchestrator.status_view import console, status_view

    out = console()
    if out.is_terminal and not args.json:
        from rich.live import Live

        with Live(console=out, auto_refresh=False) as live:
            while True:
                records = read()
                live.update(status_view(records, [f"{time.strftime('%H:%M:%S')}  {h}" for h in header or [""]],
                                        width=out.width), refresh=True)
                if all(r.state.terminal for r in records):
                    return 0
                time.sleep(args.interval)
    while True:
        records = read()
        print(f"# {time.strftime('%H:%M:%S')}")
        _print_status(args, records, header)
        sys.stdout.flush()
        if all(r.state.terminal for r in records):
            return 0
        time.sleep(args.interval)


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
            header = [f"cluster {address}" + (f", dashboard {client.dashboard}" if client.dashboard else "")]
            return _show_status(args, lambda: [JobRecord.from_json(d) for d in client.status(args.job)], header)
    if not os.path.exists(os.path.join(state_dir, JOBS_DB)):
        raise ConfigError(f"no job records in {state_dir} and no cluster to ask; run `orch run` or `orch up` first, "
                          f"or pass --state-dir / --address")
    # No controller: the state folder's records, as `orch run` (maybe still running) writes them.
    store = JobStore(state_dir)
    return _show_status(args, lambda: [store.get(args.job)] if args.job else store.list(), [])


def cmd_sync(args) -> int:
    """Upload the offline W&B runs of a job, or of every job of a pipeline, with `wandb sync`
    (again after a partial upload: the run id and steps are the same, so it completes the run)."""
    import subprocess

    chosen = _target_records(args)
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


def _target_records(args) -> list[JobRecord]:
    """The job `args.target` names, or every job of the pipeline it names (submission order): from
    the controller of the cluster (--address, RAY_ADDRESS, `orch up`'s), else the state folder."""
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
    chosen = sorted((r for r in records if args.target in (r.id, r.pipeline_id)), key=lambda r: (r.seq, r.created_at))
    if not chosen:
        raise JobNotFound(f"no job or pipeline {args.target!r} in {state_dir}; `orch status` lists the jobs")
    return chosen


def cmd_report(args) -> int:
    """`orch report JOB|PIPELINE [--out DIR]`: orchestrator.report's page and PNGs, from the jobs'
    records and their metrics histories in the store."""
    if _jobs_api(args):
        raise ConfigError(f"orch report reads the job records itself: pass --address HOST:PORT (the cluster's GCS) "
                          f"or --state-dir, not the Jobs API address {args.address or os.environ.get(RAY_ADDRESS_ENV)}")
    from orchestrator.report import default_dir, write_report  # (matplotlib, boto3: only here)

    records = _target_records(args)
    page = write_report(records, args.out or default_dir(_state_dir(args), args.target), metrics_history)
    print(page)
    return 0


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
    if args.multirun or args.sweep_json:
        return _submit_sweep(args)
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


def _submit_sweep(args) -> int:
    """`orch submit -m`: every combination's pipeline, queued at once (all or none) under one sweep id."""
    from orchestrator.controller import new_sweep_id

    if args.sweep_json:  # on the head, sent by `orch submit -m --address http://...`: composed there
        (sent,) = decode_jobs(args.sweep_json)
        pipelines, sweep = sent["pipelines"], sent["sweep"]
    else:
        combos = _combinations(args, after=args.after)
        from orchestrator.preflight import check_no_secrets  # (it reaches the storage backends: boto3)

        for _combo, _raw, _root, jobs in combos:
            for job in jobs:
                check_no_secrets(job)
        if args.dry_run:
            _print_sweep(combos)
            return 0
        pipelines = [[to_dict(j) for j in jobs] for _combo, _raw, _root, jobs in combos]
        sweep = {"id": new_sweep_id(), "overrides": [combo for combo, *_ in combos]}
        api = _jobs_api(args)
        if api:
            after = [w for job in args.after for w in ("--after", job)]
            sent = encode_jobs([{"pipelines": pipelines, "sweep": sweep}])
            return _on_head(args, api, ["submit", "--sweep-json", sent, *after])
    with _controller(args, start=True) as client:
        ids = client.submit_sweep(pipelines, list(args.after), sweep)
    print(f"sweep {sweep['id']}: {len(ids)} pipeline(s) queued (their W&B group: {sweep['id']})")
    for job_ids, combo in zip(ids, sweep["overrides"]):
        print(f"{' '.join(job_ids)}  {' '.join(combo)}")
    return 0


def cmd_retry(args) -> int:
    """Queue a FAILED or CANCELLED job of the controller again, from its last committed checkpoint."""
    _check_job_id(args.job)
    api = _jobs_api(args)
    if api:
        return _on_head(args, api, ["retry", args.job])
    state_dir = _state_dir(args)
    if not resolve_address(args.address, state_dir):
        if os.path.exists(os.path.join(state_dir, JOBS_DB)):
            JobStore(state_dir).get(args.job)  # an unknown id: JobNotFound, which names it
        raise ClusterError(f"no cluster to retry job {args.job} on (state folder {state_dir}): a job of `orch run` "
                           f"continues with `orch run --resume` and the same overrides, in the same folder; one of "
                           f"`orch up`'s cluster: start it again with `orch up`, or pass --address / set RAY_ADDRESS")
    with _controller(args) as client:
        rec = client.retry(args.job)
    start = rec["checkpoint"].rstrip("/").rsplit("/", 1)[-1] if rec["checkpoint"] else "the start"
    print(f"{args.job}: queued again (PENDING): continues from {start} (`orch status {args.job}`)")
    return 0


def cmd_logs(args) -> int:
    """The job's events and its workers' own output (rank 0, or --rank; every failed rank's
    traceback), by time: from the controller, else the state folder; the workers' from the store."""
    _check_job_id(args.job)
    if args.rank < 0:
        raise ConfigError(f"--rank must be a worker's rank (0, 1, ...), got {args.rank}")
    api = _jobs_api(args)
    if api:
        return _on_head(args, api, ["logs", args.job, *(["--follow"] if args.follow else []),
                                    *(["--rank", str(args.rank)] if args.rank else []),
                                    *(["--controller"] if args.controller else [])])
    from orchestrator.joblogs import read_events, show_logs

    def show(read) -> int:
        show_logs(read, lambda record: _worker_logs(record, args.rank), lambda line: print(line, flush=True),
                  follow=args.follow, events_only=args.controller, warn=lambda msg: print(f"orch: {msg}",
                                                                                         file=sys.stderr))
        return 0

    state_dir = _state_dir(args)
    address = resolve_address(args.address, state_dir)
    if address:
        with connect_controller(address, state_dir, start=False) as client:
            return show(lambda offset: client.logs(args.job, offset))
    if not os.path.exists(os.path.join(state_dir, JOBS_DB)):
        raise ConfigError(f"no job records in {state_dir} and no cluster to ask; run `orch run` or `orch up` first, "
                          f"or pass --state-dir / --address")
    records = JobStore(state_dir)

    def read(offset: int) -> dict:
        record = records.get(args.job)  # (first: the events read after a terminal state hold its line)
        text, offset = read_events(state_dir, args.job, offset)
        return {"text": text, "offset": offset, "terminal": record.state.terminal, "record": record.to_json()}

    return show(read)


def _worker_logs(record: dict, rank: int):
    """A reader of the job's workers' output in its run folder of the store (`orchestrator.joblogs`)."""
    # Lazy: the storage backends load boto3.
    from orchestrator.checkpoint.layout import run_uri
    from orchestrator.joblogs import WorkerLogReader
    from orchestrator.storage import open_store

    most = record["config"].get("max_workers") or record["config"]["workers"]
    if rank >= most:
        raise ConfigError(f"job {record['id']} runs at most {most} worker(s) (ranks 0-{most - 1}), got --rank {rank}")
    storage = record["config"].get("storage") or {}
    store = open_store(storage["root"], endpoint_url=storage.get("endpoint_url"), region=storage.get("region"))
    return WorkerLogReader(store, run_uri(storage["root"], record["id"]), rank)


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
    from orchestrator.progress import ConsoleProgress

    with ConsoleProgress() as progress:  # a bar per dataset on a terminal; the plain lines otherwise
        parts = progress.bar if progress.terminal else None
        prepare_datasets(root, datasets, say=progress.say, overwrite=args.overwrite, parts=parts)
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
                    help="start only after JOB succeeded (and fine-tune from its weights); repeatable")
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
    from orchestrator.completion import script

    print(script(build_parser(), args.shell))
    return 0


def cmd_complete(args) -> int:
    """The words a completion script offers (`orch _complete jobs|overrides`); fast and never loud."""
    from orchestrator.completion import job_ids, override_words

    words = job_ids(args.state_dir) if args.what == "jobs" else override_words()
    print("\n".join(words))
    return 0


def _add_completion_commands(sub) -> None:
    from orchestrator.completion import SHELLS  # (the standard library only)

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
    for add in (_add_run, _add_cluster_commands, _add_job_commands, _add_model_commands, _add_data_commands,
                _add_completion_commands):
        add(sub)
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
