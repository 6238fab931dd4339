"""Training loops the compliance suite is run on (module level: the fresh processes import them)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import resumekit as rk


def make_state() -> dict[str, Any]:
    """A small but complete plain-PyTorch training state, seeded like any reproducible run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 6), torch.randn(40, 1))
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.3), torch.nn.Linear(12, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    sampler = rk.ResumableSampler(data, shuffle=True, seed=3)
    return {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler, "rng": rk.RNGState()}


def train(state: Mapping[str, Any], steps: int) -> None:
    """Train ``steps`` optimizer steps, across epochs, with dropout and shuffling."""
    model, opt, sched, sampler = state["model"], state["optimizer"], state["scheduler"], state["sampler"]
    loader = rk.ResumableLoader(DataLoader(sampler.dataset, batch_size=8, sampler=sampler))
    done, epoch = 0, sampler.epoch
    while True:  # the natural loop: set_epoch, then iterate; a restored epoch continues mid-way
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                return
        epoch += 1


def make_state_without_rng() -> dict[str, Any]:
    """The same state without RNGState: dropout after a resume differs, which the check must catch."""
    state = make_state()
    del state["rng"]
    return state
