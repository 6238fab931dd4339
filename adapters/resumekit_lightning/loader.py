"""A training DataLoader that Lightning resumes mid-epoch on the exact next batch.

Lightning restarts an interrupted epoch from its first batch unless the train loader is *stateful*
(has ``state_dict`` / ``load_state_dict``): then it stores the loader's state in the checkpoint
(``loops.fit_loop.combined_loader``) and hands it back before the loader is iterated again.
:class:`StatefulLoader` is that stateful loader, built on :class:`resumekit.loader.ResumableLoader`
and :class:`resumekit.sampler.ResumableSampler`:

* its state is the sampler's position in global samples, counted as the loop receives batches (not as
  workers prefetch them), so the resumed epoch continues with the batch after the last one trained;
* its length is the full epoch's batch count on every call, as Lightning assumes: Lightning resumes
  ``batch_idx`` from its own progress counters and ends the epoch when that count is reached;
* it is not a ``DataLoader``, so under DDP Lightning does not wrap its sampler in a
  ``DistributedSampler``: the ResumableSampler already splits the epoch among ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from torch.utils.data import DataLoader

from resumekit.errors import StateMismatchError
from resumekit.loader import ResumableLoader
from resumekit.sampler import ResumableSampler

__all__ = ["StatefulLoader"]

T = TypeVar("T")
_FORMAT = 1


class StatefulLoader(Generic[T]):
    """Wrap a DataLoader whose ``sampler=`` is a ResumableSampler so Lightning resumes it mid-epoch exactly.

    Return it from ``train_dataloader()``. Under DDP build the sampler inside ``train_dataloader()`` (the
    process group exists by then) and leave ``num_replicas``/``rank`` unset.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from resumekit.sampler import ResumableSampler
        >>> data = torch.arange(10.0)
        >>> loader = StatefulLoader(DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=0)))
        >>> len(loader), [len(b) for b in loader]
        (3, [4, 4, 2])

    Args:
        loader: A DataLoader over a map-style dataset with ``sampler=ResumableSampler(...)`` (the sampler
            shuffles; do not pass ``shuffle=``).
        seed_workers: Passed to :class:`~resumekit.loader.ResumableLoader`: re-seed the random streams
            before every sample from ``(seed, epoch, index)`` so random augmentation replays exactly.

    Raises:
        TypeError: The loader does not draw its indices from a ResumableSampler.
    """

    def __init__(self, loader: DataLoader[T], *, seed_workers: bool = True) -> None:
        self._inner: ResumableLoader[T] = ResumableLoader(loader, seed_workers=seed_workers)
        self._loader = loader

    @property
    def loader(self) -> DataLoader[T]:
        """The wrapped DataLoader."""
        return self._loader

    @property
    def sampler(self) -> ResumableSampler:
        """The ResumableSampler (Lightning calls its ``set_epoch`` at every epoch start)."""
        return self._inner.sampler

    @property
    def batch_size(self) -> int | None:
        """The DataLoader's batch size."""
        return self._loader.batch_size

    def __len__(self) -> int:
        """Batches in a full epoch on this rank, also after a mid-epoch resume (Lightning counts from there)."""
        samples = self.sampler.num_samples
        bs = self._loader.batch_size
        if bs is None:
            return samples
        return samples // bs if self._loader.drop_last else math.ceil(samples / bs)

    def __iter__(self) -> Iterator[T]:
        # The DataLoader iterator is created at the first next(), not here: Lightning creates this iterator
        # before it calls sampler.set_epoch() for the epoch, and workers would otherwise prefetch indices
        # of the wrong epoch.
        yield from self._inner

    def state_dict(self) -> dict[str, Any]:
        """The sampler's epoch and position (global samples the loop received), and its order's inputs."""
        return {"format": _FORMAT, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved position.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            StateMismatchError: The record was not written by :meth:`state_dict`, or the sampler rejects it
                (dataset length changed mid-epoch, ...).
        """
        if not isinstance(state_dict, dict) or "sampler" not in state_dict:
            raise StateMismatchError(
                "StatefulLoader.load_state_dict: the checkpoint's train-loader state has no 'sampler' record "
                f"(got {type(state_dict).__name__}); it was saved from a different train_dataloader(). "
                "Return the same kind of loader as the run that wrote the checkpoint."
            )
        self.sampler.load_state_dict(state_dict["sampler"])

    def __repr__(self) -> str:
        return f"StatefulLoader({self._loader!r}, sampler={self.sampler!r})"
