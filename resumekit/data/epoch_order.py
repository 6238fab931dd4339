"""The order of an epoch and how a partition of it is split among ranks: pure functions, no state.

Re-exported by :mod:`resumekit.sampler`, where they are documented for users.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from resumekit.data.permutation import RandomAccessPermutation

__all__ = ["OrderKind", "epoch_order", "partition_indices", "per_rank_count"]

OrderKind = Literal["torch", "random-access"]
"""How an epoch's order is drawn; fixed for a run (see :class:`ResumableSampler`)."""
_ORDER_KINDS: tuple[str, ...] = get_args(OrderKind)


# ------------------------------------------------------------------------------------- pure functions


def epoch_order(
    seed: int, epoch: int, length: int, shuffle: bool, order: OrderKind = "torch"
) -> torch.Tensor:
    """The order of one epoch: what the sampler shuffles before padding and splitting.

    Args:
        seed: The sampler's seed.
        epoch: The epoch number.
        length: The dataset length.
        shuffle: ``False`` gives ``0..length-1`` (for either kind).
        order: ``"torch"``: what ``DistributedSampler`` draws. ``"random-access"``: the sampler's
            random-access order, materialised here whole (O(length) memory; the sampler never does this).

    Returns:
        A 1-D int64 tensor, a permutation of ``range(length)``.

    Raises:
        ValueError: ``order`` is not a known kind.
    """
    if order not in _ORDER_KINDS:
        raise ValueError(f"epoch_order: order must be one of {_ORDER_KINDS}, got {order!r}")
    if not shuffle:
        return torch.arange(length, dtype=torch.int64)
    if order == "random-access":
        return torch.from_numpy(RandomAccessPermutation(length, seed, epoch).full())
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(length, generator=g)


def per_rank_count(remaining: int, num_replicas: int, drop_last: bool) -> int:
    """How many samples each rank takes when ``remaining`` samples are split among ``num_replicas`` ranks.

    Args:
        remaining: Samples not yet seen in the epoch.
        num_replicas: Number of ranks.
        drop_last: Drop the tail that does not divide evenly instead of padding.

    Returns:
        ``remaining // num_replicas`` with ``drop_last``, else ``ceil(remaining / num_replicas)``.
    """
    if drop_last:
        return remaining // num_replicas
    return math.ceil(remaining / num_replicas)


def partition_indices(
    order: torch.Tensor,
    start: int,
    num_replicas: int,
    rank: int,
    drop_last: bool,
    skip: int = 0,
) -> list[int]:
    """The indices one rank yields, as a list (see :func:`_partition` for the arguments)."""
    return _partition(order, start, num_replicas, rank, drop_last, skip).tolist()


def _partition(
    order: torch.Tensor,
    start: int,
    num_replicas: int,
    rank: int,
    drop_last: bool,
    skip: int = 0,
) -> torch.Tensor:
    """The indices one rank yields for the partition of ``order`` that begins at ``start``.

    Args:
        order: The epoch order (see :func:`epoch_order`).
        start: Global position where the partition begins; ``order[start:]`` is what it splits.
        num_replicas: Number of ranks sharing the partition.
        rank: This rank.
        drop_last: Drop the uneven tail instead of padding by repeating from the partition's start.
        skip: Samples this rank already consumed in the partition.

    Returns:
        This rank's remaining indices, in order.
    """
    remaining = order[start:] if start < len(order) else order[:0]
    count = per_rank_count(len(remaining), num_replicas, drop_last)
    total = count * num_replicas
    pad = total - len(remaining)
    if pad > 0:
        # Padding repeats the partition's own head, as many times as needed (DistributedSampler's rule).
        head = remaining[:pad] if pad <= len(remaining) else remaining.repeat(math.ceil(pad / len(remaining)))
        remaining = torch.cat([remaining, head[:pad]])
    segment = remaining[:total]
    first = rank + skip * num_replicas
    return segment[first:total:num_replicas]
