"""resumekit: make PyTorch training runs survive being killed.

Atomic, pickle-free checkpoints on local disk or any fsspec store, and exact resume: the same next
batch, the same random numbers, the same optimizer state.
"""

from __future__ import annotations

import logging

from resumekit._protocol import TrainingState
from resumekit.checkpointer import Checkpointer, CheckpointInfo, RestoreResult
from resumekit.drift import DriftPolicy
from resumekit.errors import ResumeKitError
from resumekit.grads import AccumulatedGradients
from resumekit.loader import ResumableLoader
from resumekit.rng import RNGState
from resumekit.sampler import ResumableSampler

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
