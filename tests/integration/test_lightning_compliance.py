"""The exact-resume compliance check (``resumekit.testing.resume``) on the Lightning adapter's data state.

The Lightning adapter contributes one piece of training state a plain loop does not have: the
:class:`~resumekit_lightning.StatefulLoader` whose ``state_dict`` Lightning stores in its checkpoint. Here
a loop drives it the way Lightning's fit loop does (``sampler.set_epoch`` at every epoch start, batches
taken until the count is reached) and the check asserts that for hypothesis-chosen interruption points
training k steps, saving, restoring into fresh objects and training the rest equals the straight run,
byte for byte. test_lightning_resume.py covers the real Trainer with real kills.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("lightning")
pytest.importorskip("hypothesis")
resume = pytest.importorskip("resumekit.testing.resume")

pytestmark = pytest.mark.lightning

TOTAL = 26  # batches; an epoch holds 10, so interruptions land in three epochs and on boundaries


def make_state() -> Mapping[str, Any]:
    """A seeded run: dropout, shuffling through a StatefulLoader, SGD with momentum, a scheduler."""
    import random

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from resumekit.rng import RNGState
    from resumekit.sampler import ResumableSampler
    from resumekit_lightning import StatefulLoader

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = StatefulLoader(DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=2)))
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader, "rng": RNGState()}


def train(state: Mapping[str, Any], steps: int) -> None:
    """Train ``steps`` batches from wherever the loader stands, calling set_epoch as Lightning does."""
    from torch import nn

    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    done = 0
    while True:
        loader.sampler.set_epoch(loader.sampler.epoch)  # the epoch in progress keeps its position
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                return
        loader.sampler.set_epoch(loader.sampler.epoch + 1)


def test_stateful_loader_state_passes_the_exact_resume_compliance_check() -> None:
    resume.check_resume(make_state, train, total_steps=TOTAL, max_examples=5, fresh_process=False)
