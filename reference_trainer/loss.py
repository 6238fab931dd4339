"""A pairwise distance loss over every pair of the global batch, correct under DDP.

Field lesson: a pairwise loss computed on each rank's shard only never sees a pair whose samples sit on
different ranks; with W ranks it misses ``1 - 1/W`` of the pairs, and its gradient is not the gradient of
the global-batch loss. Here each rank gathers every rank's embeddings *with their gradients*
(:func:`gather_with_grad`; ``torch.distributed.all_gather`` returns detached tensors) and every rank
computes the same loss over all pairs of the global batch.

Gradient scaling, the invariant that makes DDP on W ranks equal one process on the global batch: every
rank holds the same loss ``L``. The gather's backward sums the incoming gradients over ranks, so rank k's
local embeddings receive ``W * dL/de_k``; DDP then averages parameter gradients over the W ranks, which
gives exactly ``dL/dtheta``. So the per-rank loss is the plain global-batch loss, with no extra factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from reference_trainer.data import TargetDistance

__all__ = [
    "EmbeddingMetric",
    "PairwiseOutput",
    "PairwiseStats",
    "embedding_distances",
    "gather_with_grad",
    "pairwise_loss",
    "upper_triangle",
]

EmbeddingMetric = Literal["euclidean", "sqeuclidean", "cosine"]

ProcessGroup = Optional[Any]  # torch.distributed.ProcessGroup; None means the default group.


def _world(group: ProcessGroup) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.size = sizes[rank]
        longest = max(sizes)
        local = tensor.contiguous()
        if local.shape[0] < longest:
            # all_gather needs equal shapes: pad to the longest shard, then cut every shard to its size.
            pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
            local = torch.cat([local, pad])
        shards = [torch.empty_like(local) for _ in sizes]
        dist.all_gather(shards, local, group=group)
        return torch.cat([shard[:n] for shard, n in zip(shards, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss may depend on this rank's rows; their total gradient is the sum over ranks.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.start + ctx.size], None, None


def gather_with_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (in rank order), keeping the autograd graph.

    The result's rows ``[start, start + n)`` are this rank's ``tensor``; gradients reaching any rows of
    the result on any rank flow back to the rank that produced them (the backward all-reduces, by sum,
    the gradient of the whole result and keeps this rank's rows). Shards may have different lengths
    (a last, smaller batch). Every rank of ``group`` must call this the same number of times, in the
    same order, also in backward. Without an initialised process group (or with one rank) it returns
    ``tensor`` itself.

    Args:
        tensor: ``(n, ...)`` local rows; the trailing shape and dtype must match on every rank.
        group: Process group; ``None`` means the default group.

    Returns:
        ``(sum of n over ranks, ...)`` tensor.
    """
    _, world_size = _world(group)
    if world_size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    gathered: torch.Tensor = _GatherWithGrad.apply(tensor, group, sizes)
    return gathered


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """Return the strict upper triangle of a square ``(N, N)`` matrix as a ``(N*(N-1)/2,)`` vector.

    Row-major order: ``(0,1), (0,2), ..., (1,2), ...``, the order of :func:`embedding_distances`.

    Raises:
        ValueError: ``matrix`` is not square 2-D.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}.")
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[0], offset=1, device=matrix.device)
    return matrix[i, j]


def embedding_distances(embeddings: torch.Tensor, metric: EmbeddingMetric = "euclidean") -> torch.Tensor:
    """Distances between all pairs of rows of ``embeddings``, as a condensed upper-triangle vector.

    Computed from explicit pair differences (not the ``|x|^2 + |y|^2 - 2xy`` shortcut, which cancels
    badly in float32). The Euclidean distance's gradient is finite even for identical embeddings.

    Args:
        embeddings: ``(N, D)`` embeddings.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"`` (``1 - cosine similarity``).

    Returns:
        ``(N*(N-1)/2,)`` distances in :func:`upper_triangle` order.

    Raises:
        ValueError: ``embeddings`` is not 2-D, or an unknown metric.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}.")
    n = embeddings.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=embeddings.device)
    if metric == "cosine":
        unit = torch.nn.functional.normalize(embeddings, dim=1, eps=1e-8)
        return 1.0 - (unit[i] * unit[j]).sum(dim=1)
    squared = (embeddings[i] - embeddings[j]).pow(2).sum(dim=1)
    if metric == "sqeuclidean":
        return squared
    if metric == "euclidean":
        # sqrt has an infinite slope at 0; the clamp keeps the gradient of coincident points at zero.
        return torch.sqrt(squared.clamp_min(1e-12))
    raise ValueError(f"unknown embedding metric {metric!r}; choose 'euclidean', 'sqeuclidean' or 'cosine'.")


@dataclass(frozen=True)
class PairwiseOutput:
    """The loss of one (global) batch and the pair distances it compared.

    Attributes:
        loss: Scalar: mean squared error between predicted and target distances over all pairs.
        predicted: ``(P,)`` predicted distances (with autograd graph).
        target: ``(P,)`` target distances (no gradient).
        num_samples: The number of samples the pairs were formed from (the global batch when gathered).
    """

    loss: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor
    num_samples: int


