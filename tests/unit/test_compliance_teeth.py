"""resumekit.testing.check_resume on loops with the bare-DataLoader defects: it fails, naming the cause.

``train`` keeps its data iterator open between calls (a module-level dict), as a loop killed mid-epoch does:
the checkpoint is taken while the epoch's iterator is still open, and the resumed run must recreate it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import resumekit as rk
from resumekit.testing import ComplianceError, check_resume

_OPEN: dict[int, tuple[Any, Iterator[Any]]] = {}


@pytest.fixture(autouse=True)
def _close_iterators() -> Iterator[None]:
    yield
    _OPEN.clear()  # drops the open DataLoader iterators, which shuts their workers down


class Noisy(Dataset):
    """Random augmentation in __getitem__ (in the workers when num_workers > 0)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([i / 24.0]) + 0.1 * torch.randn(1)
        return x, torch.sin(3 * x)


class CountingSampler(Sampler[int]):
    """A stateful sampler that counts what it yields, not what the loop received (no ResumableSampler)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.consumed = n, 0, 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        while self.consumed < self.n:
            self.consumed += 1
            yield order[self.consumed - 1]
        self.epoch, self.consumed = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.n - self.consumed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def _state(sampler: Any) -> dict[str, Any]:
    random.seed(0)  # every source, as check_resume asks (hypothesis reseeds `random` between examples)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": opt, "sampler": sampler, "rng": rk.RNGState()}


def make_resumable() -> dict[str, Any]:
    return _state(rk.ResumableSampler(Noisy(), seed=3))


def make_counting() -> dict[str, Any]:
    return _state(CountingSampler(len(Noisy())))


def make_with_loader() -> dict[str, Any]:
    state = make_resumable()
    state["loader"] = DataLoader(Noisy(), batch_size=4, sampler=state["sampler"])
    return state


def _train(state: dict[str, Any], steps: int, workers: int) -> None:
    sampler = state["sampler"]

    def batches() -> Iterator[Any]:
        while True:  # epochs follow one another: the sampler rolls over when iterated again
            yield from DataLoader(Noisy(), batch_size=4, sampler=sampler, num_workers=workers)

    entry = _OPEN.setdefault(id(sampler), (sampler, batches()))
    model, opt = state["model"], state["optimizer"]
    for _ in range(steps):
        x, y = next(entry[1])
        loss = torch.nn.functional.mse_loss(model(x), y) + 0.01 * torch.rand(())
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_in_process(state: dict[str, Any], steps: int) -> None:
    _train(state, steps, workers=0)


def train_with_workers(state: dict[str, Any], steps: int) -> None:
    _train(state, steps, workers=2)


@pytest.mark.timeout(120)
def test_a_bare_dataloader_over_a_resumable_sampler_passes() -> None:
    check_resume(make_resumable, train_in_process, total_steps=9, max_examples=3, fresh_process=False)


@pytest.mark.timeout(120)
def test_an_iterator_base_seed_draw_after_the_restore_is_named() -> None:
    with pytest.raises(ComplianceError, match=r"random streams in rank-00000/rng\.json diverged") as err:
        check_resume(make_counting, train_in_process, total_steps=9, max_examples=2, fresh_process=False)
    assert "draws its base seed from the global torch generator" in str(err.value)


@pytest.mark.timeout(120)
def test_a_position_that_counts_prefetched_samples_is_named() -> None:
    with pytest.raises(ComplianceError, match=r"data position in sampler\.json differs") as err:
        check_resume(make_counting, train_with_workers, total_steps=4, max_examples=2, fresh_process=False)
    assert "prefetched" in str(err.value) and "ResumableLoader" in str(err.value)


@pytest.mark.timeout(120)
def test_worker_randomness_without_resumable_loader_is_named_with_the_warning() -> None:
    with pytest.raises(ComplianceError, match="resumekit warned in the resumed run") as err:
        check_resume(make_resumable, train_with_workers, total_steps=4, max_examples=2, fresh_process=False)
    message = str(err.value)
    assert "num_workers=2" in message and "resumekit.ResumableLoader(DataLoader(...))" in message


@pytest.mark.timeout(120)
def test_a_dataloader_in_the_state_fails_the_check_with_the_fix() -> None:
    with pytest.raises(ComplianceError, match="'loader' is a DataLoader") as err:
        check_resume(make_with_loader, train_in_process, total_steps=3, max_examples=1)
    assert "resumekit.ResumableSampler(dataset" in str(err.value)
