"""Models outside training: find one (a job, a checkpoint, an export or a Hugging Face folder), load
its fp32 weights, write it as a Hugging Face folder, sample from it.

    orch export CHECKPOINT DIR        CHECKPOINT: job id | .../checkpoints/step-N | .../export | run URI
    orch generate CHECKPOINT --prompt "..."
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig
from model.registry import FAMILIES, family_for_hf, family_of  # (torch-free: a family's code loads on use)
from orchestrator.checkpoint.export import consolidate_fp32, load_exported_weights
from orchestrator.checkpoint.layout import CheckpointRef, checkpoint_tag, download_checkpoint, latest_committed, step_of
from orchestrator.config.typed import build
from orchestrator.constants import COMMIT_MARKER, EXPORT_MANIFEST, EXPORT_MARKER, MODEL_CONFIG, TOKENIZER
from orchestrator.errors import CheckpointError, ConfigError, StorageError
from orchestrator.storage import LocalStore, ObjectNotFound, ObjectStore, join_uri, open_store, to_uri
from orchestrator.storage.claim import claim_destination

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"


@dataclass
class ModelSource:
    kind: str  # "checkpoint" | "export" | "hf"
    uri: str
    store: ObjectStore


@dataclass
class ModelArtifact:
    model: ModelConfig
    state_dict: dict
    tokenizer_json: str | None
    source: str


def _not_a_model(ref: str) -> CheckpointError:
    return CheckpointError(
        f"{ref} is not a model: no {COMMIT_MARKER} (checkpoint), {EXPORT_MANIFEST} (export) or {HF_CONFIG} "
        f"(Hugging Face folder) there; pass a job id, a checkpoint URI (.../checkpoints/step-N), an export URI "
        f"or an HF folder"
    )


def job_source(job_id: str, checkpoint: str | None, store: ObjectStore, state: str) -> ModelSource:
    """A job's latest committed checkpoint (from its record) as a model source; one line when it has
    none yet, or when its folder is gone from the store."""
    if not checkpoint:
        raise CheckpointError(f"job {job_id} has no committed checkpoint yet (state {state}); "
                              f"wait for one or pick another job")
    if not store.exists(join_uri(checkpoint, COMMIT_MARKER)):
        raise CheckpointError(f"job {job_id}'s checkpoint {checkpoint} is gone from the store (no commit marker "
                              f"there): it was deleted or moved; pass the URI of a checkpoint or export that exists")
    return ModelSource("checkpoint", checkpoint, store)


def resolve(ref: str, endpoint_url: str | None = None, state_dir: str | None = None) -> ModelSource:
    """What `ref` names: a URI/path of a checkpoint, a run, an export, or a Hugging Face folder (a job
    id is looked up by the caller, which holds the job records: `job_source`). `state_dir` only
    names where job ids were looked for, in the error."""
    if "://" not in ref and not os.path.isabs(ref):
        if not os.path.exists(ref):
            where = f"a job id in {state_dir} nor " if state_dir else ""
            raise CheckpointError(f"{ref} is neither {where}an existing path; "
                                  f"pass a job id, a URI or a folder")
        ref = os.path.abspath(ref)
    uri = to_uri(ref).rstrip("/")
    store = open_store(uri, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))
    if store.exists(join_uri(uri, COMMIT_MARKER)):
        return ModelSource("checkpoint", uri, store)
    if store.exists(join_uri(uri, EXPORT_MANIFEST)):
        return ModelSource("export", uri, store)
    if store.exists(join_uri(uri, HF_CONFIG)):
        return ModelSource("hf", uri, store)
    newest = latest_committed(store, uri)  # a run folder
    if newest is not None:
        return ModelSource("checkpoint", newest.uri, store)
    raise _not_a_model(ref)


def _get_text(store: ObjectStore, uri: str) -> str | None:
    try:
        return store.get(uri).decode()
    except ObjectNotFound:
        return None


def _model_config(store: ObjectStore, folder: str) -> ModelConfig:
    text = _get_text(store, join_uri(folder, MODEL_CONFIG))
    if text is None:
        raise CheckpointError(
            f"{folder} has no {MODEL_CONFIG}, so its architecture is unknown; use a checkpoint or export written by "
            f"this version of orch"
        )
    try:
        return build(ModelConfig, json.loads(text), "model")
    except (ValueError, ConfigError) as e:
        raise CheckpointError(f"{join_uri(folder, MODEL_CONFIG)} is not a valid model config ({e}); "
                              f"the checkpoint is damaged") from None


def read_model_config(source: ModelSource) -> ModelConfig:
    """The architecture of a model source, without loading its weights."""
    if source.kind in ("checkpoint", "export"):
        return _model_config(source.store, source.uri)
    return _hf_model_config(source.store, source.uri)


def _hf_model_config(store: ObjectStore, folder: str, name: str = "hf") -> ModelConfig:
    """The model config of a Hugging Face folder's config.json (its family by model_type);
    CheckpointError naming the file otherwise."""
    uri = join_uri(folder, HF_CONFIG)
    try:
        text = store.get(uri)
    except ObjectNotFound:
        raise _not_a_model(folder) from None
    try:
        hf = json.loads(text)
        if not isinstance(hf, dict):
            raise ValueError(f"a JSON {type(hf).__name__}, not an object")
        return dataclasses.replace(family_for_hf(hf).from_hf_config(hf), name=name)
    except (ValueError, TypeError, KeyError) as e:  # not JSON, no family reads it, nonsense values
        kinds = ", ".join(f"{f.hf_architecture} (model_type {f.hf_model_type!r})" for f in FAMILIES.values())
        raise CheckpointError(f"{uri} is not a usable model config ({e}); orch reads Hugging Face folders of "
                              f"{kinds}") from None


def load(source: ModelSource) -> ModelArtifact:
    """fp32 weights (our names), architecture and tokenizer of a model source."""
    with tempfile.TemporaryDirectory(prefix="orch-model-") as tmp:
        if source.kind == "checkpoint":
            step = step_of(source.uri)
            tag = checkpoint_tag(step)
            model = _model_config(source.store, source.uri)  # before the heavy part
            download_checkpoint(source.store, CheckpointRef(step, source.uri, True), Path(tmp) / tag)
            state = consolidate_fp32(Path(tmp), tag)
            return ModelArtifact(model, dict(state),
                                 _get_text(source.store, join_uri(source.uri, TOKENIZER)), source.uri)
        if source.kind == "export":
            model = _model_config(source.store, source.uri)
            state = load_exported_weights(source.store, source.uri, tmp, family_of(model).tied_weights(model))
            return ModelArtifact(model, state, _get_text(source.store, join_uri(source.uri, TOKENIZER)), source.uri)
        return load_hf(source.store, source.uri, Path(tmp))


def load_hf(store: ObjectStore, folder: str, tmp: Path, name: str = "hf") -> ModelArtifact:
    """A Hugging Face folder (config.json + model.safetensors) of a family orch has, as our weights."""
    from safetensors.torch import load_file  # (torch: only with weights)

    config = _hf_model_config(store, folder, name)
    weights = tmp / HF_WEIGHTS
    try:
        store.get_file(join_uri(folder, HF_WEIGHTS), weights)
    except ObjectNotFound:
        raise CheckpointError(f"{folder} has no {HF_WEIGHTS}; "
                              f"orch reads Hugging Face weights in safetensors format only") from None
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors' own error class (truncated, not safetensors at all)
        raise CheckpointError(f"{join_uri(folder, HF_WEIGHTS)} is not a readable safetensors file "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                              f"it is truncated or damaged: copy or export it again") from None
    try:
        state = {k: v.float() for k, v in family_of(config).from_hf_state_dict(tensors, config).items()}
    except ValueError as e:
        raise CheckpointError(f"{join_uri(folder, HF_WEIGHTS)} does not fit its {HF_CONFIG}: {e}") from None
    return ModelArtifact(config, state, _get_text(store, join_uri(folder, TOKENIZER)), folder)


def build_model(artifact: ModelArtifact):
    """An eval-mode model of the artifact's family holding its weights."""
    model = family_of(artifact.model).build(artifact.model)
    model.load_state_dict(artifact.state_dict)
    return model.eval()


