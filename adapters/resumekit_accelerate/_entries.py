"""State entries for what an ``Accelerator`` holds that has no plain ``state_dict()`` of the right shape.

* :class:`CounterEntry`: ``accelerator.step``, which decides when ``accumulate()`` syncs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from resumekit.errors import StateMismatchError

__all__ = ["CounterEntry", "unwrapped"]


def unwrapped(accelerator: Any, model: nn.Module) -> nn.Module:
    """The model without the wrappers ``prepare`` (DDP) or ``torch.compile`` put around it."""
    module: nn.Module = accelerator.unwrap_model(model, keep_torch_compile=False)
    return module


class CounterEntry:
    """``accelerator.step``: the micro-batch counter ``accumulate()`` uses to decide when to sync.

    Args:
        accelerator: The ``Accelerator``.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        """``{"step": accelerator.step}``."""
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set ``accelerator.step``.

        Raises:
            StateMismatchError: the record has no integer ``step``.
        """
        step = state_dict.get("step") if isinstance(state_dict, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise StateMismatchError(
                f"resumekit_accelerate: accelerator record needs an int 'step', got {step!r}"
            )
        self.accelerator.step = step
