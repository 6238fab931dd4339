"""The user's state as entries: names, scopes, kinds and the capture/restore order."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from resumekit._protocol import TrainingState
from resumekit.errors import UnsupportedValueError
from resumekit.format.manifest import SCOPE_RANK, SCOPE_REPLICATED, SCOPE_SHARDED, validate_entry_name

__all__ = ["Item", "check_step", "items_of"]


@dataclass
class Item:
    """One top-level entry of the user's state."""

    name: str
    obj: Any
    scope: str
    kind: str
    last: bool  # RNG: captured first, restored last


def items_of(state: Mapping[str, Any], per_rank: frozenset[str]) -> list[Item]:
    """Classify the entries of ``state``; RNG-like entries (``resumekit_restore_last``) come first."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping of entry name to object (e.g. {{'model': model}}), got {type(state).__name__}"
        )
    items = []
    for name, obj in state.items():
        validate_entry_name(name)
        if _is_loader(obj):
            raise UnsupportedValueError(_not_state(name, obj))
        if isinstance(obj, TrainingState):
            kind = "state"
        elif isinstance(obj, MutableMapping):
            kind = "mapping"
        else:
            raise UnsupportedValueError(_not_state(name, obj))
        scope = (
            SCOPE_RANK
            if name in per_rank or getattr(obj, "resumekit_scope", None) == "rank"
            else SCOPE_SHARDED
            if _holds_dtensors(obj)
            else SCOPE_REPLICATED
        )
        last = bool(getattr(obj, "resumekit_restore_last", False))
        items.append(Item(name, obj, scope, kind, last))
    # Invariant: RNG state is captured before any other state_dict() and restored after any other
    # load_state_dict(), so side effects of those calls cannot shift a random stream.
    items.sort(key=lambda it: not it.last)
    return items


def _holds_dtensors(obj: Any) -> bool:
    from resumekit.sharding.shards import holds_dtensors  # the sharding machinery imports this module

    return holds_dtensors(obj)


def _is_loader(obj: Any) -> bool:
    from torch.utils.data import DataLoader

    from resumekit.loader import ResumableLoader

    cls = type(obj)
    # torchdata's StatefulDataLoader is matched by name: importing resumekit never imports torchdata.
    stateful = cls.__name__ == "StatefulDataLoader" and cls.__module__.startswith("torchdata")
    return stateful or isinstance(obj, (DataLoader, ResumableLoader))


def _not_state(name: str, obj: Any) -> str:
    """Why ``obj`` cannot be an entry; for a data loader, where its position lives and the fix."""
    if _is_loader(obj):
        # The loop's position is the sampler's; only a ResumableSampler makes it an exact record, and a
        # loader's own record (StatefulDataLoader's) misses the base-seed draw its iterator makes on resume.
        sampler = getattr(obj, "sampler", None)
        return (
            f"state entry '{name}' is a {type(obj).__name__} (sampler: {type(sampler).__name__}). resumekit "
            "does not checkpoint loaders: a DataLoader has no state of its own, and a StatefulDataLoader's "
            "record does not stop the resumed iterator from drawing its base seed from the global torch "
            "generator, which shifts every random number the loop draws after the resume. Fix: build "
            "sampler = resumekit.ResumableSampler(dataset, seed=...), pass it as "
            "DataLoader(dataset, batch_size=..., sampler=sampler), wrap the loader as "
            "resumekit.ResumableLoader(DataLoader(...)), and put state['sampler'] = sampler (plus "
            "resumekit.RNGState()) in the state instead (see docs/exact-resume.md)."
        )
    return (
        f"state entry '{name}' is a {type(obj).__name__}, which has no state_dict()/load_state_dict(). "
        "Pass an object with both methods, or a dict (restored in place)."
    )


def check_step(step: Any) -> int:
    """Validate a step number: a non-negative int (bool refused)."""
    if type(step) is not int or step < 0:
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    return step