def pairwise_loss(
    embeddings: torch.Tensor,
    profiles: torch.Tensor,
    target: TargetDistance,
    *,
    metric: EmbeddingMetric = "euclidean",
    gather: bool = True,
    group: ProcessGroup = None,
) -> PairwiseOutput:
    """MSE between predicted and target distances over every pair of the global batch.

    Under DDP, call it on every rank with that rank's ``embeddings`` and ``profiles``; each rank then
    returns the same loss over all pairs of the global batch, and ``loss.backward()`` under DDP gives
    the gradients of one process on the concatenated batch (see the module docstring for why no
    scaling is needed). With ``gather=False`` only the local pairs are used: that is the field-lesson
    bug, kept to demonstrate the difference. A batch of one sample has no pair and a loss of 0.

    Args:
        embeddings: ``(n, D)`` this rank's embeddings.
        profiles: ``(n, F)`` this rank's input profiles (targets are computed from them).
        target: Maps profiles ``(N, F)`` to target distances ``(N, N)``
            (:func:`reference_trainer.data.target_distance`).
        metric: The distance between embeddings, see :func:`embedding_distances`.
        gather: Gather across ranks (no effect without an initialised process group).
        group: Process group; ``None`` means the default group.

    Returns:
        The loss with the predicted and target pair distances.

    Raises:
        ValueError: ``embeddings`` and ``profiles`` hold different numbers of samples.
    """
    if embeddings.shape[0] != profiles.shape[0]:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but profiles has {profiles.shape[0]}; pass the "
            "profiles the embeddings were computed from."
        )
    if gather:
        embeddings = gather_with_grad(embeddings, group)
        with torch.no_grad():
            profiles = gather_with_grad(profiles.detach(), group)
    predicted = embedding_distances(embeddings, metric)
    with torch.no_grad():
        wanted = upper_triangle(target(profiles)).to(predicted.dtype)
    if predicted.numel() == 0:
        loss = embeddings.sum() * 0.0  # keeps the graph connected so DDP still sees every parameter used
    else:
        loss = torch.nn.functional.mse_loss(predicted, wanted)
    return PairwiseOutput(loss=loss, predicted=predicted, target=wanted, num_samples=int(embeddings.shape[0]))


class PairwiseStats:
    """Accumulates validation metrics over batches: loss and the spread of predicted distances.

    A model that has collapsed to predicting the mean distance has a small loss only if targets vary
    little, but it always shows as ``predicted_std`` near 0 while ``target_std`` is not
    (``spread_ratio = predicted_std / target_std`` near 0). Sums are kept in float64.

    Under DDP, feed it outputs of :func:`pairwise_loss` with ``gather=True``: every rank then sees the
    same global pairs and holds the same statistics, so no further reduction is needed (reducing would
    count every pair W times).
    """

    def __init__(self) -> None:
        self.num_pairs = 0
        self._sums = torch.zeros(6, dtype=torch.float64)

    def update(self, output: PairwiseOutput) -> None:
        """Add the pairs of one batch."""
        pred = output.predicted.detach().to("cpu", torch.float64)
        tgt = output.target.detach().to("cpu", torch.float64)
        self.num_pairs += int(pred.numel())
        self._sums += torch.stack(
            [
                (pred - tgt).pow(2).sum(),
                pred.sum(),
                pred.pow(2).sum(),
                tgt.sum(),
                tgt.pow(2).sum(),
                (pred * tgt).sum(),
            ]
        )

    def compute(self) -> dict[str, float]:
        """Return the metrics over all pairs seen so far.

        Returns:
            ``loss`` (MSE per pair), ``predicted_mean``, ``predicted_std``, ``target_mean``,
            ``target_std``, ``spread_ratio`` and ``pearson`` (correlation of predicted and target
            distances; NaN if either is constant). All NaN before the first pair.
        """
        if self.num_pairs == 0:
            nan = float("nan")
            return dict.fromkeys(
                (
                    "loss",
                    "predicted_mean",
                    "predicted_std",
                    "target_mean",
                    "target_std",
                    "spread_ratio",
                    "pearson",
                ),
                nan,
            )
        n = float(self.num_pairs)
        sq_err, sp, sp2, st, st2, spt = (float(v) for v in self._sums)
        pred_mean, tgt_mean = sp / n, st / n
        pred_var = max(sp2 / n - pred_mean**2, 0.0)
        tgt_var = max(st2 / n - tgt_mean**2, 0.0)
        cov = spt / n - pred_mean * tgt_mean
        pred_std, tgt_std = math.sqrt(pred_var), math.sqrt(tgt_var)
        return {
            "loss": sq_err / n,
            "predicted_mean": pred_mean,
            "predicted_std": pred_std,
            "target_mean": tgt_mean,
            "target_std": tgt_std,
            "spread_ratio": pred_std / tgt_std if tgt_std > 0 else float("nan"),
            "pearson": cov / (pred_std * tgt_std) if pred_std > 0 and tgt_std > 0 else float("nan"),
        }
