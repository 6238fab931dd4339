"""Applying a restore plan: load each entry's verified state into its object, reset the group.

Every refusal was raised by the plan, so what remains to fail is an object's own ``load_state_dict``;
that failure names the entry, what was already applied, and chains the original exception.

Order: every other entry, then the reset of the optimisation group (a scheduler stepped to the
restored step sets the learning rates of the optimizer it drives), then RNG entries last, so that no
``load_state_dict`` or reset can draw from a random stream after it was restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from resumekit.engine.keys import load_canonical
from resumekit.engine.live import LiveEntry
from resumekit.engine.partial import apply_resets
from resumekit.engine.plan import LoadPlan
from resumekit.engine.shapes import load_matching
from resumekit.errors import StateMismatchError
from resumekit.sharding.reshard import ShardedValue

__all__ = ["apply_plan"]


def apply_plan(
    plan: LoadPlan, values: Mapping[str, Any], entries: Sequence[LiveEntry], allow_shape_mismatch: bool
) -> tuple[str, ...]:
    """Load ``values`` into the objects of ``entries`` and apply the plan's resets.

    Returns:
        Module tensors not loaded because their shapes differ (``allow_shape_mismatch``).

    Raises:
        StateMismatchError: an object's ``load_state_dict`` raised (chained); the message lists the
            entries already applied, which hold the checkpoint's state, and the fix.
    """
    state = {e.name: e.item.obj for e in entries}
    skipped: list[str] = []
    applied: list[str] = []
    for names, action in _steps(plan, values, entries, allow_shape_mismatch, state):
        try:
            skipped += action()
        except Exception as exc:
            raise StateMismatchError(_failed(plan.step.step, names, applied, exc)) from exc
        applied += names
    return tuple(skipped)


def _steps(
    plan: LoadPlan,
    values: Mapping[str, Any],
    entries: Sequence[LiveEntry],
    allow_shape_mismatch: bool,
    state: Mapping[str, Any],
) -> list[tuple[list[str], Callable[[], list[str]]]]:
    """(the entries one step changes, the step), in the order of the module docstring."""

    def load(e: LiveEntry) -> Callable[[], list[str]]:
        return lambda: apply_entry(e, values[e.name], allow_shape_mismatch)

    def reset() -> list[str]:
        apply_resets(state, plan.resets)
        return []

    loaded = [e for e in entries if e.name in values]
    steps = [([e.name], load(e)) for e in loaded if not e.item.last]
    if plan.resets:
        steps.append(([r.name for r in plan.resets], reset))
    return steps + [([e.name], load(e)) for e in loaded if e.item.last]


def apply_entry(e: LiveEntry, value: Any, allow_shape_mismatch: bool) -> list[str]:
    """Load one entry's decoded state into its object; return module tensors skipped for shape."""
    obj = e.item.obj
    if isinstance(value, ShardedValue):  # checked against the live DTensors by the plan
        value.apply(obj)
        return []
    if isinstance(obj, torch.nn.Module):
        if allow_shape_mismatch:
            return list(load_matching(obj, value, e.keys).skipped)
        load_canonical(obj, value, keys=e.keys)
    elif e.item.kind == "state":
        obj.load_state_dict(value)
    else:
        obj.clear()
        obj.update(value)
    return []


def _failed(step: int, names: list[str], applied: list[str], exc: BaseException) -> str:
    what = repr(names[0]) if len(names) == 1 else f"the reset of {names}"
    done = (
        f"Already applied (they hold step {step}'s state): {applied}."
        if applied
        else "Nothing was applied before it."
    )
    return (
        f"Restoring checkpoint step {step} failed at {what}: {type(exc).__name__}: {exc}. {done} "
        f"{what} itself may be partly changed; the entries after it are unchanged. Likely cause: the "
        "object differs from the one saved (its class or configuration changed). Build it as it was "
        "saved, or leave it out of the state passed to restore(), then restore again."
    )
