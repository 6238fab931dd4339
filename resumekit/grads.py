"""Gradients accumulated inside a gradient-accumulation window, as checkpointable state."""

from __future__ import annotations

from typing import Any

import torch

from resumekit.engine.keys import unwrap_model
from resumekit.errors import StateMismatchError

__all__ = ["AccumulatedGradients"]


class AccumulatedGradients:
    """The ``.grad`` of every parameter of a model, so a checkpoint inside an accumulation window resumes
    exactly: the micro-batches already accumulated travel with the checkpoint, and the position is
    never rounded to a window boundary.

    Put it in the checkpointed state next to the model: ``{"model": model, "grads": AccumulatedGradients(model)}``.
    Saved per rank (under ``no_sync`` ranks hold different partial gradients), under the unwrapped
    model's parameter names, so DDP/DataParallel/``torch.compile`` wrapping may change on resume.

    Args:
        model: the module whose parameters' gradients are saved (wrapped or not, as trained).
    """

    resumekit_scope = "rank"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """Each parameter's gradient (a tensor, or None where there is none)."""
        return {
            name: (None if p.grad is None else p.grad)
            for name, p in unwrap_model(self.model).named_parameters()
        }

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
            StateMismatchError: a parameter is missing from the saved state, or a shape differs.
        """
        params = dict(unwrap_model(self.model).named_parameters())
        self._check(state_dict, params)
        for name, p in params.items():
            g = state_dict[name]
            p.grad = None if g is None else g.detach().to(device=p.device, dtype=p.dtype).clone()

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
        for name, p in params.items():
            g = state_dict[name]
            if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(p.shape)):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise StateMismatchError(
                    f"saved gradient of '{name}' has shape {shape}, the parameter {tuple(p.shape)}; "
                    "the model changed since the checkpoint. Restore without the gradients "
                    "(only=[...] without this entry) and resume at an accumulation boundary."
                )
