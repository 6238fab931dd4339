"""Validation: an unpadded sharded order, and the pairwise loss with the spread of predicted distances.

Under DDP a ``DistributedSampler`` pads the validation set by repeating samples so every rank gets as
many; those duplicates would form extra pairs and bias the metrics. :class:`EvalBatches` instead cuts the
validation order into *global* batches of ``batch_size x world_size`` samples and gives each rank a
contiguous, possibly uneven (even empty) slice of each. Every rank therefore calls the gathered
``pairwise_loss`` equally often, every sample counts exactly once, and every rank ends up with the same
statistics (so they must not be all-reduced, which would count each pair W times).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from reference_trainer.data import TargetDistance
from reference_trainer.loss import PairwiseStats, pairwise_loss

__all__ = ["EvalBatches", "validate"]


class EvalBatches:
    """This rank's index batches of the validation set, unpadded.

    Args:
        length: Number of validation samples.
        batch_size: Samples per device (the global batch is ``batch_size * num_replicas``).
        num_replicas: Number of ranks.
        rank: This rank.

    Attributes:
        epoch: Set by :meth:`set_epoch`. The order is fixed (validation of every epoch sees the same
            pairs, so losses are comparable), but the loop still calls ``set_epoch`` on it like on the
            train sampler: a sampler whose epoch is never set is a field lesson, and a shuffled variant
            would silently repeat one order.
    """

    def __init__(self, length: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"EvalBatches: need batch_size >= 1 and 0 <= rank < num_replicas, got batch_size={batch_size}, "
                f"rank={rank}, num_replicas={num_replicas}"
            )
        self.length = length
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch being validated."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches (the same on every rank)."""
        per_step = self.batch_size * self.num_replicas
        return -(-self.length // per_step)

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.num_replicas
        for start in range(0, self.length, per_step):
            size = min(per_step, self.length - start)
            # Near-equal contiguous slices, larger ones first (numpy.array_split's rule).
            base, extra = divmod(size, self.num_replicas)
            lo = start + self.rank * base + min(self.rank, extra)
            hi = lo + base + (1 if self.rank < extra else 0)
            yield list(range(lo, hi))


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, int]],
    batches: EvalBatches,
    target: TargetDistance,
    device: torch.device,
    num_features: int,
) -> dict[str, float]:
    """Validation loss and distance spread over the whole validation set.

    Pairs are formed within each global validation batch (as in training, never across batches).

    Args:
        model: The bare model, or a DataParallel wrapper (not DDP: its forward may run collectives). An
            FSDP2 model's forward all-gathers its shards; that is safe here because every rank runs
            as many forwards (``len(batches)`` is the same on every rank).
        dataset: The validation set.
        batches: This rank's batches.
        target: The target distance.
        device: Where the model lives.
        num_features: Profile length (shapes an empty shard).

    Returns:
        :meth:`PairwiseStats.compute`'s metrics; identical on every rank.
    """
    was_training = model.training
    model.eval()
    stats = PairwiseStats()
    try:
        for idx in batches:
            if idx:
                profiles = torch.stack([dataset[i][0] for i in idx]).to(device)
            else:
                profiles = torch.zeros((0, num_features), device=device)
            stats.update(pairwise_loss(model(profiles), profiles, target, gather=True))
    finally:
        model.train(was_training)
    return stats.compute()
