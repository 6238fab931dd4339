"""Shape checks before loading module state, and loading only what fits.

``nn.Module.load_state_dict`` raises on the first size mismatch, even with ``strict=False``, after
copying the tensors before it. Checking every shape first means a mismatch is reported completely
(every parameter, both shapes) and the model is left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from resumekit.engine.keys import ModuleKeys, to_model_keys
from resumekit.errors import StateMismatchError

__all__ = [
    "DEFAULT_SHAPE_FIX",
    "PartialLoad",
    "ShapeMismatch",
    "check_keys",
    "check_param_groups",
    "check_shapes",
    "find_shape_mismatches",
    "load_matching",
]

#: How the mismatch error tells users to load what fits; the Checkpointer may pass its own wording.
DEFAULT_SHAPE_FIX = "restore(..., allow_shape_mismatch=True)"


@dataclass(frozen=True)
class ShapeMismatch:
    """A saved tensor whose shape differs from the model's.

    Attributes:
        name: Canonical parameter or buffer name.
        saved: Shape in the checkpoint.
        current: Shape in the model.
    """

    name: str
    saved: tuple[int, ...]
    current: tuple[int, ...]


@dataclass(frozen=True)
class PartialLoad:
    """What :func:`load_matching` did. All names are canonical.

    Attributes:
        loaded: Keys loaded from the checkpoint.
        mismatches: Tensors skipped because their shapes differ; the model keeps its own values.
        missing: Model keys the checkpoint does not have (the model keeps its own values).
        unexpected: Checkpoint keys the model does not have (ignored).
    """

    loaded: tuple[str, ...]
    mismatches: tuple[ShapeMismatch, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    @property
    def skipped(self) -> tuple[str, ...]:
        """Names of the checkpoint tensors not loaded because their shapes differ."""
        return tuple(m.name for m in self.mismatches)


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    """The shape of a tensor-like value or an explicit shape; ``None`` for non-tensor state."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    is_shape = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if is_shape and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return tuple(value)
    return None


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def find_shape_mismatches(
    saved: Mapping[str, Any], model: nn.Module, keys: Optional[ModuleKeys] = None
) -> list[ShapeMismatch]:
    """List every saved tensor whose shape differs from the model's tensor of the same name.

    Args:
        saved: Saved module state, keyed by canonical (or wrapper-prefixed) names. Values are tensors,
            arrays, or plain shapes (a list of ints, e.g. from a safetensors header), so the check can
            run before any tensor data is read. Keys the model lacks and non-tensor values are ignored
            here; ``load_state_dict`` reports missing and unexpected keys.
        model: The target module, plain or wrapped.
        keys: ``model``'s keys when the caller built them already.

    Returns:
        The mismatches, in the checkpoint's key order; empty when every shape fits.
    """
    keys = keys if keys is not None else ModuleKeys.of(model)
    canonical = keys.canonical
    mismatches: list[ShapeMismatch] = []
    for own_key, value in to_model_keys(saved, model, keys).items():
        target = keys.own.get(own_key)
        if not isinstance(target, torch.Tensor):
            continue
        saved_shape = _shape(value)
        if saved_shape is not None and saved_shape != tuple(target.shape):
            mismatches.append(ShapeMismatch(canonical[own_key], saved_shape, tuple(target.shape)))
    return mismatches


def _migrates_keys(model: nn.Module) -> bool:
    """Whether ``model`` may rename or add keys while loading (a load pre-hook, or a
    ``_load_from_state_dict`` not inherited from torch), so that only ``load_state_dict`` can judge keys."""
    for sub in model.modules():
        if getattr(sub, "_load_state_dict_pre_hooks", None):
            return True
        owner = next(c for c in type(sub).__mro__ if "_load_from_state_dict" in vars(c))
        if not owner.__module__.startswith("torch."):
            return True
    return False


def check_keys(
    saved: Mapping[str, Any], model: nn.Module, *, entry: str = "model", keys: Optional[ModuleKeys] = None
) -> None:
    """Raise before anything is loaded when the saved keys and the model's differ.

    ``load_state_dict(strict=True)`` raises too, but only after copying every tensor that matched.
    Models that rename keys while loading (a load pre-hook, a custom ``_load_from_state_dict``) are
    left to ``load_state_dict``.

    Raises:
        StateMismatchError: naming the missing and unexpected keys and the fix.
    """
    keys = keys if keys is not None else ModuleKeys.of(model)
    keyed = to_model_keys(saved, model, keys)
    missing = [k for k in keys.own if k not in keyed]
    unexpected = [k for k in keyed if k not in keys.own]
    if not (missing or unexpected) or _migrates_keys(model):
        return
    canonical = keys.canonical
    parts = []
    if missing:
        parts.append(f"the model has {[canonical[k] for k in missing]} that the checkpoint lacks")
    if unexpected:
        parts.append(f"the checkpoint has {unexpected} that the model lacks")
    raise StateMismatchError(
        f"Cannot restore {entry!r}: {' and '.join(parts)}. Likely cause: the model's architecture changed "
        "since the checkpoint was saved. Build the model as it was saved, or load what fits with "
        "restore(..., allow_shape_mismatch=True). Nothing was loaded."
    )


