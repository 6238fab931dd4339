"""Partial restore: load some entries and reset the rest as a consistency group.

The optimizer, the gradient scaler and the LR scheduler describe one optimisation trajectory: restoring
one without the others (momentum from step 10,000 with a warm-up learning rate, or a scaler backed off
for another run's gradients) silently trains something nobody asked for. So they are restored together
or reset together; a reset moves the scheduler to the restored step, so the learning rate equals what
an uninterrupted run would have there.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._keys import _canonical_key, _wrapper_paths, canonical_state_dict

__all__ = ["check_only", "module_state", "optimisation_group", "reset_group", "scheduler_position"]


def module_state(module: torch.nn.Module) -> OrderedDict[str, Any]:
    """``module.state_dict()`` under canonical names (no DDP ``module.``/compile ``_orig_mod.``),
    keeping the per-submodule ``_metadata`` versions that ``load_state_dict`` migrations rely on."""
    sd = module.state_dict()
    out: OrderedDict[str, Any] = OrderedDict(canonical_state_dict(sd, module))
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        paths = _wrapper_paths(module)
        # Metadata keys are module prefixes; a wrapper's own entry collapses onto its child's, which
        # comes later and wins.
        out._metadata = OrderedDict((_canonical_key(k, paths) if k else k, v) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def _is_scaler(obj: Any) -> bool:
    scaler_types = tuple(
        t for t in (getattr(torch.amp, "GradScaler", None), getattr(torch.cuda.amp, "GradScaler", None)) if t
    )
    return isinstance(obj, scaler_types)


def optimisation_group(state: Mapping[str, Any]) -> list[str]:
    """Names of the entries that are optimizers, LR schedulers or gradient scalers."""
    sched = torch.optim.lr_scheduler.LRScheduler
    return [
        name
        for name, obj in state.items()
        if isinstance(obj, (torch.optim.Optimizer, sched)) or _is_scaler(obj)
    ]


def check_only(state: Mapping[str, Any], only: Iterable[str]) -> frozenset[str]:
    """Validate ``only=``: known entries, and the optimisation group all in or all out.

    Raises:
        ValueError: naming the unknown entries, or the group members left out.
    """
    chosen = frozenset(only)
    unknown = sorted(chosen - set(state))
    if unknown:
        raise ValueError(f"only= names {unknown}, which are not entries of state ({sorted(state)})")
    group = optimisation_group(state)
    inside = [n for n in group if n in chosen]
    if inside and len(inside) != len(group):
        left = [n for n in group if n not in chosen]
        raise ValueError(
            f"only= restores {inside} but not {left}: the optimizer, gradient scaler and LR scheduler are "
            f"restored or reset together. Add {left} to only=, or drop {inside} to reset them all."
        )
    return chosen


def scheduler_position(saved: Mapping[str, Any]) -> int | None:
    """The number of ``step()`` calls a saved LR scheduler state has seen (its ``last_epoch``)."""
    value = saved.get("last_epoch") if isinstance(saved, Mapping) else None
    return value if type(value) is int else None


def reset_group(state: Mapping[str, Any], group: list[str], positions: Mapping[str, int | None]) -> None:
    """Reset optimizers and scalers to fresh, and move schedulers to their saved positions.

    Args:
        state: the user's entries.
        group: the optimisation-group entry names to reset.
        positions: scheduler entry name -> saved ``last_epoch`` (None when unknown: left where it is).

    Raises:
        ValueError: a scheduler that cannot be moved without training data (ReduceLROnPlateau).
    """
    for name in group:
        obj = state[name]
        if isinstance(obj, torch.optim.Optimizer):
            obj.state.clear()  # fresh moments; learning rates are set by the schedulers below
        elif _is_scaler(obj):
            obj.load_state_dict(
                {
                    "scale": float(obj._init_scale),
                    "growth_factor": float(obj._growth_factor),
                    "backoff_factor": float(obj._backoff_factor),
                    "growth_interval": int(obj._growth_interval),
                    "_growth_tracker": 0,
                }
            )
    for name in group:
        obj = state[name]
        target = positions.get(name)
        if not isinstance(obj, torch.optim.lr_scheduler.LRScheduler) or target is None:
            continue
        if isinstance(obj, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                f"'{name}' is a ReduceLROnPlateau scheduler, whose learning rate depends on past metrics; "
                "it cannot be moved to the restored step. Restore it with the optimizer (include both in only=)."
            )
        if obj.last_epoch > target:
            raise ValueError(
                f"'{name}' has already stepped {obj.last_epoch} times, past the restored step {target}; "
                "pass a freshly created scheduler so it can be moved to the restored step."
            )
        with warnings.catch_warnings():
            # "lr_scheduler.step() before optimizer.step()": intended, no optimizer step happens here.
            warnings.simplefilter("ignore", UserWarning)
            while obj.last_epoch < target:
                obj.step()
