"""Where a dataset's tokenizer comes from, and whether two tokenizers are the same.

`data.tokenizer_uri` may name a prepared dataset (its manifest's tokenizer), an orch export or
checkpoint, a Hugging Face model folder (tokenizer.json, with the end-of-text token taken from its
tokenizer_config.json when it has no `<|endoftext|>`), a run (its newest committed checkpoint), or a
tokenizer.json file itself; on any store (`s3://` or local), whatever the dataset's store is.
The bytes are kept as read, so the dataset, its checkpoints and exports carry the same file and the
manifest's sha256 names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.checkpoint.layout import latest_committed
from orchestrator.constants import TOKENIZER
from orchestrator.data.manifest import try_load_manifest
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectNotFound, ObjectStore, join_uri, routed, to_uri
from orchestrator.storage.digest import sha256_bytes

HF_TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class TokenizerFile:
    json: str  # the tokenizer.json text, as stored
    uri: str  # where it was read
    eos_token: str | None = None  # the end-of-text token a Hugging Face folder names (tokenizer_config.json)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.json.encode())


def _text(store: ObjectStore, uri: str) -> str | None:
    try:
        return store.get(uri).decode()
    except ObjectNotFound:
        return None
    except UnicodeDecodeError:
        raise DatasetError(f"{uri} is not UTF-8 text, so not a tokenizer.json; fix data.tokenizer_uri") from None


def _eos_token(store: ObjectStore, folder: str) -> str | None:
    """The eos_token of a Hugging Face folder's tokenizer_config.json (a string or {"content": ...})."""
    text = _text(store, join_uri(folder, HF_TOKENIZER_CONFIG))
    try:
        eos = json.loads(text).get("eos_token") if text else None
    except (ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def load_tokenizer_file(uri: str, store: ObjectStore, setting: str = "data.tokenizer_uri") -> TokenizerFile:
    """The tokenizer at `uri` (see the module docstring); DatasetError naming `setting` if none."""
    store, uri = routed(store), to_uri(uri).rstrip("/")
    if uri.endswith(".json"):
        candidates = [uri]
    else:
        manifest = try_load_manifest(store, uri)
        candidates = [join_uri(uri, manifest.tokenizer_key if manifest else TOKENIZER)]
        if manifest is None and not store.exists(candidates[0]):
            newest = latest_committed(store, uri)  # a run folder: its newest committed checkpoint
            if newest is not None:
                candidates.append(join_uri(newest.uri, TOKENIZER))
    for candidate in candidates:
        text = _text(store, candidate)
        if text is not None:
            return TokenizerFile(text, candidate, _eos_token(store, candidate.rsplit("/", 1)[0]))
    raise DatasetError(
        f"no tokenizer at {setting}={uri}: it is neither a prepared dataset, an orch export or checkpoint, nor a "
        f"Hugging Face folder with {TOKENIZER}; point {setting} at one of those (or at a tokenizer.json)"
    )


def parse_tokenizer(tf: TokenizerFile):
    """The `tokenizers.Tokenizer` of a tokenizer file and its end-of-text id; DatasetError if the
    file is not a tokenizer or has no end-of-text token."""
    from model.tokenizer import eot_id, tokenizer_from_json  # (model/ loads torch: not at import)

    try:
        tok = tokenizer_from_json(tf.json)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        raise DatasetError(f"{tf.uri} is not a tokenizer.json the `tokenizers` library reads "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); fix data.tokenizer_uri"
                           ) from None
    try:
        return tok, eot_id(tok, tf.eos_token)
    except ValueError as e:
        raise DatasetError(f"the tokenizer {tf.uri}: {e}") from None


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two tokenizer.json texts are the same tokenizer: the same bytes, or the same
    tokenizer written another way (key order, whitespace)."""
    if a == b:
        return True
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False
