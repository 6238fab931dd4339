"""Which committed checkpoints to delete: a small pure policy over step numbers."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["steps_to_delete"]


def steps_to_delete(steps: Sequence[int], *, keep_last: int | None, keep_every: int | None) -> list[int]:
    """Steps that retention removes, oldest first.

    Args:
        steps: committed steps (any order). The newest is never deleted.
        keep_last: keep this many newest checkpoints; None keeps all.
        keep_every: additionally keep every step divisible by this (permanent milestones); None for none.

    Returns:
        The steps to delete, ascending.
    """
    if keep_last is None:
        return []
    ordered = sorted(set(steps))
    recent = set(ordered[-max(keep_last, 1) :])
    return [s for s in ordered if s not in recent and not (keep_every and s % keep_every == 0)]
