"""The user contract: anything with ``state_dict()`` and ``load_state_dict()``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["TrainingState"]


@runtime_checkable
class TrainingState(Protocol):
    """An object whose state can be saved and restored.

    Structurally identical to ``torch.distributed.checkpoint.stateful.Stateful``: ``nn.Module``,
    ``Optimizer``, ``LRScheduler``, ``GradScaler``, torchdata's stateful loaders, and resumekit's own
    :class:`~resumekit.RNGState` and :class:`~resumekit.ResumableSampler` already satisfy it.
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state as a (nested) dict of tensors and plain Python values."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the object's state from a dict produced by :meth:`state_dict`."""
        ...
