"""resumekit: make PyTorch training runs survive being killed.

Atomic, pickle-free checkpoints on local disk or any fsspec store, and exact resume: the same next
batch, the same random numbers, the same optimizer state.
"""

from __future__ import annotations

import logging

from ._protocol import TrainingState
from .checkpointer import Checkpointer, CheckpointInfo, RestoreResult
from .drift import DriftPolicy
from .errors import ResumeKitError
from .grads import AccumulatedGradients
from .loader import ResumableLoader
from .rng import RNGState
from .sampler import ResumableSampler

__version__ = "0.1.0"

# Library convention: resumekit logs, the application decides where logs go (no stderr duplicates).
logging.getLogger("resumekit").addHandler(logging.NullHandler())

__all__ = [
    "AccumulatedGradients",
    "CheckpointInfo",
    "Checkpointer",
    "DriftPolicy",
    "RNGState",
    "RestoreResult",
    "ResumableLoader",
    "ResumableSampler",
    "ResumeKitError",
    "TrainingState",
    "__version__",
]
