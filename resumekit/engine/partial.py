"""Partial restore: load some entries and reset the rest as a consistency group.

The optimizer, the gradient scaler and the LR scheduler describe one optimisation trajectory: restoring
one without the others (momentum from step 10,000 with a warm-up learning rate, or a scaler backed off
for another run's gradients) silently trains something nobody asked for. So they are restored together
or reset together; a reset moves the scheduler to the restored step, so the learning rate equals what
an uninterrupted run would have there. A ReduceLROnPlateau scheduler cannot be moved (its learning
rate depends on past metrics): it is reset as it was passed, with a warning.

Resets are planned (every refusal raised) before anything is loaded, then applied.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from resumekit.engine.keys import ModuleKeys, _canonical_key, _rekey, _wrapper_paths
from resumekit.errors import StateMismatchError

__all__ = [
    "Reset",
    "apply_resets",
    "check_only",
    "is_scheduler",
    "module_state",
    "optimisation_group",
    "plan_resets",
    "scheduler_position",
]


def module_state(module: torch.nn.Module, keys: ModuleKeys | None = None) -> OrderedDict[str, Any]:
    """``module.state_dict()`` under canonical names (no DDP ``module.``/compile ``_orig_mod.``),
    keeping the per-submodule ``_metadata`` versions that ``load_state_dict`` migrations rely on."""
    sd = module.state_dict()
    paths = keys.wrapper_paths if keys is not None else _wrapper_paths(module)
    out: OrderedDict[str, Any] = OrderedDict(_rekey(sd, [_canonical_key(k, paths) for k in sd], "state_dict"))
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
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
        StateMismatchError: naming the unknown entries, or the group members left out, and the fix.
    """
    chosen = frozenset(only)
    unknown = sorted(chosen - set(state))
    if unknown:
        raise StateMismatchError(
            f"only= names {unknown}, which are not entries of state ({sorted(state)}); name entries of the "
            "state passed to restore(). Nothing was loaded."
        )
    group = optimisation_group(state)
    inside = [n for n in group if n in chosen]
    if inside and len(inside) != len(group):
        left = [n for n in group if n not in chosen]
        raise StateMismatchError(
            f"only= restores {inside} but not {left}: the optimizer, gradient scaler and LR scheduler are "
            f"restored or reset together. Add {left} to only=, or drop {inside} to reset them all. "
            "Nothing was loaded."
        )
    return chosen


def is_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is a torch LR scheduler (whose reset moves it to the restored step)."""
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


def scheduler_position(saved: Any) -> int | None:
    """The number of ``step()`` calls a saved LR scheduler state has seen (its ``last_epoch``)."""
    value = saved.get("last_epoch") if isinstance(saved, Mapping) else None
    return value if type(value) is int else None


@dataclass(frozen=True)
class Reset:
    """What a partial restore does to one member of the optimisation group it leaves out.

    ``action`` is ``"clear"`` (an optimizer loses its moments), ``"rescale"`` (a gradient scaler
    returns to its initial scale), ``"step"`` (a scheduler is stepped from its position to
    ``target``) or ``"keep"`` (a scheduler that cannot be moved, left as it was passed).
    """

    name: str
    action: str
    target: int | None = None


def plan_resets(
    state: Mapping[str, Any], group: Iterable[str], positions: Mapping[str, int | None]
) -> tuple[tuple[Reset, ...], tuple[str, ...]]:
    """Decide, before anything changes, how each left-out group member is reset.

    Args:
        state: the user's entries.
        group: the optimisation-group entry names to reset.
        positions: scheduler entry name -> saved ``last_epoch`` (None when unknown: left where it is).

    Returns:
        The resets, optimizers and scalers before schedulers (a scheduler's step sets the learning
        rates of a cleared optimizer), and the warnings to give when they are applied.

    Raises:
        StateMismatchError: a scheduler has already stepped past the restored step.
    """
    first: list[Reset] = []
    schedulers: list[Reset] = []
    notes: list[str] = []
    for name in group:
        obj = state[name]
        if isinstance(obj, torch.optim.Optimizer):
            first.append(Reset(name, "clear"))
        elif _is_scaler(obj):
            first.append(Reset(name, "rescale"))
        elif is_scheduler(obj):
            target = positions.get(name)
            if isinstance(obj, torch.optim.lr_scheduler.ReduceLROnPlateau):
                schedulers.append(Reset(name, "keep"))
                notes.append(_plateau_note(name, obj))
            elif target is None:
                schedulers.append(Reset(name, "keep"))
            elif obj.last_epoch > target:
                raise StateMismatchError(
                    f"Cannot reset {name!r}: it has already stepped {obj.last_epoch} times, past the restored "
                    f"step {target}. Pass a freshly created scheduler so it can be moved to the restored step. "
                    "Nothing was loaded."
                )
            else:
                schedulers.append(Reset(name, "step", target))
    return tuple(first + schedulers), tuple(notes)


def _plateau_note(name: str, obj: Any) -> str:
    lrs = [g["lr"] for g in obj.optimizer.param_groups]
    return (
        f"resumekit: '{name}' is a ReduceLROnPlateau scheduler, whose learning rate depends on the metrics "
        "of past epochs, so it cannot be moved to the restored step; it is reset instead: it starts over "
        f"as it was passed (learning rate {lrs}, no memory of past metrics). To continue its schedule, "
        "restore it with the optimizer (include the optimizer, scaler and scheduler in only=)."
    )


def apply_resets(state: Mapping[str, Any], resets: Iterable[Reset]) -> None:
    """Apply resets decided by :func:`plan_resets` (which refused everything that could fail)."""
    for r in resets:
        obj = state[r.name]
        if r.action == "clear":
            obj.state.clear()  # fresh moments; learning rates are set by the schedulers after
        elif r.action == "rescale":
            obj.load_state_dict(
                {
                    "scale": float(obj._init_scale),
                    "growth_factor": float(obj._growth_factor),
                    "backoff_factor": float(obj._backoff_factor),
                    "growth_interval": int(obj._growth_interval),
                    "_growth_tracker": 0,
                }
            )
        elif r.action == "step" and r.target is not None:
            with warnings.catch_warnings():
                # "lr_scheduler.step() before optimizer.step()": intended, no optimizer step happens here.
                warnings.simplefilter("ignore", UserWarning)
                while obj.last_epoch < r.target:
                    obj.step()
