"""Save, commit, restore and export DeepSpeed checkpoints through the object store.

Runs inside the training workers (every rank calls `save`/`restore`; rank 0 commits and exports).
Each rank stages its own DeepSpeed files on local disk, uploads them, and reports their sizes and
sha256 to rank 0, which writes the commit marker last. Restore takes the newest committed
checkpoint whose files verify, falling back to older ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from orchestrator.checkpoint.layout import (
    CheckpointRef,
    checkpoint_tag,
    checkpoint_uri,
    export_uri,
    list_checkpoints,
    read_marker,
)
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


class Checkpointer:
    """One per worker. `local_dir` is node-local scratch space for staging and restores."""

    def __init__(self, store: ObjectStore, run: str, local_dir: str | os.PathLike, rank: int, world_size: int,
                 keep_last: int, rank0_files: dict[str, bytes] | None = None):
        self.store, self.run = store, run
        # Small files rank 0 adds to every checkpoint (the tokenizer, the model config), so that a
        # checkpoint alone is enough to export or sample from the model.
        self.rank0_files = dict(rank0_files or {})
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.local = Path(local_dir) / f"rank-{rank}"

    # ------------------------------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict) -> CheckpointRef:
        """Save on every rank, upload, and commit (rank 0). Returns the committed checkpoint."""
        tag = checkpoint_tag(step)
        staging = self.local / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        t0 = time.perf_counter()
        engine.save_checkpoint(str(staging), tag=tag, client_state={"trainer_state": trainer_state}, save_latest=False)
        uri = checkpoint_uri(self.run, step)
        files = []
        for path in sorted((staging / tag).rglob("*")):
            if path.is_file():
                rel = path.relative_to(staging / tag).as_posix()
                self.store.put_file(join_uri(uri, rel), path)
                files.append({"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path), "rank": self.rank})
        gathered: list = [None] * self.world_size
        _dist().all_gather_object(gathered, files)
        if self.rank == 0:
            all_files = [f for per_rank in gathered for f in per_rank]
            extra = dict(self.rank0_files)
            extra[TRAINER_STATE] = json.dumps(trainer_state, indent=1, sort_keys=True).encode()
            for name, data in extra.items():
                self.store.put(join_uri(uri, name), data)
                all_files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0})
            marker = {"step": step, "world_size": self.world_size, "zero_stage": engine.zero_optimization_stage(),
                      "files": all_files, "committed_at": time.time()}
            self.store.put(join_uri(uri, COMMIT_MARKER), json.dumps(marker, indent=1).encode())  # last
            self._retain(step)
        _dist().barrier()
        shutil.rmtree(staging, ignore_errors=True)
        log.info("checkpoint %s committed in %.2fs", uri, time.perf_counter() - t0)
        return CheckpointRef(step, uri, True)

    def _retain(self, just_committed: int) -> None:
        """Keep the newest `keep_last` committed checkpoints (always the one just committed); drop
        older ones and the leftovers of crashed saves."""
        refs = list_checkpoints(self.store, self.run)
        committed = [r.step for r in refs if r.committed]
        keep = set(committed[-self.keep_last :]) | {just_committed}
        for ref in refs:
            if ref.step in keep or (ref.committed and ref.step > just_committed):
                continue  # never delete a committed checkpoint newer than ours: that is not ours to judge
            # Marker first, so a half-deleted checkpoint is never mistaken for a committed one.
            self.store.delete(join_uri(ref.uri, COMMIT_MARKER))
            self.store.delete_prefix(ref.uri + "/")

    # ---------------------------------------------------------------------------------- restore
    def _needed(self, f: dict) -> bool:
        """Files this rank reads to resume at the same world size: its own, plus rank 0's shared
        ones (stage 1-2 model states, trainer state, tokenizer, model config)."""
        return f["rank"] == self.rank or not f["path"].startswith("zero_pp_rank_")

    def restore(self, engine) -> dict | None:
        """Load the newest committed checkpoint whose files verify on every rank; its trainer state,
        or None when there is none. A corrupt or partial checkpoint is skipped (and de-committed,
        so it is never tried again) in favour of the one before; storage errors are raised."""
        refs = [r for r in list_checkpoints(self.store, self.run) if r.committed]
        corrupt: list[CheckpointRef] = []
        for ref in reversed(refs):
            dest = self.local / "restore"
            shutil.rmtree(dest, ignore_errors=True)
            tag = checkpoint_tag(ref.step)
            ok, reason, marker = True, "", None
            try:
                marker = read_marker(self.store, ref)
                if marker["world_size"] == self.world_size:
                    download_checkpoint(self.store, ref, dest / tag, only=self._needed)
            except (CheckpointError, ValueError, KeyError) as e:
                ok, reason = False, str(e)
            votes: list = [None] * self.world_size
            _dist().all_gather_object(votes, (ok, reason))
            bad = [r for ok_, r in votes if not ok_]
            if bad:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", ref.uri, bad[0])
                corrupt.append(ref)
                continue
            if marker["world_size"] != self.world_size:
                raise CheckpointError(
                    f"checkpoint {ref.uri} was saved by {marker['world_size']} workers, this run has {self.world_size}; "
                    f"resuming at another worker count is not supported yet: run with workers={marker['world_size']}"
                )
            engine.load_checkpoint(str(dest), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            state = json.loads((dest / tag / TRAINER_STATE).read_text())
            shutil.rmtree(dest, ignore_errors=True)
            if self.rank == 0:
                for c in corrupt:  # never resume from these again
                    self.store.delete(join_uri(c.uri, COMMIT_MARKER))
            log.info("resumed from %s (step %d)", ref.uri, ref.step)
            self.resumed_from, self.skipped = ref, corrupt
            return state
        if corrupt:
            raise CheckpointError(f"every committed checkpoint of {self.run} is corrupt (newest: {corrupt[0].uri}); "
                                  f"cannot resume")
        return None


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
