"""resumekit for PyTorch Lightning: atomic, pickle-free checkpoints and exact mid-epoch resume.

Usage::

    trainer = Trainer(callbacks=[ResumeKit(), ModelCheckpoint(every_n_train_steps=50, save_last=True)])
    trainer.fit(model, ckpt_path="last")

with ``train_dataloader()`` returning ``StatefulLoader(DataLoader(ds, batch_size=..., sampler=ResumableSampler(ds)))``
for exact mid-epoch resume.
"""

from __future__ import annotations

from .callback import ResumeKit
from .checkpoint_io import ResumeKitCheckpointIO, load_checkpoint
from .loader import StatefulLoader
from .saving import load_from_checkpoint

__all__ = ["ResumeKit", "ResumeKitCheckpointIO", "StatefulLoader", "load_checkpoint", "load_from_checkpoint"]
