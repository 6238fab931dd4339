"""resumekit for Hugging Face Accelerate: exact, atomic, pickle-free ``save_state`` / ``load_state``.

Example:
    >>> from resumekit_accelerate import AcceleratorCheckpointer  # doctest: +SKIP
    >>> model, opt, dl = accelerator.prepare(model, opt, dl)       # doctest: +SKIP
    >>> ckpt = AcceleratorCheckpointer(accelerator, "runs/demo", keep_last=3)  # doctest: +SKIP
    >>> ckpt.load_state()                                          # doctest: +SKIP
    >>> ckpt.save_state(step=100)                                  # doctest: +SKIP
"""

from __future__ import annotations

from ._data import DataLoaderPosition, EpochSampler, UnsupportedDataLoaderError
from .checkpointer import AcceleratorCheckpointer, UnsupportedSetupError

__all__ = [
    "AcceleratorCheckpointer",
    "DataLoaderPosition",
    "EpochSampler",
    "UnsupportedDataLoaderError",
    "UnsupportedSetupError",
]
