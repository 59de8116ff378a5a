"""W&B as a sink of the job's metrics history (orchestrator.train.history), fed by the job's runner.

Why the runner and not rank 0: the runner lives for the whole job (every worker group, every
restart), next to the state folder on the head, so a job has one W&B run and, offline, one run
folder there, never on a worker's scratch disk that the autoscaler takes away; and W&B (its key,
its server, its crashes) cannot fail a training worker. The runner reads the history from the
store every few seconds and logs the rows it has not logged yet, against `trainer/step`.

Replayed steps (a resume from step N after the job had logged past N): the history keeps the rows
of the attempt that resumed (one row per step); the sink then rewinds the W&B run to step N and
logs the new rows:
- offline: the run folder is written again from the history (`_step` = trainer step, one row per
  step), so `wandb sync` uploads exactly the history;
- online: `wandb.init(resume_from="<id>?_step=N")` (W&B's rewind, a preview feature); where the
  server refuses it, the run continues and the replayed rows are logged at W&B steps past the last
  one, with `trainer/step` as every metric's x axis (`define_metric`), so the charts plot them at
  their training step and no row is dropped; the history in the store stays the truth.

W&B failing never fails a job: an error warns once, an online run degrades to an offline one in
the state folder (uploaded later with `orch sync`), and an offline one that fails stops logging.
The key comes from WANDB_API_KEY in the environment only; the config logged is the job's resolved
config, which holds no secrets (checked at submit).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from orchestrator.config.schema import TrackingConfig

log = logging.getLogger(__name__)

STEP_AXIS = "trainer/step"
INIT_TIMEOUT_S = 30.0  # an unreachable server: give up (and degrade to offline) after this


@dataclass(frozen=True)
class ArtifactRef:
    """A W&B reference artifact: the URI (s3:// or file://) of something in the store, not a copy."""

    name: str
    type: str  # model | checkpoint
    uri: str
    metadata: dict


def wandb_row(row: dict, restarts: int) -> dict:
    """A history row as W&B metrics: its values, the step axis, world size, attempt and restarts."""
    out = dict(row.get("metrics") or {})
    out[STEP_AXIS] = row["step"]
    out["trainer/world_size"] = row.get("world_size")
    out["trainer/attempt"] = row.get("attempt")
    out["trainer/restarts"] = restarts
    for event in row.get("events") or []:
        out[f"events/{event['kind']}"] = 1
    return {k: v for k, v in out.items() if v is not None}


def restarts_by_row(rows: list[dict]) -> list[int]:
    """How many restarts (failures) the job had by each row."""
    out, n = [], 0
    for r in rows:
        n += sum(e.get("kind") == "restart" for e in r.get("events") or [])
        out.append(n)
    return out


class WandbSink:
    """One W&B run for one job, fed with the resolved history rows (`update`), closed by `finish`."""

    def __init__(self, cfg: TrackingConfig, *, run_id: str, name: str, group: str, job_type: str, config: dict,
                 root_dir: str, uses: tuple[ArtifactRef, ...] = (), say: Callable[[str], None] = log.warning,
                 init_timeout_s: float = INIT_TIMEOUT_S):
        self.cfg, self.run_id, self.name, self.group, self.job_type = cfg, run_id, name, group, job_type
        self.config, self.root_dir, self.uses, self.say = config, root_dir, uses, say
        self.mode, self.init_timeout_s = cfg.mode, init_timeout_s
        self.run = None
        self.run_dir: str | None = None
        self.url: str | None = None
        self.logged: list[tuple[int, int]] = []  # (step, attempt) of each row logged, in order
        self.wandb_step = 0  # the last W&B step logged (online, after a refused rewind: past the trainer step)
        self.monotonic = False  # online rewind refused: log at W&B steps past the last one
        self.failed = False
        self.degraded = False  # online failed: offline now

    # ------------------------------------------------------------------------------ public
    def update(self, rows: list[dict], final: bool = False) -> None:
        """Log the rows not logged yet (all but the newest, which may still get its eval or
        checkpoint values, unless `final`); rewind first when logged rows were superseded."""
        if self.failed:
            return
        try:
            self._update(rows if final else rows[:-1])
        except Exception as e:  # noqa: BLE001 - W&B never fails a job
            self._degrade(e, rows)

    def finish(self, rows: list[dict], outputs: tuple[ArtifactRef, ...] = (), exit_code: int = 0,
               results: dict | None = None) -> None:
        """The last rows, the outputs as reference artifacts, `results` (an eval job's numbers: the
        run's summary and a table, one row per number), and the run closed."""
        self.update(rows, final=True)
        if self.failed or self.run is None:
            return
        try:
            if results:
                self._results(results)
            for ref in outputs:
                self.run.log_artifact(_artifact(ref), aliases=["latest"])
            self._close(exit_code)
        except Exception as e:  # noqa: BLE001 - W&B never fails a job
            self._warn(f"W&B: could not finish run {self.run_id} ({e})")
        self.run = None

    def info(self) -> dict:
        """What the job record shows: run id, mode, the run folder (offline) or URL (online)."""
        out = {"run_id": self.run_id, "group": self.group, "mode": self.mode, "project": self.cfg.project}
        if self.run_dir:
            out["dir"] = self.run_dir
        if self.url:
            out["url"] = self.url
        if self.degraded:
            out["degraded"] = "online failed: written offline, upload with `orch sync`"
        return out

    # ------------------------------------------------------------------------------ internals
    def _update(self, rows: list[dict]) -> None:
        if not rows:  # (nothing logged yet: no run; a job that fails before training has none)
            return
        if self.run is None:
            self._open()
        keys = [(r["step"], r["attempt"]) for r in rows]
        same = 0
        while same < min(len(keys), len(self.logged)) and keys[same] == self.logged[same]:
            same += 1
        if same < len(self.logged):  # rows logged before were superseded by a resumed attempt
            self._rewind(rows, same)
        restarts = restarts_by_row(rows)
        for i in range(len(self.logged), len(rows)):
            self._log(rows[i], restarts[i])

    def _open(self, **resume) -> None:
        import glob

        import wandb  # (slow to import: only the runner of a tracked job needs it)

        os.makedirs(self.root_dir, exist_ok=True)
        if self.mode == "offline" and not self.logged:
            # Written from the whole history: an earlier folder of this run (a previous runner's,
            # before a head restart) would be a second, partial copy.
            for old in glob.glob(os.path.join(self.root_dir, "wandb", f"offline-run-*-{self.run_id}")):
                shutil.rmtree(old, ignore_errors=True)
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, mode=self.mode, dir=self.root_dir,
            id=None if resume else self.run_id, name=self.name, group=self.group, job_type=self.job_type,
            tags=list(self.cfg.tags), config=self.config, **(resume or {"resume": "allow"}),
            settings=wandb.Settings(console="off", silent=True, init_timeout=self.init_timeout_s,
                                    x_disable_stats=True),  # (this is the runner's node: rank 0 logs system/*)
        )
        self.run_dir = os.path.dirname(self.run.dir)  # .../wandb/offline-run-<time>-<id>
        self.url = self.run.url if self.mode == "online" else None
        self.run.define_metric(STEP_AXIS)
        self.run.define_metric("*", step_metric=STEP_AXIS)
        for ref in self.uses:
            if self.mode == "online":
                self.run.use_artifact(_artifact(ref))
            else:  # offline: what use_artifact does with a draft artifact (logged, then used, at sync)
                self.run._log_artifact(_artifact(ref), is_user_created=True, use_after_commit=True)

    def _results(self, results: dict) -> None:
        import wandb

        numbers = {k: v for k, v in results.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.summary.update({f"eval/{k}": v for k, v in numbers.items()})
        table = wandb.Table(columns=["weights", "step", "metric", "value"],
                            data=[[results.get("weights"), results.get("step"), k, v] for k, v in numbers.items()])
        self.run.log({"eval/results": table}, step=self.wandb_step)

    def _close(self, exit_code: int) -> None:
        """Finish the run and wait until its file is complete: `finish` returns before W&B's
        service has flushed the run's file (seen with 0.31: a file read right after it may lack
        the last rows, or all of them); tearing the service down flushes and closes it."""
        import wandb

        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        wandb.teardown()

    def _log(self, row: dict, restarts: int) -> None:
        step = self.wandb_step + 1 if self.monotonic else row["step"]
        self.run.log(wandb_row(row, restarts), step=step)
        self.wandb_step = step
        self.logged.append((row["step"], row["attempt"]))

    def _rewind(self, rows: list[dict], keep: int) -> None:
        """Drop the logged rows from index `keep` on: the resumed attempt's rows replace them."""
        last_good = rows[keep - 1]["step"] if keep else 0
        old_dir = self.run_dir
        self._close(0)
        if self.mode == "offline":  # write the run folder again, from the history
            if old_dir:
                shutil.rmtree(old_dir, ignore_errors=True)
            self.logged, self.wandb_step = [], 0
            self._open()
            return
        if not self.monotonic:
            try:
                self._open(resume_from=f"{self.run_id}?_step={last_good}")
                self.logged, self.wandb_step = self.logged[:keep], last_good
                return
            except Exception as e:  # noqa: BLE001 - the server has no rewind: keep every row, trainer/step axis
                self._warn(f"W&B: rewinding run {self.run_id} to step {last_good} was refused ({e}); the replayed "
                           f"steps are logged after the others, plotted against {STEP_AXIS}")
                self.monotonic = True
        self._open()
        self.logged = self.logged[:keep]

    def _degrade(self, error: Exception, rows: list[dict]) -> None:
        """Warn once; an online run goes on offline (in the state folder), an offline one stops."""
        try:
            if self.run is not None:
                self.run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - already broken
            pass
        self.run = None
        if self.mode == "online":
            self._drop_online_folders()
            self._warn(f"W&B online failed for run {self.run_id} ({_one_line(error)}); logging offline to "
                       f"{self.root_dir} instead (upload later with `orch sync`); training goes on")
            self.mode, self.logged, self.wandb_step, self.monotonic, self.url = "offline", [], 0, False, None
            self.degraded = True
            try:
                self._update(rows[:-1])
                return
            except Exception as e:  # noqa: BLE001
                error = e
        self._warn(f"W&B failed for run {self.run_id} ({_one_line(error)}); no more W&B logging for this job, "
                   f"its metrics history in the store is complete; training goes on")
        self.failed = True

    def _drop_online_folders(self) -> None:
        """A failed online run leaves W&B's service holding its id and a local folder behind: both
        go (the offline run that replaces it is written from the whole history)."""
        import glob

        import wandb

        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - nothing to tear down
            pass
        for folder in glob.glob(os.path.join(self.root_dir, "wandb", f"run-*-{self.run_id}")):
            shutil.rmtree(folder, ignore_errors=True)

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        self.say(msg)


def _one_line(e: Exception) -> str:
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _artifact(ref: ArtifactRef):
    import wandb

    art = wandb.Artifact(name=ref.name, type=ref.type, metadata=ref.metadata)
    # The URI, not a copy; checksum=False: the digest is the URI's (no reading of the store), so the
    # pretraining run's output and the fine-tune's input are one artifact version.
    art.add_reference(ref.uri, name=ref.type, checksum=False)
    return art


def redact(value, secrets: tuple[str, ...] | None = None):
    """`value` (a config) with every string that holds the value of a secret environment variable
    replaced: belt and braces, since configs are checked for secrets at submit."""
    from orchestrator.constants import SECRET_ENV_VARS

    if secrets is None:
        secrets = tuple(v for v in (os.environ.get(k) for k in SECRET_ENV_VARS) if v and len(v) >= 8)
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return "<redacted>"
    return value


def export_job_id(uri: str | None) -> str | None:
    """The job whose export `uri` is (`<root>/runs/<job>/export`), else None."""
    import re

    m = re.search(r"/runs/([^/]+)/export/?$", uri or "")
    return m.group(1) if m else None
