"""Which checkpoints to delete: a pure function of what exists."""

from __future__ import annotations

from orchestrator.checkpoint.layout import CheckpointRef


def to_delete(refs: list[CheckpointRef], keep_last: int, keep_every: int, just_committed: int) -> list[CheckpointRef]:
    """Checkpoints to remove after `just_committed` was committed: committed ones beyond the newest
    `keep_last` that are not milestones (a multiple of `keep_every`), and uncommitted leftovers of
    crashed saves. Never the one just committed, and never a committed one newer than it (a run
    resumed from an older checkpoint does not judge newer ones; restore de-commits corrupt ones)."""
    committed = [r.step for r in refs if r.committed]
    keep = set(committed[-keep_last:]) | {just_committed}
    out = []
    for ref in refs:
        if ref.step in keep or (ref.committed and ref.step > just_committed):
            continue
        if ref.committed and keep_every and ref.step % keep_every == 0:
            continue
        out.append(ref)
    return out
