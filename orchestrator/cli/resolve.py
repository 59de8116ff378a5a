"""Where a command's jobs live, decided once for every command (`where(args)`):

    --address / RAY_ADDRESS is http(s)://HEAD:8265        Head: the command runs on the head as a Ray job
                                                          (the Jobs API), its arguments rebuilt from the
                                                          parsed namespace
    --address / RAY_ADDRESS / the state folder's          Controller: the controller actor on that cluster
      cluster.json (`orch up`) names a cluster's GCS
    else the state folder's job store                     Local: `orch run`'s records, read only

Controller and Local answer the same small interface (`records`, `events`, `header`); the actions
that change a job (submit, cancel, scale, retry) need a controller (`Controller.client`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.config.schema import is_plain_name
from orchestrator.constants import DEFAULT_STATE_DIR, JOBS_DB, RAY_ADDRESS_ENV, STATE_DIR_ENV
from orchestrator.errors import ClusterError, ConfigError
from orchestrator.jobs.controller import release_stored, stored_quarantine
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.store import JobStore
from orchestrator.raycluster.jobs_api import is_jobs_api_address, run_on_head
from orchestrator.raycluster.local_cluster import resolve_address

NO_RECORDS = (
    "no job records in {} and no cluster to ask; run `orch run` or `orch up` first, or pass --state-dir / --address"
)


def state_dir(args) -> str:
    """The state folder: --state-dir, else $ORCH_STATE_DIR, else ./.orch (the one default)."""
    path = os.path.abspath(getattr(args, "state_dir", None) or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"the state folder {path} is a file; pass --state-dir (or {STATE_DIR_ENV}) a folder")
    return path


def check_job_id(job: str) -> None:
    """A job id is one name (`p1a2b3c-pretrain`): it becomes part of paths in the store and the state
    folder, so `../x`, `/etc` or `a/b` are refused before anything reads or writes."""
    if not is_plain_name(job):
        raise ConfigError(f"{job!r} is not a job id: an id is one name like p1a2b3c-pretrain, without '/' or '..'; "
                          f"`orch status` lists the jobs")


def jobs_api_address(args) -> str | None:
    """The head's Jobs API (http[s]://HEAD:8265) when --address or RAY_ADDRESS is one."""
    address = getattr(args, "address", None) or os.environ.get(RAY_ADDRESS_ENV)
    return address if is_jobs_api_address(address) else None


# ------------------------------------------------------------------------------------- targets
@dataclass
class Head:
    """The head's Jobs API: the command itself runs there (`orch ARGV`, output and exit code back)."""

    address: str

    def forward(self, args, **changed) -> int:
        """Run this command on the head: its arguments rebuilt from `args` (with `changed` values),
        --state-dir (a path there) and --debug along when given."""
        values = argparse.Namespace(**{**vars(args), **changed})
        argv = [*(["--debug"] if args.debug else []), args.command, *rebuild_argv(args.parser_of_command, values)]
        given = getattr(args, "state_dir", None)
        return run_on_head(self.address, [*argv, *(["--state-dir", given] if given else [])])


@dataclass
class Controller:
    """The controller actor on the cluster at `address` (state in `state_dir` on its head)."""

    address: str
    state_dir: str
    client: object = None  # the connected orchestrator.service.client.Client, inside `where`
    header: list[str] = field(default_factory=list)

    def records(self, job: str | None = None) -> list[JobRecord]:
        return [JobRecord.from_json(d) for d in self.client.status(job)]

    def events(self, job: str, offset: int) -> dict:
        return self.client.logs(job, offset)

    def quarantined(self) -> list[dict]:
        return self.client.nodes()

    def release_node(self, name: str) -> dict:
        return self.client.release_node(name)


