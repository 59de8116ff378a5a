"""The checkpoint commit/restore protocol of the training workers: save, stage locally, upload in the
background, commit last; restore the newest committed checkpoint that verifies.

Every rank calls `save`/`find_restore`/`load`; rank 0 commits. Each rank stages its own DeepSpeed
files on local disk, uploads them in the background, and lists them (size, sha256) in the store;
rank 0 writes the commit marker last, once every rank's list is there. Restore takes the newest
committed checkpoint whose files verify, falling back to older ones; a checkpoint from another
world size or ZeRO stage goes through a universal checkpoint (orchestrator.checkpoint.universal).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.checkpoint.layout import (
    CheckpointRef,
    checkpoint_tag,
    checkpoint_uri,
    download_checkpoint,
    list_checkpoints,
    read_marker,
    step_of,
)
from orchestrator.checkpoint.retention import protected_steps, read_pins, to_delete
from orchestrator.checkpoint.safe_load import load, weights_only_loads
from orchestrator.checkpoint.universal import UNIVERSAL_INFO, download_universal, ensure_universal
from orchestrator.config.schema import CheckpointConfig
from orchestrator.constants import COMMIT_MARKER, LOCAL_DIR_ENV, TRAINER_STATE
from orchestrator.errors import CheckpointError
from orchestrator.storage import ObjectNotFound, ObjectStore, join_uri
from orchestrator.storage.digest import sha256_file
from orchestrator.storage.local import write_error

log = logging.getLogger(__name__)

RANKS_DIR = "_ranks"  # <checkpoint>/_ranks/<save id>/rank-<r>.json: each rank's uploaded files, until the commit


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


@dataclass
class Restore:
    """A checkpoint chosen, verified and staged on local disk, ready for `load`."""

    ref: CheckpointRef
    marker: dict
    universal: bool  # loaded through a universal checkpoint (another world size or ZeRO stage)
    folder: Path  # engine.load_checkpoint(folder, tag=tag)
    tag: str
    trainer_state: dict
    skipped: list[CheckpointRef]  # newer committed checkpoints that did not verify


class _Upload:
    """One rank's background upload of one save (a thread), and its outcome."""

    def __init__(self, target):
        self.error: BaseException | None = None
        self.seconds = 0.0

        def run():
            t0 = time.perf_counter()
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                self.error = e
            self.seconds = time.perf_counter() - t0

        self.thread = threading.Thread(target=run, name="orch-ckpt-upload", daemon=True)
        self.thread.start()

    def wait(self) -> float:
        """Block until done; raise its error. Returns how long this call waited."""
        t0 = time.perf_counter()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return time.perf_counter() - t0


