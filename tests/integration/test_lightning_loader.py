"""StatefulLoader keeps the contract Lightning's fit loop relies on for a stateful train loader."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lightning")

import torch
from torch.utils.data import DataLoader

from resumekit.sampler import ResumableSampler
from resumekit_lightning import StatefulLoader

pytestmark = pytest.mark.lightning


def _loader(num_workers: int = 0) -> StatefulLoader[torch.Tensor]:
    data: Any = torch.arange(22)  # a tensor is a map-style dataset of its rows
    return StatefulLoader(
        DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=7), num_workers=num_workers)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_counts_received_batches_and_resume_yields_the_rest(num_workers: int) -> None:
    full = [b.tolist() for b in _loader()]
    assert len(full) == 6

    first = _loader(num_workers)
    it = iter(first)
    got = [next(it).tolist() for _ in range(2)]
    # Workers have prefetched further; the state counts only the two batches received.
    state = first.state_dict()
    assert state["sampler"]["consumed"] == 8
    del it

    second = _loader(num_workers)
    second.load_state_dict(state)
    # Lightning reads len() for the epoch's batch count and resumes batch_idx from its own counter.
    assert len(second) == len(full)
    rest = [b.tolist() for b in second]
    assert got + rest == full


def test_rejects_a_state_it_did_not_write() -> None:
    from resumekit.errors import StateMismatchError

    with pytest.raises(StateMismatchError, match="train-loader state has no 'sampler'"):
        _loader().load_state_dict({"_num_yielded": 3})
