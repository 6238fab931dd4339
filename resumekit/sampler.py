"""A sampler whose position is part of the checkpoint, counted in global samples.

The order of an epoch is a pure function of ``(seed, epoch, dataset length)``: the same torch.randperm a
``DistributedSampler`` draws. The position is the number of samples of that order the training loop has
consumed, summed over ranks, so resuming recomputes the order and slices it: cost independent of the
position, and no sample is read to skip ahead.

Partitioning. An epoch is a sequence of *partitions*. A partition starts at a global position ``start``
(0 at the start of the epoch) and splits the not yet seen part of the order, ``order[start:]``, among the
current ``num_replicas`` ranks exactly like ``DistributedSampler``: padded by repeating from its own start
so every rank gets the same count, or with its tail dropped when ``drop_last``; rank ``r`` takes every
``num_replicas``-th element from offset ``r``. A resume with the same world size continues the same
partition; a resume with a different world size starts a new partition at the saved position, so every
sample the epoch has not yet seen is visited exactly once across the new ranks (plus padding).

Order kinds. ``"torch"`` (the default) is ``DistributedSampler``'s order, built whole with
``torch.randperm``. ``"random-access"`` is a keyed pseudo-random permutation that gives any position's
element directly (:mod:`resumekit.data.permutation`): the sampler computes its rank's indices chunk by chunk
from its positions in the padded partition (segment position ``q`` is element ``start + q % remaining``
of the order, which is exactly the padding rule above), so landing anywhere costs one small chunk and
memory does not grow with the dataset. Partitioning, positions and the record are the same for both.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import Sampler

from resumekit.data import loaderwatch as _loaderwatch
from resumekit.data.epoch_order import (
    _ORDER_KINDS,
    OrderKind,
    _partition,
    epoch_order,
    partition_indices,
    per_rank_count,
)
from resumekit.data.permutation import RandomAccessPermutation, strided_chunks
from resumekit.data.sampler_record import validated as _validated
from resumekit.errors import StateMismatchError

__all__ = [
    "OrderKind",
    "ResumableSampler",
    "epoch_order",
    "partition_indices",
    "per_rank_count",
]

_FORMAT = 1

_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------------- the sampler


class _TaggedIndex(int):
    """A dataset index that carries the ``(seed, epoch)`` of the epoch it belongs to.

    :class:`~resumekit.ResumableLoader` makes the sampler yield these so that the code fetching a sample
    in a worker process, which may live across epochs (``persistent_workers``), knows which epoch it
    serves. It unwraps to a plain ``int`` before the user's dataset sees it.
    """

    seed: int
    epoch: int

    def __new__(cls, value: int, seed: int, epoch: int) -> _TaggedIndex:
        obj = super().__new__(cls, value)
        obj.seed = seed
        obj.epoch = epoch
        return obj

    def __reduce__(self) -> tuple[Any, tuple[int, int, int]]:
        return (_TaggedIndex, (int(self), self.seed, self.epoch))


class ResumableSampler(Sampler[int]):
    """A drop-in for ``RandomSampler``, ``SequentialSampler`` and ``DistributedSampler`` that resumes exactly.

    With ``num_replicas=W`` and rank ``r`` it yields exactly what
    ``DistributedSampler(dataset, W, r, shuffle, seed, drop_last)`` yields for the same epoch; with
    ``shuffle=False`` and one replica, what ``SequentialSampler`` yields. Its state (seed, epoch, global
    position in the epoch, dataset length, world size, shuffle, drop_last) goes into the checkpoint.

    The position advances as samples are consumed: by default as this sampler yields them (exact for a
    plain loop and for a ``DataLoader`` with ``num_workers=0``); when the sampler sits in a
    :class:`~resumekit.ResumableLoader`, only when the training loop receives a batch, so batches
    prefetched by worker processes are not counted.

    Order kinds (fixed for a run; the record stores it and a restore with the other kind is an error):

    * ``"torch"`` (default): ``torch.randperm`` seeded with ``seed + epoch``, identical to
      ``DistributedSampler`` / ``RandomSampler``; it can take over a run that used them. Each iteration
      builds the whole permutation: O(n) time and ``8 * n`` bytes, whatever the position.
    * ``"random-access"``: a keyed pseudo-random permutation of the dataset computed chunk by chunk from
      positions, so landing anywhere in an epoch costs O(chunk) time and memory, independent of the
      dataset length and the position. A different (still uniform-looking) shuffle from ``"torch"``; every
      ``(seed, epoch)`` gives its own order. Partitioning, padding, ``drop_last``, positions and
      world-size changes behave exactly as with ``"torch"``.

    Epochs: :meth:`set_epoch` on the epoch in progress keeps its position (the natural loop calls it right
    after a restore); another epoch starts at position 0. Iterating again after an epoch was finished,
    without ``set_epoch``, starts the next epoch (a fresh order, like ``RandomSampler``).

    Args:
        dataset: A sized (map-style) dataset.
        num_replicas: Number of ranks; defaults to the torch.distributed world size when initialised, else 1.
        rank: This rank; defaults to the torch.distributed rank when initialised, else 0.
        shuffle: Shuffle the order each epoch.
        seed: Seed of the order; identical on every rank.
        drop_last: Drop the tail that does not split evenly among ranks instead of padding.
        order: How the epoch's order is drawn: ``"torch"`` or ``"random-access"`` (see above).

    Raises:
        ValueError: ``num_replicas`` or ``rank`` is out of range, or ``order`` is not a known kind.
        TypeError: ``dataset`` has no ``__len__``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        order: OrderKind = "torch",
    ) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError(
                f"ResumableSampler needs a dataset with __len__ (map-style), got {type(dataset).__name__}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1:
            raise ValueError(f"ResumableSampler: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} outside 0..{num_replicas - 1}")
        if order not in _ORDER_KINDS:
            raise ValueError(f"ResumableSampler: order must be one of {_ORDER_KINDS}, got {order!r}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.order: OrderKind = order
        self.epoch = 0
        # Global samples of this epoch's order consumed so far, padding included.
        self._consumed = 0
        # Global position where the current partition began; (consumed - start) % num_replicas == 0.
        self._start = 0
        # The epoch was finished in this process: the next iteration without set_epoch starts a new one.
        self._finished = False
        # Set by ResumableLoader: it advances the position when the loop receives a batch.
        self._external_count = False
        self._tag_indices = False
        # Position len() reports from; fixed at set_epoch, load_state_dict and the start of an iteration.
        self._view = 0
        # A bare DataLoader iterator driving the iteration: the position is read from its batch count.
        self._binding: _loaderwatch.Binding | None = None
        self._loader_iter: Any = (
            None  # weakref to the DataLoader iterator found, when no binding could be made
        )
        self._live = False  # an iteration counted by yields (or by ResumableLoader) is in progress
        self._token: object = None
        # The current epoch came from load_state_dict: set_epoch(epoch) keeps it even when it is finished.
        self._restored = False
        # After a restore: give back the base seed the first DataLoader iterator draws (see _loaderwatch).
        self._give_back = False
        self._give_back_any_epoch = False
        # What a bare DataLoader cannot make exact; recorded in the checkpoint and warned about.
        self._unwrapped_workers = 0
        self._counts_prefetch = False
        self._warned = False

    # --------------------------------------------------------------------------------- geometry

    @property
    def num_samples(self) -> int:
        """This rank's sample count for a full epoch at the current world size (as ``DistributedSampler``)."""
        return per_rank_count(len(self.dataset), self.num_replicas, self.drop_last)

    @property
    def total_size(self) -> int:
        """Global sample count of a full epoch, padding included (as ``DistributedSampler``)."""
        return self.num_samples * self.num_replicas

    @property
    def consumed(self) -> int:
        """Global samples of the current epoch consumed so far (padding included)."""
        self._sync()
        return self._consumed

    def _sync(self) -> None:
        """Bring the position up to what a bound DataLoader iterator has handed to the loop."""
        b = self._binding
        if b is None:
            return
        self._consumed = b.start_position + b.local_consumed() * self.num_replicas
        if b.exhausted() or self._remaining_now() == 0:
            self._finished = True

    def _partition_count(self) -> int:
        remaining = max(0, len(self.dataset) - self._start)
        return per_rank_count(remaining, self.num_replicas, self.drop_last)

    def _local_done(self, position: int) -> int:
        return (position - self._start) // self.num_replicas

    def remaining(self) -> int:
        """Samples this rank has still to consume in the current epoch."""
        self._sync()
        return self._remaining_now()

    def _remaining_now(self) -> int:
        return max(0, self._partition_count() - self._local_done(self._consumed))

    def _at_end(self) -> bool:
        return self._remaining_now() == 0

    # --------------------------------------------------------------------------------- epochs

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields.

        The epoch in progress (for instance the one just restored) keeps its position; any other epoch,
        or the same epoch once it was finished in this process, starts at position 0.

        Args:
            epoch: The epoch number.
        """
        self._sync()
        epoch = int(epoch)
        # A finished epoch restarts, except the one just restored: the resume loop calls set_epoch on it.
        if epoch != self.epoch or (self._finished and not self._restored):
            self.epoch = epoch
            self._consumed = 0
            self._start = 0
            self._binding = None
            # The straight run created this epoch's iterator too, with its draw; a persistent one it reused.
            self._give_back = self._give_back and self._give_back_any_epoch
        self._finished = False
        self._restored = False
        self._view = self._consumed

    def _roll_over_if_finished(self) -> None:
        # Finished means the loop got all this epoch will give: its end, or all but a dropped last batch.
        if self._finished:
            self.set_epoch(self.epoch + 1)

    def _mark_finished(self) -> None:
        self._finished = True

    # --------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[int]:
        self._sync()
        self._binding = None
        self._roll_over_if_finished()
        self._restored = False
        self._view = self._consumed
        length, skip = len(self.dataset), self._local_done(self._consumed)
        chunks: Iterator[list[int]]
        if self.order == "random-access":
            perm = RandomAccessPermutation(length, self.seed, self.epoch) if self.shuffle else None
            remaining = max(0, length - self._start)
            count = per_rank_count(remaining, self.num_replicas, self.drop_last)
            # Segment position q (rank + j * num_replicas) is order position start + q % remaining: the
            # unseen order, then padding that repeats the partition's head cyclically, as _partition pads.
            chunks = strided_chunks(perm, self._start, remaining, self.rank, self.num_replicas, skip, count)
        else:
            order = epoch_order(self.seed, self.epoch, length, self.shuffle)
            indices = _partition(order, self._start, self.num_replicas, self.rank, self.drop_last, skip)
            # Converted to Python ints chunk by chunk: the first batch after a resume does not wait for
            # millions of remaining indices to become a list.
            chunks = (chunk.tolist() for chunk in indices.split(_CHUNK))
        return self._yield(chunks)

    def _yield(self, chunks: Iterator[list[int]]) -> Iterator[int]:
        # Runs at the first index pulled: after a DataLoader iterator's __init__ drew its base seed.
        seed, epoch = self.seed, self.epoch
        tag, count = self._tag_indices, not self._external_count
        token: object = None
        if not count:
            self._give_back = False  # ResumableLoader lends the iterator a private generator: nothing drawn
        else:
            count = self._bind_loader()
            token = self._token = object()
            self._live = True
        try:
            for chunk in chunks:
                for i in chunk:
                    if count:
                        self._advance(1)
                    yield _TaggedIndex(i, seed, epoch) if tag else i
            if count:
                self._mark_finished()
        finally:
            if not self._external_count and self._token is token:
                self._live = False

    def _bind_loader(self) -> bool:
        """Bind to the bare DataLoader iterator pulling from this sampler, if any; True: count yields."""
        binding, it = _loaderwatch.bind(self, self._remaining_now())
        give_back, self._give_back = self._give_back, False
        if it is None:
            return True
        if give_back and _loaderwatch.give_back_base_seed(it) == "moved":
            warnings.warn(
                "ResumableSampler: after the restore, the global torch random stream moved by more than the "
                "DataLoader iterator's base-seed draw before the first batch (something drew random numbers "
                "between Checkpointer.restore() and the loop), so the loop's random numbers from here on "
                "differ from the uninterrupted run's. Fix: draw nothing random between the restore and the "
                "loop, or wrap the loader: resumekit.ResumableLoader(DataLoader(...)).",
                RuntimeWarning,
                stacklevel=3,
            )
        workers = int(getattr(it, "_num_workers", 0))
        if workers > 0:
            self._unwrapped_workers = workers
        if binding is None:
            self._loader_iter = weakref.ref(it)
            self._counts_prefetch = self._counts_prefetch or workers > 0
            return True
        binding.start_position = self._consumed
        self._binding = binding
        return False

    def _in_iteration(self) -> bool:
        if self._binding is not None:
            return self._binding.in_iteration()
        return self._live

    def _open_iterator(self) -> int:
        """0: no DataLoader iterator open; 1: one is open; 2: a persistent-workers iterator exists."""
        b = self._binding
        if b is not None:
            alive = b.iterator() is not None
            return 2 if b.persistent and alive else int(b.iterator_open())
        it = self._loader_iter() if self._loader_iter is not None else None
        if it is None:
            return 0
        return 2 if getattr(it, "_persistent_workers", False) else int(self._live)

    def _advance(self, local_samples: int) -> None:
        """Record that the loop consumed ``local_samples`` samples on this rank (and as many on each other)."""
        self._consumed += local_samples * self.num_replicas
        if self._at_end():
            self._finished = True

    def __len__(self) -> int:
        """This rank's count for the next or current iteration: after a mid-epoch resume, what remains."""
        self._sync()
        if self._finished:
            return self.num_samples
        return max(0, self._partition_count() - self._local_done(self._view))

    # --------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The position and everything the epoch's order depends on.

        Returns:
            ``{"format", "seed", "epoch", "consumed", "partition_start", "dataset_length", "num_replicas",
            "shuffle", "drop_last", "order"}``; ``consumed`` and ``partition_start`` count global samples;
            ``order`` is the order kind (a record without it was written before kinds existed: ``"torch"``).
            Four more describe the loop that produced the record: ``in_iteration`` (the loop was inside an
            iteration of the epoch), ``open_iterator`` (0, 1: a DataLoader iterator was open, 2: a
            persistent-workers one existed), ``unwrapped_workers`` (``num_workers`` of a DataLoader without
            :class:`~resumekit.ResumableLoader`, 0 if none) and ``counts_prefetch`` (the position counts
            indices workers prefetched). The last two draw a warning here, once, and at restore.
        """
        self._sync()
        self._warn_inexact_once()
        return {
            "format": _FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self._consumed,
            "partition_start": self._start,
            "dataset_length": len(self.dataset),
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "order": self.order,
            "in_iteration": self._in_iteration(),
            "open_iterator": self._open_iterator(),
            "unwrapped_workers": self._unwrapped_workers,
            "counts_prefetch": self._counts_prefetch,
        }

    def _warn_inexact_once(self) -> None:
        if self._warned or not (self._unwrapped_workers or self._counts_prefetch):
            return
        self._warned = True
        warnings.warn(
            "ResumableSampler: "
            + _loaderwatch.inexact_message(self._unwrapped_workers, self._counts_prefetch, saving=True),
            RuntimeWarning,
            stacklevel=3,
        )

    def resumekit_validate(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check a saved record against this sampler without changing anything.

        The Checkpointer calls this for every entry before it loads any, so a dataset that shrank
        below the saved position fails the restore before the model or optimizer is touched.

        Returns:
            The validated record.

        Raises:
            StateMismatchError: as :meth:`load_state_dict`.
        """
        s = _validated(state_dict)
        if s["order"] != self.order:
            raise StateMismatchError(
                f"ResumableSampler: the checkpoint was written by a sampler with order={s['order']!r}, but "
                f"this sampler was built with order={self.order!r}; the two kinds shuffle differently, so "
                f"the saved position (global sample {s['consumed']} of epoch {s['epoch']}) would point into "
                f"another order and samples would be repeated or skipped. The order kind is fixed for a "
                f"run. Fix: build the sampler with ResumableSampler(..., order={s['order']!r}) to resume "
                "this run; to change kinds, leave the sampler out of the restore and start the next epoch "
                f"afresh with sampler.set_epoch({s['epoch'] + 1})."
            )
        length = len(self.dataset)
        saved_length = s["dataset_length"]
        if length != saved_length and s["consumed"] > 0:
            if s["consumed"] > length:
                problem = f"the saved position {s['consumed']} lies beyond the end of the new dataset"
            else:
                problem = "the saved position cannot be mapped onto a different dataset's order"
            raise StateMismatchError(
                f"ResumableSampler: the checkpoint is at global sample {s['consumed']} of epoch {s['epoch']} "
                f"of a dataset of length {saved_length}, but the dataset now has length {length}; {problem}. "
                f"Fix: restore with the dataset the checkpoint was written with (length {saved_length}), or "
                f"leave the sampler out of the restore and call sampler.set_epoch({s['epoch'] + 1}) to "
                "start the next epoch on the new data."
            )
        return s

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved position.

        The checkpoint's ``seed``, ``shuffle`` and ``drop_last`` replace the constructor's (they define the
        order of the epoch in progress); a difference draws a warning. A different world size starts a new
        partition at the saved position.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            StateMismatchError: The record is malformed, was written with another order kind, or the
                dataset length changed while the epoch was in progress (position > 0). Nothing is changed.
        """
        s = self.resumekit_validate(state_dict)
        for key in ("seed", "shuffle", "drop_last"):
            if getattr(self, key) != s[key]:
                warnings.warn(
                    f"ResumableSampler: {key}={getattr(self, key)!r} was passed but the checkpoint was "
                    f"written with {key}={s[key]!r}; the checkpoint's value is used so the epoch in "
                    "progress continues exactly.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.seed, self.shuffle, self.drop_last = s["seed"], s["shuffle"], s["drop_last"]
        self.epoch = s["epoch"]
        self._consumed = s["consumed"]
        # Same world size: continue the saved partition. Otherwise the unseen rest is split afresh.
        self._start = s["partition_start"] if s["num_replicas"] == self.num_replicas else s["consumed"]
        self._binding, self._loader_iter, self._live = None, None, False
        at_end = self._at_end()
        # As the in-process sampler at the save: an iteration in progress continues (empty at the end);
        # an ended one rolls over to the next epoch when iterated again without set_epoch.
        self._finished = at_end and not s["in_iteration"]
        self._restored = True
        # The resumed run recreates the iterator of an open iteration, or re-iterates a finished epoch: a
        # base-seed draw the straight run did not make. A persistent iterator was never recreated at all.
        self._give_back = s["open_iterator"] > 0 or at_end
        self._give_back_any_epoch = s["open_iterator"] == 2
        self._unwrapped_workers, self._counts_prefetch, self._warned = 0, False, False
        self._view = self._consumed
        if s["unwrapped_workers"] or s["counts_prefetch"]:
            warnings.warn(
                "ResumableSampler: "
                + _loaderwatch.inexact_message(s["unwrapped_workers"], s["counts_prefetch"], saving=False),
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        self._sync()
        return (
            f"ResumableSampler(len={len(self.dataset)}, num_replicas={self.num_replicas}, rank={self.rank}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, order={self.order!r}, "
            f"epoch={self.epoch}, consumed={self._consumed})"
        )
