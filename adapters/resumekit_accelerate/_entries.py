"""State entries for what an ``Accelerator`` holds that has no plain ``state_dict()`` of the right shape.

* :class:`ModelEntry`: a prepared model under canonical keys (the unwrapped model's, without DDP's
  ``module.`` or ``torch.compile``'s ``_orig_mod.``), so it loads into a plain model and back.
* :class:`CounterEntry`: ``accelerator.step``, which decides when ``accumulate()`` syncs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from resumekit.errors import StateMismatchError

__all__ = ["CounterEntry", "ModelEntry", "unwrapped"]


def unwrapped(accelerator: Any, model: nn.Module) -> nn.Module:
    """The model without the wrappers ``prepare`` (DDP) or ``torch.compile`` put around it."""
    module: nn.Module = accelerator.unwrap_model(model, keep_torch_compile=False)
    return module


class ModelEntry:
    """A prepared model's weights under the unwrapped model's own keys.

    Args:
        accelerator: The ``Accelerator`` that prepared ``model``.
        model: The prepared (possibly DDP-wrapped or compiled) model.
    """

    def __init__(self, accelerator: Any, model: nn.Module) -> None:
        self.accelerator = accelerator
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """The unwrapped model's ``state_dict()`` (tensors are not copied)."""
        return dict(unwrapped(self.accelerator, self.model).state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load weights saved by this adapter or by a plain ``Checkpointer`` of the unwrapped model.

        Raises:
            StateMismatchError: keys are missing or unexpected (the message lists a few of each).
        """
        module = unwrapped(self.accelerator, self.model)
        own = set(module.state_dict())
        missing = sorted(own - set(state_dict))
        unexpected = sorted(set(state_dict) - own)
        if missing or unexpected:
            raise StateMismatchError(
                f"resumekit_accelerate: saved model weights do not fit {type(module).__name__}: missing keys "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}. The checkpoint holds another architecture, or was "
                "saved from a wrapped model with its wrapper prefix (module., _orig_mod.) in the keys; save the "
                "unwrapped model (accelerator.unwrap_model(model)) instead."
            )
        module.load_state_dict(state_dict, strict=True)


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
