"""Save, commit, restore and export DeepSpeed checkpoints through the object store.

Runs inside the training workers (every rank calls `save`/`find_restore`/`load`; rank 0 commits).
Each rank stages its own DeepSpeed files on local disk, uploads them in the background, and lists
them (size, sha256) in the store; rank 0 writes the commit marker last, once every rank's list is
there. Restore takes the newest committed checkpoint whose files verify, falling back to older
ones; a checkpoint from another world size or ZeRO stage is converted to a DeepSpeed universal
checkpoint (ds_to_universal) and loaded with load_universal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.checkpoint.layout import (
    CheckpointRef,
    checkpoint_tag,
    checkpoint_uri,
    export_uri,
    list_checkpoints,
    read_marker,
)
from orchestrator.checkpoint.retention import to_delete
from orchestrator.config.schema import CheckpointConfig
from orchestrator.constants import COMMIT_MARKER, EXPORT_MANIFEST, EXPORT_WEIGHTS, TRAINER_STATE
from orchestrator.errors import CheckpointError
from orchestrator.storage import ObjectNotFound, ObjectStore, StorageError, join_uri

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_checkpoint(store: ObjectStore, ref: CheckpointRef, dest: Path, only=None) -> dict:
    """Fetch the files a checkpoint's commit marker lists (those `only(file)` accepts, default all)
    into `dest`, verifying size and sha256."""
    marker = read_marker(store, ref)
    for f in marker["files"]:
        if only is not None and not only(f):
            continue
        path = dest / f["path"]
        try:
            store.get_file(join_uri(ref.uri, f["path"]), path)
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint file {join_uri(ref.uri, f['path'])} listed in its commit marker is missing; "
                                  f"the checkpoint is partial: use an earlier one") from None
        if path.stat().st_size != f["size"] or file_sha256(path) != f["sha256"]:
            raise CheckpointError(
                f"checkpoint file {join_uri(ref.uri, f['path'])} does not match its commit marker (size or sha256); "
                f"the checkpoint is corrupt: use an earlier one"
            )
    return marker


def consolidate_fp32(checkpoint_dir: Path, tag: str) -> dict:
    """The full fp32 state dict of a downloaded ZeRO checkpoint (any stage, any world size)."""
    import contextlib
    import io

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation is CPU work, also on a GPU node
    # It prints progress; keep stdout for results and stderr for errors.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def _dist():
    import torch.distributed as dist

    return dist


RANKS_DIR = "_ranks"  # <checkpoint>/_ranks/<save id>/rank-<r>.json: each rank's uploaded files, until the commit
UNIVERSAL_DIR = "universal"  # <checkpoint>/universal/: the checkpoint converted for another world size or stage
UNIVERSAL_MARKER = "UNIVERSAL.json"  # written last in universal/, listing its files
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}  # client state ds_to_universal needs for ZeRO 1-2


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
        import torch

        t0 = time.perf_counter()
        self.wait()  # one upload at a time: a new save waits only for the previous one
        save_id = [f"{step}-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None]
        _dist().broadcast_object_list(save_id, src=0)  # names this attempt's per-rank file lists
        tag = checkpoint_tag(step)
        staging = self.local / "staging" / save_id[0]
        shutil.rmtree(staging, ignore_errors=True)
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False,
                               client_state={"trainer_state": trainer_state, "universal_checkpoint_info": UNIVERSAL_INFO})
        torch.save(_rng_state(), staging / tag / rng_file(self.rank))
        if self.rank == 0:
            extra = dict(self.rank0_files)
            extra[TRAINER_STATE] = json.dumps(trainer_state, indent=1, sort_keys=True).encode()
            for name, data in extra.items():
                (staging / tag / name).write_bytes(data)

        def upload() -> None:
            self._upload_and_commit(step, staging, tag, save_id[0])

        if self.cfg.async_upload:
            self._pending = _Upload(upload)
        else:
            t_up = time.perf_counter()
            upload()
            self.last_upload_s = time.perf_counter() - t_up
        return time.perf_counter() - t0

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
            files.append({"path": rel, "size": size, "sha256": file_sha256(path), "rank": self.rank})
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
        for ref in to_delete(list_checkpoints(self.store, self.run), self.cfg.keep_last, self.cfg.keep_every, step):
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
            step = int(src.rsplit("step-", 1)[1])
            return [CheckpointRef(step, src, True)]
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
        _dist().all_gather_object(votes, (ok, reason))
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
        import torch

        engine.load_checkpoint(str(restore.folder), tag=restore.tag, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        rng = restore.folder / restore.tag / rng_file(self.rank)
        if not restore.universal and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        shutil.rmtree(restore.folder, ignore_errors=True)
        how = "as a universal checkpoint" if restore.universal else ""
        log.info("resumed from %s (step %d) %s", restore.ref.uri, restore.ref.step, how)
        return restore.trainer_state


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def ensure_universal(store: ObjectStore, ref: CheckpointRef, scratch: Path) -> None:
    """Convert a committed checkpoint into a DeepSpeed universal checkpoint under
    `<checkpoint>/universal/` (once; the marker is written last), so it loads at any world size
    or ZeRO stage."""
    import subprocess
    import sys

    uni = join_uri(ref.uri, UNIVERSAL_DIR)
    if store.exists(join_uri(uni, UNIVERSAL_MARKER)):
        return
    tag = checkpoint_tag(ref.step)
    shutil.rmtree(scratch, ignore_errors=True)
    marker = download_checkpoint(store, ref, scratch / "in" / tag)
    out = scratch / "out" / tag
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(scratch / "in" / tag),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        raise CheckpointError(f"converting {ref.uri} to a universal checkpoint failed: {tail[0]}")
    # The trainer state, tokenizer and model config travel with it.
    for f in marker["files"]:
        if not f["path"].startswith(("zero_pp_rank_", "mp_rank_", "rng-rank-")) and not (out / f["path"]).exists():
            shutil.copy(scratch / "in" / tag / f["path"], out / f["path"])
    files = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            rel = path.relative_to(out).as_posix()
            store.put_file(join_uri(uni, rel), path)
            files.append({"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path)})
    store.put(join_uri(uni, UNIVERSAL_MARKER), json.dumps({"step": ref.step, "files": files}, indent=1).encode())
    shutil.rmtree(scratch, ignore_errors=True)


def _alias_model_states(folder: Path, world_size: int, zero_stage: int) -> None:
    """DeepSpeed looks for the model-states file under the target layout's name (ZeRO-3: one per
    rank, `zero_pp_rank_<r>_mp_rank_00_model_states.pt`; ZeRO 1-2: `mp_rank_00_model_states.pt`).
    With a universal checkpoint the weights come from its per-parameter files, and these files only
    carry the client and scheduler state, so any one of them serves every rank."""
    existing = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not existing:
        return
    names = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if zero_stage == 3
             else ["mp_rank_00_model_states.pt"])
    for name in names:
        if not (folder / name).exists():
            shutil.copy(existing[0], folder / name)


def _adapt_optimizer_state(folder: Path, zero_stage: int) -> None:
    """Let a universal checkpoint cross between ZeRO 1-2 and ZeRO-3 (DeepSpeed 0.19 writes the two
    layouts a little differently): from 1-2 into 3, the global optimizer state gains the nested
    state dict the stage-3 loader reads the step count from; from 3 into 1-2, it gains the
    DeepSpeed version the stage-1/2 loader checks, and each parameter folder its step count."""
    import torch

    path = folder / "zero" / "optimizer_state.pt"
    if not path.exists():
        return
    sd = torch.load(path, weights_only=False)
    if zero_stage == 3 and "optimizer_state_dict" not in sd:  # made from ZeRO 1-2
        step_file = next(iter(sorted((folder / "zero").glob("*/step.pt"))), None)
        step = torch.load(step_file, weights_only=False) if step_file else None
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
        torch.save(sd, path)
    elif zero_stage < 3 and "optimizer_state_dict" in sd:  # made from ZeRO-3
        import deepspeed

        sd.setdefault("ds_version", deepspeed.__version__)
        step = sd["optimizer_state_dict"].get("state", {}).get(0, {}).get("step")
        shapes = _param_shapes(folder)
        for param_dir in (folder / "zero").iterdir():
            if not param_dir.is_dir():
                continue
            if step is not None and not (param_dir / "step.pt").exists():  # stages 1-2 read it per parameter
                torch.save(step, param_dir / "step.pt")
            for key in ("fp32", "exp_avg", "exp_avg_sq"):  # flat tensors -> {"param": shaped, "cat_dim": 0}
                f = param_dir / f"{key}.pt"
                if f.exists() and param_dir.name in shapes:
                    t = torch.load(f, weights_only=False)
                    if isinstance(t, torch.Tensor):
                        torch.save({"param": t.view(shapes[param_dir.name]), "cat_dim": 0}, f)
        torch.save(sd, path)


def _param_shapes(folder: Path) -> dict:
    """Parameter name -> shape, from a model-states file of the checkpoint."""
    import torch

    for f in sorted(folder.glob("*model_states.pt")):
        shapes = torch.load(f, map_location="cpu", weights_only=False).get("param_shapes")
        if shapes:
            groups = shapes if isinstance(shapes, list) else [shapes]
            return {name: tuple(shape) for group in groups for name, shape in group.items()}
    return {}


def download_universal(store: ObjectStore, ref: CheckpointRef, dest: Path, world_size: int, zero_stage: int) -> None:
    uni = join_uri(ref.uri, UNIVERSAL_DIR)
    try:
        marker = json.loads(store.get(join_uri(uni, UNIVERSAL_MARKER)))
    except ObjectNotFound:
        raise CheckpointError(f"{uni} has no {UNIVERSAL_MARKER}: the conversion did not finish") from None
    universal = CheckpointRef(ref.step, uni, True)
    for f in marker["files"]:
        path = dest / f["path"]
        store.get_file(join_uri(universal.uri, f["path"]), path)
        if path.stat().st_size != f["size"] or file_sha256(path) != f["sha256"]:
            raise CheckpointError(f"universal checkpoint file {join_uri(uni, f['path'])} does not match its marker")
    _alias_model_states(dest, world_size, zero_stage)
    _adapt_optimizer_state(dest, zero_stage)


def export_checkpoint(store: ObjectStore, run: str, ref: CheckpointRef, meta: dict, local_dir: str | os.PathLike) -> str:
    """Consolidate a committed checkpoint's fp32 weights (any ZeRO stage, any world size) into the
    run's model-only export: safetensors weights, tokenizer, model config, manifest written last."""
    from safetensors.torch import save_file

    from orchestrator.constants import MODEL_CONFIG, TOKENIZER

    dest = Path(local_dir) / "export"
    shutil.rmtree(dest, ignore_errors=True)
    tag = checkpoint_tag(ref.step)
    download_checkpoint(store, ref, dest / tag)
    state = consolidate_fp32(dest, tag)
    # Tied weights share storage; safetensors stores each tensor once, so keep one name.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if k != "lm_head.weight"}
    weights = dest / EXPORT_WEIGHTS
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = export_uri(run)
    store.put_file(join_uri(out, EXPORT_WEIGHTS), weights)
    for name in (TOKENIZER, MODEL_CONFIG):
        if (dest / tag / name).exists():
            store.put(join_uri(out, name), (dest / tag / name).read_bytes())
    manifest = dict(meta, step=ref.step, checkpoint=ref.uri, weights=EXPORT_WEIGHTS,
                    sha256=file_sha256(weights), exported_at=time.time())
    store.put(join_uri(out, EXPORT_MANIFEST), json.dumps(manifest, indent=1).encode())  # last
    shutil.rmtree(dest, ignore_errors=True)
    return out


def load_exported_weights(store: ObjectStore, export: str, local_dir: str | os.PathLike) -> dict:
    """The state dict of an export (tied lm_head restored), checked against its sha256."""
    from safetensors.torch import load_file

    manifest_uri = join_uri(export, EXPORT_MANIFEST)
    try:
        manifest = json.loads(store.get(manifest_uri))
    except StorageError:
        raise CheckpointError(f"no exported model at {export} (missing {EXPORT_MANIFEST}); the job that made it must succeed first") from None
    path = Path(local_dir) / "init" / EXPORT_WEIGHTS
    store.get_file(join_uri(export, manifest["weights"]), path)
    if file_sha256(path) != manifest["sha256"]:
        raise CheckpointError(f"exported weights {join_uri(export, manifest['weights'])} do not match their sha256; export again")
    state = load_file(str(path))
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
