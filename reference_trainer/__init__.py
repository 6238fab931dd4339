"""The bundled reference pretrainer: resumekit end to end on a real workload.

A profile encoder learns embeddings whose distances match a pairwise distance between synthetic,
microbiome-like abundance profiles (weighted UniFrac or Bray-Curtis), with a loss over every pair of the
global batch, on one device, under DDP or under DataParallel. The run can be killed at any instant and
continues bit for bit when the same command is run again.

Run it with ``resumekit-pretrain --output-dir runs/demo`` or ``python -m reference_trainer ...``;
``python -m reference_trainer.demo`` shows a kill and a resume. See docs/pretrainer.md.
Submodules: :mod:`~reference_trainer.data`, :mod:`~reference_trainer.model`, :mod:`~reference_trainer.loss`
(the workload); :mod:`~reference_trainer.cli`, :mod:`~reference_trainer.train` (the trainer).
"""

from __future__ import annotations

__all__: list[str] = []
