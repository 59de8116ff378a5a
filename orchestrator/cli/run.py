"""`orch run` and what it shares with `orch submit`: compose the overrides (one pipeline, or a
sweep's), print a dry run, drive the pipelines on an embedded or given cluster, print the summary."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from orchestrator.cli.progress import stamp
from orchestrator.config.schema import RootConfig
from orchestrator.config.typed import build, to_dict
from orchestrator.errors import ConfigError
from orchestrator.jobs.policy import job_demand
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.state import JobState

WEIGHTS_OF_DEPENDENCY = "the weights of its dependency"


def say(msg: str) -> None:
    print(stamp(msg), flush=True)


def overrides(args) -> list[str]:
    # (only commands that compose call this)
    from orchestrator.config.compose import quote_value, with_config_dirs

    ov = list(args.overrides)
    if getattr(args, "address", None):
        ov.append(f"cluster.address={quote_value(args.address)}")
    if getattr(args, "state_dir", None):
        ov.append(f"state_dir={quote_value(os.path.abspath(args.state_dir))}")
    return with_config_dirs(ov, getattr(args, "config_dir", None) or [])


def compose(args, after: Sequence[str] = ()) -> tuple[dict, RootConfig, list]:
    """The resolved config (a plain dict, then typed) and the pipeline's jobs, from conf/ and `args`."""
    # Lazy: composing loads boto3 (through orchestrator.storage), and Hydra when it runs.
    from orchestrator.config.compose import compose_dict, resolve_jobs  # (Hydra: not for --help)

    raw = compose_dict(overrides(args))
    root = build(RootConfig, raw)
    return raw, root, resolve_jobs(root, after=after)


def combinations(args, after: Sequence[str] = ()) -> list[tuple[list[str], dict, RootConfig, list]]:
    """(overrides, raw, root, jobs) of each pipeline: one, or with -m one per combination of the sweep."""
    if not args.multirun:
        return [(list(args.overrides), *compose(args, after))]
    from orchestrator.config.sweep import expand_sweep  # (Hydra: not for --help)

    out = []
    for combo in expand_sweep(args.overrides, getattr(args, "config_dir", None) or []):
        try:
            out.append((combo, *compose(argparse.Namespace(**{**vars(args), "overrides": combo}), after)))
        except ConfigError as e:
            raise ConfigError(f"sweep combination {' '.join(combo) or '(none)'}: {e}") from None
    return out


def print_sweep(combos) -> None:
    """`-m --dry-run`: each combination and its jobs."""
    print(f"# sweep: {len(combos)} pipeline(s), one per combination; nothing submitted")
    for i, (combo, _raw, _root, jobs) in enumerate(combos, 1):
        print(f"# {i}/{len(combos)}: {' '.join(combo) or '(no overrides)'}")
        print_jobs(jobs)


# ------------------------------------------------------------------------------------------ run
def cmd_run(args) -> int:
    combos = combinations(args)
    if args.dry_run:
        print_sweep(combos) if args.multirun else print_dry_run(combos[0][1], combos[0][3])
        return 0
    from orchestrator.cli.progress import ConsoleProgress
    from orchestrator.jobs.controller import new_sweep_id
    from orchestrator.service.pipeline import Plan, run_pipelines  # (Ray, boto3: only when a pipeline runs)

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
    return 0 if all(r.state is JobState.SUCCEEDED for r in records) else 1


def _choose_resumes(args, plans) -> None:
    """Which earlier, unfinished `orch run` pipeline each plan continues: with --resume, each one
    there is; else, for one that was interrupted, the user's answer on a terminal, and a hint that
    names --resume (then a new pipeline) otherwise."""
    from orchestrator.service.pipeline import find_interrupted  # (Ray: only when a pipeline runs)

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
            say(f"{what}; starting a new pipeline: `orch run --resume` with the same overrides continues it instead")
            continue
        try:
            answer = input(f"{what}. Continue it from its committed checkpoints? [Y/n] ").strip().lower()
        except EOFError:
            answer = "n"
        if answer in ("", "y", "yes"):
            plan.resume = res


def print_dry_run(raw: dict, jobs) -> None:
    import yaml  # only --dry-run prints YAML

    print("# resolved config")
    print(yaml.safe_dump(raw, sort_keys=False, width=10**6, allow_unicode=True), end="")  # one line per value
    print_jobs(jobs)


def print_jobs(jobs) -> None:
    print("# resources (each job is admitted only when all its workers fit at once)")
    for j in jobs:
        rec = JobRecord(id=j.name, pipeline_id="", name=j.name, kind=j.kind, state=JobState.PENDING,
                        priority=j.priority, depends_on=list(j.depends_on), config=to_dict(j), created_at=0)
        per = ", ".join(f"{k}: {v:g}" for k, v in j.resources_per_worker().items())
        total = ", ".join(f"{k}: {v:g}" for k, v in job_demand(rec).items())
        after = (f", at each checkpoint of {j.depends_on[0]}@{j.trigger}" if j.trigger
                 else f", after {', '.join(j.depends_on)}" if j.depends_on else "")
        count = (f"{j.workers} workers" if not j.max_workers
                 else f"{j.workers}-{j.max_workers} workers (elastic; the gang admitted is {j.workers})")
        if j.kind == "eval":  # no optimizer, no steps: what it computes, on how much
            work = (f"{', '.join(j.trainer.eval_metrics)} of {j.init_from or WEIGHTS_OF_DEPENDENCY}, "
                    f"{j.trainer.eval_batches} validation batches of {j.trainer.global_batch_size}")
        else:
            work = (f"ZeRO-{j.deepspeed.stage} {j.deepspeed.precision} over {j.cluster.backend}, global batch "
                    f"{j.trainer.global_batch_size} = {j.workers} x {j.trainer.micro_batch_size} x "
                    f"{j.gradient_accumulation_steps(j.workers)} accumulation, {j.trainer.max_steps} steps")
        print(f"{j.name}: {j.kind}, {count} x {{{per}}} = {{{total}}} ({j.cluster.placement_strategy}), {work}{after}")


def _fmt(v, spec=".4f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


REPORT_ENV = "ORCH_REPORT"


def _run_report(root, records) -> str | None:
    """`orch run`'s report of its pipeline (orchestrator.cli.report), in the state folder; a report
    that cannot be made is said in one line and never fails the run."""
    if os.environ.get(REPORT_ENV, "1").lower() in ("0", "false", "off", "no"):
        return None  # (ORCH_REPORT=0: no report; the test suite sets it, where only a few runs check one)
    from orchestrator.cli.report import default_dir, write_report  # (matplotlib: only when a report is made)
    from orchestrator.execution.job_history import metrics_history

    try:
        return write_report(records, default_dir(root.state_dir, records[0].pipeline_id), metrics_history)
    except Exception as e:  # noqa: BLE001 - the jobs' outcome stands without a report
        say(f"no report: {e}")
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