class Checkpointer:
    """One per worker. `local_dir` is node-local scratch for staging and restores.

    `save` blocks training only while DeepSpeed writes this rank's files to local disk (and while
    the previous save is still uploading); the upload, the per-rank file list and, on rank 0, the
    commit marker and retention happen in a background thread. No collective runs in that thread:
    ranks meet through the store (rank 0 waits for every rank's file list before committing).
    """

    def __init__(self, store: ObjectStore, run: str, local_dir: str | os.PathLike, rank: int, world_size: int,
                 cfg: CheckpointConfig, zero_stage: int, rank0_files: dict[str, bytes] | None = None,
                 on_commit: Callable[[CheckpointRef], None] | None = None, resume_from: str | None = None):
        self.store, self.run = store, run
        self.rank, self.world_size = rank, world_size
        self.cfg, self.zero_stage = cfg, zero_stage
        # Small files rank 0 adds to every checkpoint (the tokenizer, the model config), so that a
        # checkpoint alone is enough to export or sample from the model.
        self.rank0_files = dict(rank0_files or {})
        self.on_commit = on_commit
        self.resume_from = resume_from
        self.local = Path(local_dir) / f"rank-{rank}"
        self._pending: _Upload | None = None
        self.last_upload_s = 0.0

    # ------------------------------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict) -> float:
        """Checkpoint `step` (every rank calls it). Returns the seconds the training loop was blocked."""
        t0 = time.perf_counter()
        self.wait()  # one upload at a time: a new save waits only for the previous one
        save_id = [f"{step}-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None]
        dist.broadcast_object_list(save_id, src=0)  # names this attempt's per-rank file lists
        tag = checkpoint_tag(step)
        staging = self.local / "staging" / save_id[0]
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._stage(engine, staging, tag, trainer_state)
        except (OSError, RuntimeError) as err:
            error = _staging_error(err, staging, step)  # (the free space before the partial files go)
            shutil.rmtree(staging, ignore_errors=True)
            raise error from err

        def upload() -> None:
            self._upload_and_commit(step, staging, tag, save_id[0])

        if self.cfg.async_upload:
            self._pending = _Upload(upload)
        else:
            t_up = time.perf_counter()
            upload()
            self.last_upload_s = time.perf_counter() - t_up
        return time.perf_counter() - t0

    def _stage(self, engine, staging: Path, tag: str, trainer_state: dict) -> None:
        """This rank's files of the checkpoint, on local disk."""
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False,
                               client_state={"trainer_state": trainer_state,
                                             "universal_checkpoint_info": UNIVERSAL_INFO})
        torch.save(_rng_state(), staging / tag / rng_file(self.rank))
        if self.rank == 0:
            extra = dict(self.rank0_files)
            extra[TRAINER_STATE] = json.dumps(trainer_state, indent=1, sort_keys=True).encode()
            for name, data in extra.items():
                (staging / tag / name).write_bytes(data)

    def wait(self) -> float:
        """Wait for the background upload (and, on rank 0, the commit) of the last save."""
        if self._pending is None:
            return 0.0
        pending, self._pending = self._pending, None
        waited = pending.wait()
        self.last_upload_s = pending.seconds
        return waited

    def _upload_and_commit(self, step: int, staging: Path, tag: str, save_id: str) -> None:
        uri = checkpoint_uri(self.run, step)
        files = []
        limit = (self.cfg.upload_limit_mbps or 0) * 1e6
        for path in sorted((staging / tag).rglob("*")):
            if not path.is_file():
                continue
            t0 = time.perf_counter()
            rel = path.relative_to(staging / tag).as_posix()
            self.store.put_file(join_uri(uri, rel), path)
            size = path.stat().st_size
            files.append({"path": rel, "size": size, "sha256": sha256_file(path), "rank": self.rank})
            if limit:  # keep the average rate under the cap
                time.sleep(max(0.0, size / limit - (time.perf_counter() - t0)))
        self.store.put(join_uri(uri, RANKS_DIR, save_id, f"rank-{self.rank}.json"), json.dumps(files).encode())
        shutil.rmtree(staging, ignore_errors=True)
        if self.rank == 0:
            self._commit(step, uri, save_id)

    def _commit(self, step: int, uri: str, save_id: str) -> None:
        """Rank 0: once every rank's file list is in the store, write the marker (last), then prune."""
        deadline = time.time() + self.cfg.commit_timeout_s
        lists: dict[int, list] = {}
        while len(lists) < self.world_size:
            for r in range(self.world_size):
                if r not in lists:
                    try:
                        lists[r] = json.loads(self.store.get(join_uri(uri, RANKS_DIR, save_id, f"rank-{r}.json")))
                    except ObjectNotFound:
                        pass
            if len(lists) < self.world_size:
                if time.time() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(lists))
                    raise CheckpointError(f"checkpoint {uri}: ranks {missing} did not finish uploading within "
                                          f"checkpoint.commit_timeout_s={self.cfg.commit_timeout_s:g}")
                time.sleep(0.05)
        marker = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage,
                  "files": [f for r in range(self.world_size) for f in lists[r]], "committed_at": time.time()}
        self.store.put(join_uri(uri, COMMIT_MARKER), json.dumps(marker, indent=1).encode())  # last: now it exists
        self.store.delete_prefix(join_uri(uri, RANKS_DIR) + "/")
        log.info("checkpoint %s committed", uri)
        refs = list_checkpoints(self.store, self.run)
        pinned = protected_steps(read_pins(self.store, self.run), [r.step for r in refs if r.committed])
        for ref in to_delete(refs, self.cfg.keep_last, self.cfg.keep_every, step, pinned):
            # Marker first, so a half-deleted checkpoint is never mistaken for a committed one.
            self.store.delete(join_uri(ref.uri, COMMIT_MARKER))
            self.store.delete_prefix(ref.uri + "/")
        if self.on_commit is not None:
            self.on_commit(CheckpointRef(step, uri, True))

    # ---------------------------------------------------------------------------------- restore
    def _candidates(self) -> list[CheckpointRef]:
        """Committed checkpoints to resume from, newest first: this run's own, else `resume_from`
        (a checkpoint, or a run whose checkpoints are taken)."""
        own = [r for r in list_checkpoints(self.store, self.run) if r.committed]
        if own or not self.resume_from:
            return list(reversed(own))
        src = self.resume_from.rstrip("/")
        if self.store.exists(join_uri(src, COMMIT_MARKER)):
            return [CheckpointRef(step_of(src), src, True)]
        theirs = [r for r in list_checkpoints(self.store, src) if r.committed]
        if not theirs:
            raise CheckpointError(f"resume_from={self.resume_from} holds no committed checkpoint; "
                                  f"give a .../checkpoints/step-N URI or a run URI with checkpoints")
        return list(reversed(theirs))

    def _needed(self, f: dict) -> bool:
        """Files this rank reads to resume at the same world size: its own, plus rank 0's shared
        ones (stage 1-2 model states, trainer state, tokenizer, model config)."""
        return f["rank"] == self.rank or not f["path"].startswith(("zero_pp_rank_", "rng-rank-"))

    def _vote(self, ok: bool, reason: str) -> str | None:
        votes: list = [None] * self.world_size
        dist.all_gather_object(votes, (ok, reason))
        bad = [r for ok_, r in votes if not ok_]
        return bad[0] if bad else None

    def find_restore(self) -> Restore | None:
        """Choose the newest committed checkpoint that verifies on every rank and stage it locally
        (collective: every rank calls it, before the engine is built, since a checkpoint from another
        world size or ZeRO stage is loaded as a universal checkpoint). None: start fresh."""
        skipped: list[CheckpointRef] = []
        for ref in self._candidates():
            folder = self.local / "restore"
            shutil.rmtree(folder, ignore_errors=True)
            tag = checkpoint_tag(ref.step)
            ok, reason, marker, universal = True, "", {}, False
            try:
                marker = read_marker(self.store, ref)
                universal = (marker["world_size"], marker["zero_stage"]) != (self.world_size, self.zero_stage)
                if not universal:
                    download_checkpoint(self.store, ref, folder / tag, only=self._needed)
                elif self.rank == 0:
                    ensure_universal(self.store, ref, self.local / "convert")
            except (CheckpointError, ValueError, KeyError) as e:
                ok, reason = False, str(e)
            bad = self._vote(ok, reason)
            if bad is None and universal:
                try:
                    download_universal(self.store, ref, folder / tag, self.world_size, self.zero_stage)
                except CheckpointError as e:
                    ok, reason = False, str(e)
                bad = self._vote(ok, reason)
            if bad is not None:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", ref.uri, bad)
                skipped.append(ref)
                continue
            state = json.loads((folder / tag / TRAINER_STATE).read_text())
            if self.rank == 0:
                for c in skipped:  # never resume from these again (only this run's own are touched)
                    if c.uri.startswith(self.run + "/"):
                        self.store.delete(join_uri(c.uri, COMMIT_MARKER))
            return Restore(ref, marker, universal, folder, tag, state, skipped)
        if skipped:
            raise CheckpointError(f"every committed checkpoint to resume from is corrupt (newest: {skipped[0].uri}); "
                                  f"cannot resume")
        return None

    def load(self, engine, restore: Restore) -> dict:
        """Load a staged checkpoint into the engine (model, optimizer, LR schedule) and restore this
        rank's random state when the world size is unchanged. Returns the trainer state."""
        with weights_only_loads():  # DeepSpeed asks for weights_only=False; a checkpoint is data, not code
            engine.load_checkpoint(str(restore.folder), tag=restore.tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        rng = restore.folder / restore.tag / rng_file(self.rank)
        if not restore.universal and rng.exists():
            try:
                _set_rng_state(load(rng))
            except CheckpointError as e:  # written before RNG states were plain tensors and numbers
                log.warning("random state not restored: %s", e)
        shutil.rmtree(restore.folder, ignore_errors=True)
        how = "as a universal checkpoint" if restore.universal else ""
        log.info("resumed from %s (step %d) %s", restore.ref.uri, restore.ref.step, how)
        return restore.trainer_state


def _staging_error(err: Exception, staging: Path, step: int) -> Exception:
    """A full (or read-only) staging disk as one line naming the folder and the fix; torch reports a
    full disk as a RuntimeError without an errno, so the free space decides."""
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        free = shutil.disk_usage(next(p for p in (staging, *staging.parents) if p.exists())).free
        if free > 64 * 2**20:
            return err
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_error(f"cannot stage the checkpoint of step {step} in {staging.parent} (node-local scratch)",
                       err, LOCAL_DIR_ENV)


def _rng_state() -> dict:
    """This rank's random state as tensors and plain numbers, so that it loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),  # (version, tuple of ints, gauss_next): plain data
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
