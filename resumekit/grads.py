"""Gradients accumulated inside a gradient-accumulation window, as checkpointable state."""

from __future__ import annotations

import math
from typing import Any

import torch

from resumekit.engine.keys import unwrap_model
from resumekit.errors import StateMismatchError, UnsupportedValueError
from resumekit.sharding.grads import unsynced_fsdp_grads
from resumekit.sharding.shards import dtensor_type

__all__ = ["AccumulatedGradients"]

#: The key under which a state lists where each saved DTensor gradient shard sits.
_LAYOUT = "__dtensor_layout__"


class AccumulatedGradients:
    """The ``.grad`` of every parameter of a model, so a checkpoint inside an accumulation window resumes
    exactly: the micro-batches already accumulated travel with the checkpoint, and the position is
    never rounded to a window boundary.

    Put it in the checkpointed state next to the model: ``{"model": model, "grads": AccumulatedGradients(model)}``.
    Saved per rank (under ``no_sync`` ranks hold different partial gradients), under the unwrapped
    model's parameter names, so DDP/DataParallel/``torch.compile`` wrapping may change on resume.

    Under FSDP2 (or any DTensor parameters) a gradient is a DTensor: each rank saves its own local
    shard, and a restore rebuilds the DTensor on the parameter's mesh and placements. A shard only fits
    the same sharding, so a checkpoint taken inside a window restores at the same world size and mesh;
    one taken at a window boundary holds no gradients and restores anywhere.

    Args:
        model: the module whose parameters' gradients are saved (wrapped or not, as trained).
    """

    resumekit_scope = "rank"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """Each parameter's gradient (a tensor, this rank's shard of a DTensor, or None where there is
        none); for DTensor gradients also where each shard sits (mesh shape, placements, this rank's
        coordinate), so that a restore can tell a shard that fits from one that merely has its shape.

        Raises:
            UnsupportedValueError: FSDP2 holds gradients outside ``.grad`` (micro-batches run with
                ``set_requires_gradient_sync(False)``), which this record cannot carry.
        """
        model = unwrap_model(self.model)
        unsynced = unsynced_fsdp_grads(model)
        if unsynced:
            raise UnsupportedValueError(
                f"FSDP2 modules {unsynced[:3]} hold gradients of micro-batches run with "
                "set_requires_gradient_sync(False); FSDP2 keeps them unsharded inside its own state, not "
                "in .grad, so a checkpoint would silently lose them. Save after a backward with gradient "
                "sync on (FSDP2's default: each micro-batch's gradients are reduce-scattered into .grad "
                "shards, which are saved), or at an accumulation boundary (after optimizer.step())."
            )
        dt = dtensor_type()
        out: dict[str, Any] = {}
        layout: dict[str, Any] = {}
        for name, p in model.named_parameters():
            g = p.grad
            # Invariant: no DTensor reaches the per-rank codec (it refuses them); the local shard is
            # exactly what this rank accumulated, and the mesh/placements come back from the parameter.
            if dt is not None and isinstance(g, dt):
                out[name] = g.to_local()
                layout[name] = _layout(g)
            else:
                out[name] = g
        if layout:
            out[_LAYOUT] = layout
        return out

    def resumekit_validate(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check saved gradients against the model without changing anything.

        The Checkpointer calls this for every entry before it loads any, so gradients that do not fit
        refuse the whole restore before the model or optimizer is touched.

        Returns:
            The saved gradients, unchanged.

        Raises:
            StateMismatchError: as :meth:`load_state_dict`.
        """
        self._check(state_dict, dict(unwrap_model(self.model).named_parameters()))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set each parameter's ``.grad`` to the saved gradient (copied onto the parameter's device).

        Every gradient is checked before any is set: on error nothing has changed.

        Raises:
            StateMismatchError: a parameter is missing from the saved state, or a shape differs (for a
                DTensor parameter: the saved shard does not fit this rank's shard).
        """
        params = dict(unwrap_model(self.model).named_parameters())
        self._check(state_dict, params)
        dt = dtensor_type()
        for name, p in params.items():
            g = state_dict[name]
            if g is None:
                p.grad = None
            elif dt is not None and isinstance(p, dt):
                local = p.to_local()
                shard = g.detach().to(device=local.device, dtype=local.dtype).clone()
                p.grad = dt.from_local(
                    shard, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            else:
                p.grad = g.detach().to(device=p.device, dtype=p.dtype).clone()

    @staticmethod
    def _check(state_dict: Any, params: dict[str, torch.nn.Parameter]) -> None:
        if not isinstance(state_dict, dict):
            raise StateMismatchError(
                f"saved gradients are a {type(state_dict).__name__}, expected a dict from "
                "AccumulatedGradients.state_dict()"
            )
        missing = sorted(set(params) - set(state_dict))
        if missing:
            raise StateMismatchError(
                f"saved gradients lack parameters {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                "the model changed since the checkpoint (or was wrapped differently)."
            )
        dt = dtensor_type()
        layouts = state_dict.get(_LAYOUT, {})
        for name, p in params.items():
            g = state_dict[name]
            if g is None:
                continue
            saved_layout = layouts.get(name) if isinstance(layouts, dict) else None
            if dt is not None and isinstance(p, dt):
                local = p.to_local()
                # The same shape is not enough: at another world size a shard of an uneven dimension can
                # have this rank's shape and hold other rows.
                fits = saved_layout == _layout(p)
                if not fits or not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(local.shape):
                    shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                    raise StateMismatchError(
                        f"saved gradient shard of '{name}' has shape {shape}, but this rank's shard of the "
                        f"parameter is {tuple(local.shape)} (global {tuple(p.shape)}, {p.placements} on a "
                        f"mesh of {p.device_mesh.size()}). The checkpoint was taken inside a "
                        "gradient-accumulation window at another world size or sharding; resume it with "
                        "the same world size and mesh, or from a checkpoint at a window boundary."
                    )
            elif (
                not isinstance(g, torch.Tensor)
                or tuple(g.shape) != tuple(p.shape)
                or (isinstance(saved_layout, dict) and _ranks_in(saved_layout) != 1)
            ):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise StateMismatchError(
                    f"saved gradient of '{name}' has shape {shape}, the parameter {tuple(p.shape)}; "
                    "the model changed since the checkpoint, or the checkpoint holds one rank's shards of "
                    "a sharded run (FSDP2, tensor parallel) taken inside an accumulation window. Restore "
                    "without the gradients (only=[...] without this entry) and resume at an accumulation "
                    "boundary, or at the world size and sharding that saved it."
                )


def _layout(t: Any) -> dict[str, Any]:
    """Where a DTensor's local shard sits: the mesh's shape, the placements and this rank's coordinate."""
    mesh = t.device_mesh
    return {
        "mesh": [int(n) for n in mesh.shape],
        "placements": [str(pl) for pl in t.placements],
        "coordinate": [int(c) for c in (mesh.get_coordinate() or [])],
    }


def _ranks_in(layout: dict[str, Any]) -> int:
    """How many ranks a saved layout's mesh spans (1: its one shard is the whole gradient)."""
    return math.prod(int(n) if isinstance(n, int) else 0 for n in layout.get("mesh", []))
