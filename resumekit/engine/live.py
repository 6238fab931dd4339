"""The user's live objects as a restore sees them, computed once per restore: each entry's keys, its
state as a save would encode it (for reading tensor files straight into it), and its validate hook.

Pure: nothing here reads storage or changes an object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resumekit.engine.entries import Item
from resumekit.engine.keys import ModuleKeys
from resumekit.engine.partial import module_state
from resumekit.format.codec import TensorTable, encode
from resumekit.format.manifest import SCOPE_SHARDED

__all__ = ["LiveEntry", "LiveView", "live_entries", "same_structure"]


@dataclass(frozen=True)
class LiveView:
    """A live Module's or Optimizer's state as a save encodes it: the JSON skeleton and its tensors."""

    skeleton: Any
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LiveEntry:
    """One entry of the user's state, with what every check and load of one restore shares.

    Attributes:
        item: name, object, scope, kind, restore order.
        keys: a module's keys and canonical names (None for anything else).
        view: a Module's or Optimizer's state as saved (None: never read in place).
        validate: the object's ``resumekit_validate`` hook, called once per restore (by the plan).
    """

    item: Item
    keys: ModuleKeys | None = None
    view: LiveView | None = None
    validate: Any = None

    @property
    def name(self) -> str:
        """The entry's name in the state and the checkpoint."""
        return self.item.name

    @property
    def may_read_in_place(self) -> bool:
        """Whether its tensor file may be read into its live tensors: a Module or Optimizer (whose
        ``load_state_dict`` sets every value it is given anyway) without a validate hook."""
        return self.view is not None and self.validate is None


def live_entries(items: Sequence[Item]) -> tuple[LiveEntry, ...]:
    """Each item's keys and saved-form view, computed once for the whole restore."""
    out = []
    for it in items:
        if it.scope == SCOPE_SHARDED:  # never read in place, checked against its DTensors by the plan
            out.append(LiveEntry(it))
            continue
        validate = getattr(it.obj, "resumekit_validate", None)
        keys = ModuleKeys.of(it.obj) if isinstance(it.obj, torch.nn.Module) else None
        view = (
            _live_view(it.obj, keys) if isinstance(it.obj, (torch.nn.Module, torch.optim.Optimizer)) else None
        )
        out.append(LiveEntry(it, keys, view, validate if callable(validate) else None))
    return tuple(out)


def _live_view(obj: Any, keys: ModuleKeys | None) -> LiveView | None:
    try:
        table = TensorTable()
        skeleton = encode(module_state(obj, keys) if keys is not None else obj.state_dict(), table)
        # As the JSON file holds it (tuples become lists), so the two compare equal when they match.
        return LiveView(json.loads(json.dumps(skeleton)), table.tensors)
    except Exception:  # a state the codec refuses is save's error to report; here: no shortcut
        return None


def same_structure(e: LiveEntry, view: LiveView, saved: Any) -> bool:
    """Whether ``load_state_dict`` cannot refuse the saved state for a reason other than tensor names,
    dtypes and shapes (those are compared with the file's header).

    A Module: the saved skeleton equals its own (same keys, non-tensor values and metadata versions). An
    Optimizer: the same parameter indices in the same groups, which ``Optimizer.load_state_dict`` checks
    only after every tensor was read.
    """
    if isinstance(e.item.obj, torch.nn.Module):
        return bool(view.skeleton == saved)
    saved_groups = _param_groups(saved)
    return saved_groups is not None and saved_groups == _param_groups(view.skeleton)


def _param_groups(skeleton: Any) -> list[Any] | None:
    groups = skeleton.get("param_groups") if isinstance(skeleton, dict) else None
    if not isinstance(groups, list):
        return None
    return [g.get("params") if isinstance(g, dict) else None for g in groups]
