"""Convert a committed checkpoint into a DeepSpeed universal checkpoint (ds_to_universal) and stage
it for another world size or ZeRO stage.

The conversion runs once per checkpoint (rank 0) and is stored beside it, under
`<checkpoint>/universal/`, with its own marker written last; every rank then downloads it and
renames or adapts the few files whose layout differs between ZeRO 1-2 and ZeRO-3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_tag, download_checkpoint
from orchestrator.checkpoint.safe_load import load
from orchestrator.errors import CheckpointError
from orchestrator.storage import ObjectNotFound, ObjectStore, join_uri
from orchestrator.storage.digest import file_matches, sha256_file

UNIVERSAL_DIR = "universal"  # <checkpoint>/universal/: the checkpoint converted for another world size or stage
UNIVERSAL_MARKER = "UNIVERSAL.json"  # written last in universal/, listing its files
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}  # client state ds_to_universal needs for ZeRO 1-2


def ensure_universal(store: ObjectStore, ref: CheckpointRef, scratch: Path) -> None:
    """Convert a committed checkpoint into a DeepSpeed universal checkpoint under
    `<checkpoint>/universal/` (once; the marker is written last), so it loads at any world size
    or ZeRO stage."""
    uni = join_uri(ref.uri, UNIVERSAL_DIR)
    if store.exists(join_uri(uni, UNIVERSAL_MARKER)):
        return
    tag = checkpoint_tag(ref.step)
    shutil.rmtree(scratch, ignore_errors=True)
    marker = download_checkpoint(store, ref, scratch / "in" / tag)
    out = scratch / "out" / tag
    # DeepSpeed's converter, with every torch.load in it weights-only (orchestrator.checkpoint.safe_load).
    cmd = [sys.executable, "-m", "orchestrator.checkpoint.safe_load", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(scratch / "in" / tag), "--output_folder", str(out),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    here = str(Path(__file__).resolve().parents[2])  # where this orchestrator package is importable from
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=path)
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
            files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    store.put(join_uri(uni, UNIVERSAL_MARKER), json.dumps({"step": ref.step, "files": files}, indent=1).encode())
    shutil.rmtree(scratch, ignore_errors=True)


def download_universal(store: ObjectStore, ref: CheckpointRef, dest: Path, world_size: int, zero_stage: int) -> None:
    """Fetch a checkpoint's universal conversion into `dest`, verified against its marker, laid out
    for `world_size` ranks at ZeRO stage `zero_stage`."""
    uni = join_uri(ref.uri, UNIVERSAL_DIR)
    try:
        marker = json.loads(store.get(join_uri(uni, UNIVERSAL_MARKER)))
    except ObjectNotFound:
        raise CheckpointError(f"{uni} has no {UNIVERSAL_MARKER}: the conversion did not finish") from None
    for f in marker["files"]:
        path = dest / f["path"]
        store.get_file(join_uri(uni, f["path"]), path)
        if not file_matches(path, f["size"], f["sha256"]):
            raise CheckpointError(f"universal checkpoint file {join_uri(uni, f['path'])} does not match its marker")
    _alias_model_states(dest, world_size, zero_stage)
    _adapt_optimizer_state(dest, zero_stage)


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
    path = folder / "zero" / "optimizer_state.pt"
    if not path.exists():
        return
    sd = load(path)
    if zero_stage == 3 and "optimizer_state_dict" not in sd:  # made from ZeRO 1-2
        step_file = next(iter(sorted((folder / "zero").glob("*/step.pt"))), None)
        step = load(step_file) if step_file else None
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
        torch.save(sd, path)
    elif zero_stage < 3 and "optimizer_state_dict" in sd:  # made from ZeRO-3
        # Lazy: importing deepspeed picks its accelerator (DS_ACCELERATOR), and only this path needs it.
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
                    t = load(f)
                    if isinstance(t, torch.Tensor):
                        torch.save({"param": t.view(shapes[param_dir.name]), "cat_dim": 0}, f)
        torch.save(sd, path)


def _param_shapes(folder: Path) -> dict:
    """Parameter name -> shape, from a model-states file of the checkpoint."""
    for f in sorted(folder.glob("*model_states.pt")):
        shapes = load(f, map_location="cpu").get("param_shapes")
        if shapes:
            groups = shapes if isinstance(shapes, list) else [shapes]
            return {name: tuple(shape) for group in groups for name, shape in group.items()}
    return {}
