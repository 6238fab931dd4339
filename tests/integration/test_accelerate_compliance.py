"""The exact-resume compliance check (``resumekit.testing.resume``) on the Accelerate adapter's state.

For interruption points hypothesis chooses, training k micro-batches, saving, restoring into fresh
objects and training the rest ends in exactly the state of the straight run: every entry's files byte
for byte (weights, gradients inside an accumulation window, optimizer, scheduler, dataloader position,
``accelerator.step``, RNG). Segments run in this process (fresh ``Accelerator`` objects each time);
test_accelerate_resume.py covers real kills in fresh processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("hypothesis")
resume = pytest.importorskip("resumekit.testing.resume")

pytestmark = pytest.mark.accelerate

TOTAL = 30  # micro-batches; an epoch holds 12, so interruptions land in three different epochs


def make_state() -> Mapping[str, Any]:
    """A seeded Accelerate run: dropout, shuffling, AdamW, a scheduler, gradient accumulation 2."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from resumekit_accelerate import AcceleratorCheckpointer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    set_seed(0)  # Python, NumPy and torch: every stream the state's RNGState records
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 6, generator=g)
    dl = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).cos()), batch_size=4, shuffle=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    # The harness saves and restores the state itself; the url is only where this checkpointer would write.
    return AcceleratorCheckpointer(accelerator, "memory://resumekit-compliance/unused").state()


def train(state: Mapping[str, Any], steps: int) -> None:
    """Train ``steps`` micro-batches, continuing wherever the state's dataloader stands."""
    from torch import nn

    accelerator = state["accelerator"].accelerator
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    dl = state["dataloader"].dataloader
    done = 0
    while done < steps:
        for xb, yb in dl:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(xb), yb))
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad()
            done += 1
            if done == steps:
                break


def test_accelerate_state_passes_the_exact_resume_compliance_check() -> None:
    resume.check_resume(make_state, train, total_steps=TOTAL, max_examples=5, fresh_process=False)
