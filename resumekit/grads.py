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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set each parameter's ``.grad`` to the saved gradient (copied onto the parameter's device).

        Raises:
            StateMismatchError: a parameter is missing from the saved state, or a shape differs.
        """
        params = dict(unwrap_model(self.model).named_parameters())
        missing = sorted(set(params) - set(state_dict))
        if missing:
            raise StateMismatchError(
                f"saved gradients lack parameters {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                "the model changed since the checkpoint (or was wrapped differently)."
            )
        for name, p in params.items():
            g = state_dict[name]
            if g is None:
                p.grad = None
                continue
            if tuple(g.shape) != tuple(p.shape):
                raise StateMismatchError(
                    f"saved gradient of '{name}' has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}"
                )
            p.grad = g.detach().to(device=p.device, dtype=p.dtype).clone()
