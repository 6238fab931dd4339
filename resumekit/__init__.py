"""resumekit: make PyTorch training runs survive being killed.

Atomic, pickle-free checkpoints on local disk or any fsspec store, and exact resume: the same next
batch, the same random numbers, the same optimizer state.
"""

from __future__ import annotations

from ._protocol import TrainingState
from .checkpointer import CheckpointInfo, Checkpointer, RestoreResult
from .drift import DriftPolicy
from .errors import ResumeKitError

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "Checkpointer",
    "DriftPolicy",
    "RestoreResult",
    "ResumeKitError",
    "TrainingState",
    "__version__",
]
