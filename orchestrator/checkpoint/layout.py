"""Where a run's checkpoints and export live in the store, which of them are committed, and
fetching a committed checkpoint's files as its commit marker lists them.

    <run>/checkpoints/step-<N>/<DeepSpeed files of every rank>
    <run>/checkpoints/step-<N>/trainer_state.json
    <run>/checkpoints/step-<N>/COMMITTED.json   <- written last; lists every file, size, sha256
    <run>/export/model.safetensors, config.json, tokenizer.json, export.json (written last)

A checkpoint exists only once its commit marker does. Pure helpers over an ObjectStore; no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.config.schema import MAX_NAME, safe_name
from orchestrator.constants import CHECKPOINTS_DIR, COMMIT_MARKER, EXPORT_DIR, EXPORT_MANIFEST, RUNS_PREFIX
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.storage import ObjectNotFound, ObjectStore, is_relative_key, join_uri
from orchestrator.storage.digest import file_matches

_STEP_DIR = re.compile(r"/step-(\d+)/")  # a checkpoint folder inside an object's URI
_STEP_NAME = re.compile(r"step-(\d+)")  # a checkpoint folder's name


def run_uri(storage_root: str, job_id: str) -> str:
    """<storage root>/runs/<job id>: the id is one safe segment, so a run never lands outside runs/."""
    try:
        safe_name(job_id, "job id", max_len=2 * MAX_NAME)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return join_uri(storage_root, RUNS_PREFIX, job_id)


def checkpoints_uri(run: str) -> str:
    return join_uri(run, CHECKPOINTS_DIR)


def checkpoint_tag(step: int) -> str:
    return f"step-{step}"


def checkpoint_uri(run: str, step: int) -> str:
    return join_uri(checkpoints_uri(run), checkpoint_tag(step))


def step_of(uri: str) -> int:
    """The step of a checkpoint URI `.../step-N` (a trailing slash is allowed)."""
    m = _STEP_NAME.fullmatch(uri.rstrip("/").rsplit("/", 1)[-1])
    if m is None:
        raise CheckpointError(f"{uri} is not a checkpoint folder: its name is not step-N; "
                              f"give a .../checkpoints/step-N URI")
    return int(m.group(1))


def checkpoint_name(uri: str) -> str:
    """The name of a checkpoint URI `.../step-N` (step-N)."""
    return checkpoint_tag(step_of(uri))


def export_uri(run: str) -> str:
    return join_uri(run, EXPORT_DIR)


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str  # the step-<N> folder
    committed: bool


def list_checkpoints(store: ObjectStore, run: str) -> list[CheckpointRef]:
    """Every checkpoint folder of a run, oldest first, with whether its marker exists."""
    steps: dict[int, bool] = {}
    for obj in store.list(checkpoints_uri(run) + "/"):
        m = _STEP_DIR.search(obj.uri[len(checkpoints_uri(run)) :])
        if m:
            step = int(m.group(1))
            steps[step] = steps.get(step, False) or obj.uri.endswith("/" + COMMIT_MARKER)
    return [CheckpointRef(s, checkpoint_uri(run, s), c) for s, c in sorted(steps.items())]


def latest_committed(store: ObjectStore, run: str) -> CheckpointRef | None:
    committed = [c for c in list_checkpoints(store, run) if c.committed]
    return committed[-1] if committed else None


def read_marker(store: ObjectStore, ckpt: CheckpointRef) -> dict:
    """A checkpoint's commit marker, checked: JSON that lists every file (a path inside the
    checkpoint, its size and sha256) with the world size and ZeRO stage it was saved at."""
    uri = join_uri(ckpt.uri, COMMIT_MARKER)
    try:
        marker = json.loads(store.get(uri))
        why = _marker_problem(marker)
    except ObjectNotFound:
        why = "it is missing"
    except ValueError as e:  # not JSON, or not UTF-8
        why = f"it is not JSON: {e}"
    if why:
        raise CheckpointError(f"the commit marker {uri} is not valid ({why}); the checkpoint is damaged: "
                              f"use an earlier checkpoint (or the run's folder, which falls back to one)")
    return marker


def _marker_problem(marker: object) -> str | None:
    """What is wrong with a parsed commit marker, or None."""
    if not isinstance(marker, dict):
        return f"a {type(marker).__name__}, not an object"
    for key in ("files", "world_size", "zero_stage"):
        if key not in marker:
            return f"no {key!r}"
    if not isinstance(marker["world_size"], int) or not isinstance(marker["zero_stage"], int):
        return "world_size and zero_stage must be integers"
    if not isinstance(marker["files"], list) or not marker["files"]:
        return "'files' must list the checkpoint's files"
    for f in marker["files"]:
        if not (isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)):
            return f"file entry {f!r} needs a path, a size and a sha256"
        if not is_relative_key(f.get("path")):
            return f"file path {f.get('path')!r} is not a path inside the checkpoint"
    return None


def check_committed(store: ObjectStore, ref: CheckpointRef) -> dict:
    """The marker of a committed checkpoint whose files are all in the store at the sizes it lists
    (one listing, no reads: the sha256 are checked when the files are fetched). CheckpointError,
    naming the file, otherwise."""
    marker = read_marker(store, ref)
    sizes = {o.uri: o.size for o in store.list(ref.uri + "/")}
    for f in marker["files"]:
        uri = join_uri(ref.uri, f["path"])
        try:
            size = sizes[uri] if uri in sizes else store.size(uri)  # (a listing skips symlinked folders)
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint file {uri} listed in its commit marker is missing; the checkpoint is "
                                  f"partial: use an earlier one") from None
        if size != f["size"]:
            raise CheckpointError(f"checkpoint file {uri} is {size} bytes, its commit marker says {f['size']}; "
                                  f"the checkpoint is damaged: use an earlier one")
    return marker


def download_checkpoint(store: ObjectStore, ref: CheckpointRef, dest: Path,
                        only: Callable[[dict], bool] | None = None) -> dict:
    """Fetch the files a checkpoint's commit marker lists (those `only(file)` accepts, default all)
    into `dest`, verifying size and sha256. Returns the marker."""
    marker = read_marker(store, ref)
    for f in marker["files"]:
        if only is not None and not only(f):
            continue
        path = dest / f["path"]
        try:
            store.get_file(join_uri(ref.uri, f["path"]), path)
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint file {join_uri(ref.uri, f['path'])} listed in its commit marker "
                                  f"is missing; the checkpoint is partial: use an earlier one") from None
        if not file_matches(path, f["size"], f["sha256"]):
            raise CheckpointError(
                f"checkpoint file {join_uri(ref.uri, f['path'])} does not match its commit marker (size or sha256); "
                f"the checkpoint is corrupt: use an earlier one"
            )
    return marker


def read_export(store: ObjectStore, run: str) -> dict | None:
    """The export manifest of a run, or None if the run has not exported."""
    try:
        return json.loads(store.get(join_uri(export_uri(run), EXPORT_MANIFEST)))
    except ObjectNotFound:
        return None