@dataclass
class Local:
    """The state folder's job store, as `orch run` (maybe still running) writes it."""

    state_dir: str
    header: list[str] = field(default_factory=list)

    def records(self, job: str | None = None) -> list[JobRecord]:
        store = JobStore(self.state_dir)
        return [store.get(job)] if job else store.list()

    def events(self, job: str, offset: int) -> dict:
        from orchestrator.joblogs import read_events

        record = JobStore(self.state_dir).get(job)  # (first: the events read after a terminal state hold its line)
        text, offset = read_events(self.state_dir, job, offset)
        return {"text": text, "offset": offset, "terminal": record.state.terminal, "record": record.to_json()}

    def quarantined(self) -> list[dict]:
        return stored_quarantine(JobStore(self.state_dir)).active(time.time())

    def release_node(self, name: str) -> dict:
        """(`orch run`'s state folder: its next run, or the one running, reads the release from the store.)"""
        return release_stored(JobStore(self.state_dir), name, time.time())


@contextmanager
def where(args, *, control: str | None = None, start: bool = False, head: bool = True) -> Iterator:
    """Where the jobs of this command live: Head, a connected Controller, or Local (see the module).

    `control`: the command changes a job (its verb, for the error): a controller is required, and
    with none, an unknown job id is named first. `start`: start the controller if none runs (submit).
    `head`: the command may run on the head (else a Jobs API address is refused in one line)."""
    api = jobs_api_address(args)
    if api:
        if not head:
            raise ConfigError(f"orch {args.command} reads the job records itself: pass --address HOST:PORT (the "
                              f"cluster's GCS) or --state-dir, not the Jobs API address {api}")
        yield Head(api)
        return
    folder = state_dir(args)
    address = resolve_address(getattr(args, "address", None), folder)
    if address:
        from orchestrator.service.client import connect_controller  # (Ray: only when a cluster is asked)

        with connect_controller(address, folder, start=start) as client:
            header = [f"cluster {address}" + (f", dashboard {client.dashboard}" if client.dashboard else "")]
            yield Controller(address, folder, client, header)
        return
    has_records = os.path.exists(os.path.join(folder, JOBS_DB))
    if control is not None:
        job = getattr(args, "job", None)
        if job and has_records:
            JobStore(folder).get(job)  # an unknown id: JobNotFound, which names it
        raise ClusterError(no_cluster_message(args.command, control, job, folder))
    if not has_records:
        raise ConfigError(NO_RECORDS.format(folder))
    yield Local(folder)


def no_cluster_message(command: str, verb: str, job: str | None, folder: str) -> str:
    if command == "submit":
        return (f"no cluster to submit to: start one with `orch up` (state folder {folder}), or pass --address / "
                f"set RAY_ADDRESS; `orch run` runs a pipeline on an embedded cluster instead")
    if command == "queue":
        what = "set" if verb == "queue set" else "show"
        return (f"no cluster whose queues to {what} (state folder {folder}): queues live in the controller of a "
                f"cluster `orch up` started; start one, or pass --address / set RAY_ADDRESS")
    if command == "retry":
        return (f"no cluster to retry job {job} on (state folder {folder}): a job of `orch run` continues with "
                f"`orch run --resume` and the same overrides, in the same folder; one of `orch up`'s cluster: start "
                f"it again with `orch up`, or pass --address / set RAY_ADDRESS")
    return (f"no cluster to {verb} job {job} on: the controller runs on the cluster `orch up` started (state folder "
            f"{folder}); start it again, or pass --address / set RAY_ADDRESS")


# ------------------------------------------------------------------------- forwarding to a head
NOT_FORWARDED = {"address", "state_dir", "config_dir"}  # a path or address of this machine: --state-dir goes apart


def rebuild_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command line that parses back into `args` with `parser` (the command's own parser): each
    option that differs from its default, then the positionals, in the parser's order."""
    options, positionals = [], []
    for action in parser._actions:  # (argparse keeps no public list of a parser's actions)
        if isinstance(action, argparse._HelpAction) or action.dest in NOT_FORWARDED:
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            positionals += [str(v) for v in value] if isinstance(value, list) else [] if value is None else [str(value)]
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            options += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            options += [w for v in value or [] for w in (flag, str(v))]
        elif value is not None and value != action.default:
            options += [flag, str(value)]
    return [*options, *positionals]
