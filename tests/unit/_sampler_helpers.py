"""Helpers shared by the sampler tests."""

from __future__ import annotations

from typing import Any


class Unreadable:
    """A dataset that has a length and fails loudly if a sample is ever read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        raise AssertionError(f"sample {index} was read")


def take(samplers: list[Any], steps: int) -> list[list[int]]:
    """Every rank pulls ``steps`` samples in lockstep, as DDP ranks do."""
    iters = [iter(s) for s in samplers]
    return [[next(it) for _ in range(steps)] for it in iters]
