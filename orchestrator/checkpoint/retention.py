"""Which checkpoints to delete: a pure function of what exists, and of the pins of the jobs that
still need some (orchestrator.jobs.triggers: `runs/<job>/pins/<trigger>.json`, each a rule and the
steps it has released)."""

from __future__ import annotations

import json

from orchestrator.checkpoint.layout import CheckpointRef
from orchestrator.config.schema import trigger_matches
from orchestrator.errors import OrchError
from orchestrator.storage import ObjectStore, join_uri

PINS = "pins"  # in a run's folder: one object per trigger that takes this run's checkpoints


def pin_uri(run: str, trigger_id: str) -> str:
    return join_uri(run, PINS, f"{trigger_id}.json")


def read_pins(store: ObjectStore, run: str) -> list[dict]:
    """The pins on a run's checkpoints ({"trigger", "released"}); an unreadable one is skipped."""
    pins = []
    for obj in store.list(join_uri(run, PINS) + "/"):
        try:
            pins.append(json.loads(store.get(obj.uri)))
        except (OrchError, ValueError):
            continue
    return pins


def protected_steps(pins: list[dict], steps: list[int]) -> set[int]:
    """Of `steps`, those some pin still needs: its rule takes them and it has not released them."""
    out: set[int] = set()
    for pin in pins:
        released = set(pin.get("released") or ())
        out |= {s for s in steps if trigger_matches(pin["trigger"], s) and s not in released}
    return out


def to_delete(refs: list[CheckpointRef], keep_last: int, keep_every: int, just_committed: int,
              protected: set[int] = frozenset()) -> list[CheckpointRef]:
    """Checkpoints to remove after `just_committed` was committed: committed ones beyond the newest
    `keep_last` that are not milestones (a multiple of `keep_every`), and uncommitted leftovers of
    crashed saves. Never the one just committed, never a committed one newer than it (a run
    resumed from an older checkpoint does not judge newer ones; restore de-commits corrupt ones),
    and never a committed one in `protected` (a pinned step a triggered job still needs)."""
    committed = [r.step for r in refs if r.committed]
    keep = set(committed[-keep_last:]) | {just_committed}
    out = []
    for ref in refs:
        if ref.step in keep or (ref.committed and ref.step > just_committed):
            continue
        if ref.committed and (keep_every and ref.step % keep_every == 0 or ref.step in protected):
            continue
        out.append(ref)
    return out
