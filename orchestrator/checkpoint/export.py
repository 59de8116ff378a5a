"""Export: a committed checkpoint's consolidated fp32 weights as the run's model-only export
(safetensors, tokenizer, model config, manifest last), and the weights read back from one.

The CLI imports this module (`orch export`, `orch generate`), so torch, safetensors and deepspeed
load inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_tag, download_checkpoint, export_uri
from orchestrator.constants import EXPORT_MANIFEST, EXPORT_WEIGHTS, MODEL_CONFIG, TOKENIZER
from orchestrator.errors import CheckpointError
from orchestrator.storage import ObjectStore, StorageError, is_relative_key, join_uri
from orchestrator.storage.digest import sha256_file


def consolidate_fp32(checkpoint_dir: Path, tag: str) -> dict:
    """The full fp32 state dict of a downloaded ZeRO checkpoint (any stage, any world size)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation is CPU work, also on a GPU node
    # It prints progress; keep stdout for results and stderr for errors.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # Lazy: deepspeed picks its accelerator when imported, so only after DS_ACCELERATOR is set.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from orchestrator.checkpoint.safe_load import weights_only_loads  # (torch: only when exporting)

        with weights_only_loads():  # DeepSpeed asks for weights_only=False; a checkpoint is data, not code
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def export_checkpoint(store: ObjectStore, run: str, ref: CheckpointRef, meta: dict,
                      local_dir: str | os.PathLike, tied: dict[str, str]) -> str:
    """Consolidate a committed checkpoint's fp32 weights (any ZeRO stage, any world size) into the
    run's model-only export: safetensors weights, tokenizer, model config, manifest written last.
    `tied`: {alias: source} of weights that are one tensor (the family's tied_weights); only the
    source is written."""
    from safetensors.torch import save_file  # lazy: loads torch, which the CLI's other commands do without

    dest = Path(local_dir) / "export"
    shutil.rmtree(dest, ignore_errors=True)
    tag = checkpoint_tag(ref.step)
    download_checkpoint(store, ref, dest / tag)
    state = consolidate_fp32(dest, tag)
    # Tied weights share storage; safetensors stores each tensor once, so keep one name.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if k not in tied}
    weights = dest / EXPORT_WEIGHTS
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = export_uri(run)
    store.put_file(join_uri(out, EXPORT_WEIGHTS), weights)
    for name in (TOKENIZER, MODEL_CONFIG):
        if (dest / tag / name).exists():
            store.put(join_uri(out, name), (dest / tag / name).read_bytes())
    manifest = dict(meta, step=ref.step, checkpoint=ref.uri, weights=EXPORT_WEIGHTS,
                    sha256=sha256_file(weights), exported_at=time.time())
    store.put(join_uri(out, EXPORT_MANIFEST), json.dumps(manifest, indent=1).encode())  # last
    shutil.rmtree(dest, ignore_errors=True)
    return out


def load_exported_weights(store: ObjectStore, export: str, local_dir: str | os.PathLike,
                          tied: dict[str, str]) -> dict:
    """The state dict of an export (`tied`: {alias: source} restored), checked against its sha256."""
    from safetensors.torch import load_file  # lazy: loads torch, which the CLI's other commands do without

    manifest_uri = join_uri(export, EXPORT_MANIFEST)
    try:
        manifest = json.loads(store.get(manifest_uri))
        if not is_relative_key(manifest["weights"]) or not isinstance(manifest["sha256"], str):
            raise ValueError("'weights' must be a file inside the export, with its 'sha256'")
    except StorageError:
        raise CheckpointError(f"no exported model at {export} (missing {EXPORT_MANIFEST}); "
                              f"the job that made it must succeed first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_uri} is not a valid export manifest ({type(e).__name__}: {e}); "
                              f"export the checkpoint again") from None
    path = Path(local_dir) / "init" / EXPORT_WEIGHTS
    store.get_file(join_uri(export, manifest["weights"]), path)
    if sha256_file(path) != manifest["sha256"]:
        raise CheckpointError(f"exported weights {join_uri(export, manifest['weights'])} do not match their sha256; "
                              f"export again")
    state = load_file(str(path))
    for alias, source in tied.items():
        if source in state:
            state[alias] = state[source]
    return state
