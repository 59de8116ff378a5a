"""Destinations a command writes into: only an empty one, or one it wrote itself.

A command that writes a dataset or an exported model into a folder (or an S3 prefix) first claims
it: a destination that is empty gets the command's marker file before anything else is written;
one that already holds the marker (or another file only that command writes) was written by it and
may be written again; anything else belongs to the user and is refused unless they said
`--overwrite`. This is what keeps `orch data prepare SRC SRC` from clearing the user's corpus.
"""

from __future__ import annotations

import json
import time

from orchestrator.errors import ConfigError
from orchestrator.storage.base import ObjectStore, join_uri


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def overlaps(a: str, b: str) -> bool:
    """Whether one URI is the other or lies inside it (`file:///x` and `file:///x/y` do; `/x` and `/xy` not)."""
    a, b = _norm(a), _norm(b)
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_destination(store: ObjectStore, dest: str, marker: str, what: str, *, ours: tuple[str, ...] = (),
                      overwrite: bool = False) -> int | None:
    """Raise ConfigError (exit 2) naming `dest` and the fix unless it may be written: None when
    orch wrote it (`marker`, or one of `ours`: files only that command writes), else how many files
    of the user's it holds (0: empty; more only with `overwrite`)."""
    for name in (marker, *ours):
        if store.exists(join_uri(dest, name)):
            return None
    prefix = _norm(dest) + "/"
    foreign = store.list(prefix)
    if foreign and not overwrite:
        example = foreign[0].uri[len(prefix):]
        raise ConfigError(
            f"{what} destination {_norm(dest)} already holds {len(foreign)} file(s) that orch did not write "
            f"(e.g. {example}); give a new or empty folder, or pass --overwrite to replace what is there"
        )
    return len(foreign)


def claim_destination(store: ObjectStore, dest: str, marker: str, what: str, *, ours: tuple[str, ...] = (),
                      overwrite: bool = False) -> bool:
    """`check_destination`, then mark an unmarked `dest` as orch's (a small JSON note) before
    anything else is written there. True when `dest` held nothing before: a command that fails may
    then remove all it holds, leaving it as it was."""
    foreign = check_destination(store, dest, marker, what, ours=ours, overwrite=overwrite)
    if foreign is None:
        return False
    note = {"written_by": "orch", "what": what, "claimed_at": time.time(), "overwrote": foreign}
    store.put(join_uri(dest, marker), json.dumps(note).encode())
    return foreign == 0