def write_hf(artifact: ModelArtifact, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads (its family's class),
    with the tokenizer as a `PreTrainedTokenizerFast`. The folder must be new, empty or an earlier
    `orch export` of the same source (its marker file names it), unless `overwrite`; the files are
    written beside it first and moved in at the end, so a failure leaves nothing half-written."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export destination {out} is a file; give a folder path")
    eot = _eot_id(artifact.tokenizer_json)
    try:
        hf_config = family_of(artifact.model).to_hf_config(artifact.model, bos_token_id=eot, eos_token_id=eot)
    except ValueError as e:
        raise ConfigError(f"cannot export {artifact.source} to Hugging Face: {e}") from None
    if not overwrite:
        _check_same_source(out, artifact.source)
    try:
        claim_destination(LocalStore(), to_uri(out), EXPORT_MARKER, "export", overwrite=overwrite)
        with tempfile.TemporaryDirectory(prefix=".orch-export-", dir=out.parent) as tmp:
            _write_hf_files(artifact, hf_config, eot, Path(tmp))
            # the marker names the source, moved in with the files it describes
            note = {**_export_note(out), "source": artifact.source}
            (Path(tmp) / EXPORT_MARKER).write_text(json.dumps(note))
            for f in sorted(Path(tmp).iterdir()):
                os.replace(f, out / f.name)
    except (OSError, StorageError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot write the export to {out}: {why}; choose a folder you can write to") from None
    return out


def _export_note(out: Path) -> dict:
    """The marker of an earlier `orch export` in `out` ({} when there is none, or it is not JSON)."""
    try:
        note = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _check_same_source(out: Path, source: str) -> None:
    """Refuse to replace, without --overwrite, an earlier export in `out` of another model (its
    marker names its source; one written before markers named it may be replaced)."""
    theirs = _export_note(out).get("source")
    if theirs and theirs != source:
        raise ConfigError(f"export destination {out} holds the export of {theirs}, not of {source}; "
                          f"give another folder, or pass --overwrite to replace it")


def hf_architecture(artifact: ModelArtifact) -> str:
    """The transformers class an export of the artifact loads as (e.g. LlamaForCausalLM)."""
    return family_of(artifact.model).hf_architecture


def _eot_id(tokenizer_json: str | None) -> int:
    from model.tokenizer import eot_id, tokenizer_from_json  # (model/ loads torch: only with weights)

    return eot_id(tokenizer_from_json(tokenizer_json)) if tokenizer_json else 0


def _write_hf_files(artifact: ModelArtifact, hf_config: dict, eot: int, out: Path) -> None:
    from safetensors.torch import save_file  # (torch: only with weights)

    from model.tokenizer import EOT_TOKEN

    tensors = family_of(artifact.model).to_hf_state_dict(artifact.state_dict, artifact.model)
    save_file(tensors, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(hf_config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=1))
    if artifact.tokenizer_json:
        specials = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": artifact.model.block_size,
                   **specials, "clean_up_tokenization_spaces": False}
        (out / TOKENIZER).write_text(artifact.tokenizer_json)
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))


def sample(artifact: ModelArtifact, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,
           seed: int) -> str:
    """Text the model continues `prompt` with (KV-cached sampling)."""
    import torch  # (only with weights)

    from model.sampling import generate  # (model/ loads torch: only with weights)
    from model.tokenizer import eot_id, tokenizer_from_json

    if not artifact.tokenizer_json:
        raise CheckpointError(f"{artifact.source} has no {TOKENIZER}: cannot encode a prompt for it")
    tok = tokenizer_from_json(artifact.tokenizer_json)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ConfigError("--prompt is empty; give some text to continue")
    if max(ids) >= artifact.model.vocab_size:
        raise CheckpointError(f"the tokenizer of {artifact.source} does not match its model "
                              f"(vocab_size {artifact.model.vocab_size})")
    gen = torch.Generator().manual_seed(seed)
    model = build_model(artifact)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    new = out[0, len(ids):].tolist()
    eot = eot_id(tok)
    if eot in new:  # a document (or an answer) ends at the end-of-text token
        new = new[: new.index(eot)]
    return tok.decode(new, skip_special_tokens=False)