def check_param_groups(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, *, entry: str) -> None:
    """Raise before anything is loaded when the saved optimizer's parameter groups do not line up with
    ``optimizer``'s (``Optimizer.load_state_dict`` raises too, but only once it is being applied, after
    the entries before it were loaded).

    Raises:
        StateMismatchError: naming both group layouts and the likely cause.
    """
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, (list, tuple)):
        return  # not a torch optimizer state: its own load_state_dict judges it
    saved_sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in groups]
    own_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise StateMismatchError(
            f"Cannot restore {entry!r}: the checkpoint's optimizer has parameter groups of sizes "
            f"{saved_sizes}, this optimizer {own_sizes}. Likely cause: the model or the way its parameters "
            "are grouped (weight decay, per-layer learning rates) changed since the checkpoint was saved. "
            "Build the optimizer as it was saved, or restore without it: restore(..., only=[...]). "
            "Nothing was loaded."
        )


def check_shapes(
    saved: Mapping[str, Any],
    model: nn.Module,
    *,
    entry: str = "model",
    fix: str = DEFAULT_SHAPE_FIX,
    keys: Optional[ModuleKeys] = None,
) -> None:
    """Raise if any saved tensor's shape differs from the model's; do nothing otherwise.

    Args:
        saved: Saved module state or shapes, as for :func:`find_shape_mismatches`.
        model: The target module.
        entry: The state entry's name, used in the message.
        fix: The call that loads what fits, quoted in the message.
        keys: ``model``'s keys when the caller built them already.

    Raises:
        StateMismatchError: Naming every mismatched parameter with both shapes, and ``fix``.
    """
    mismatches = find_shape_mismatches(saved, model, keys)
    if not mismatches:
        return
    lines = "\n".join(
        f"  - {m.name}: checkpoint {_fmt(m.saved)}, model {_fmt(m.current)}" for m in mismatches
    )
    noun = "tensor does" if len(mismatches) == 1 else "tensors do"
    raise StateMismatchError(
        f"Cannot restore {entry!r}: {len(mismatches)} saved {noun} not fit the model's shapes:\n{lines}\n"
        "Likely cause: the model changed since the checkpoint was saved (a grown vocabulary, a new head). "
        f"To load every tensor that fits and keep the model's own values for the rest, use {fix}. "
        "Nothing was loaded."
    )


def load_matching(
    model: nn.Module, saved: Mapping[str, Any], keys: Optional[ModuleKeys] = None
) -> PartialLoad:
    """Load every saved tensor whose name and shape match the model; leave the rest as they are.

    Args:
        model: The target module, plain or wrapped.
        saved: Saved module state (tensors), keyed by canonical or wrapper-prefixed names.
        keys: ``model``'s keys when the caller built them already.

    Returns:
        What was loaded and what was skipped, by canonical name.
    """
    keys = keys if keys is not None else ModuleKeys.of(model)
    own, canonical = keys.own, keys.canonical
    fitting: dict[str, Any] = {}
    mismatches: list[ShapeMismatch] = []
    unexpected: list[str] = []
    for own_key, value in to_model_keys(saved, model, keys).items():
        if own_key not in own:
            unexpected.append(own_key)
            continue
        target = own[own_key]
        saved_shape = _shape(value)
        if (
            isinstance(target, torch.Tensor)
            and saved_shape is not None
            and saved_shape != tuple(target.shape)
        ):
            mismatches.append(ShapeMismatch(canonical[own_key], saved_shape, tuple(target.shape)))
            continue
        fitting[own_key] = value
    model.load_state_dict(fitting, strict=False)
    skipped = {m.name for m in mismatches}
    return PartialLoad(
        loaded=tuple(canonical[k] for k in fitting),
        mismatches=tuple(mismatches),
        missing=tuple(canonical[k] for k in own if k not in fitting and canonical[k] not in skipped),
        unexpected=tuple(unexpected),
    )
