"""Exact mid-epoch positions for the dataloaders an ``Accelerator`` prepared.

A prepared map-style dataloader is an Accelerate ``DataLoaderShard`` around a ``BatchSampler`` (wrapped in
a ``BatchSamplerShard`` when several processes share it). Two pieces make its position exact:

* :class:`EpochSampler` replaces the user's ``RandomSampler``/``SequentialSampler`` inside that batch
  sampler. The order of epoch ``e`` is :func:`resumekit.sampler.epoch_order` of ``(seed, e, length)``, the
  same on every process, so Accelerate's batch-level sharding is unchanged. Resuming at global sample
  ``c`` yields ``order[c:]``: the permutation is recomputed and sliced, no index or sample before ``c`` is
  produced or read.
* :class:`DataLoaderPosition` counts the batches the training loop *received*: Accelerate calls the
  loader's ``_update_state_dict`` exactly once before each batch it yields, after its one-batch
  look-ahead and after any worker prefetch, so the count is what the loop consumed.

Positions are stored in global samples (``batches * total_batch_size``), so a resume with another number
of processes continues at the same sample.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler

from resumekit.errors import ResumeKitError, StateMismatchError
from resumekit.sampler import epoch_order

__all__ = ["DataLoaderPosition", "EpochSampler", "UnsupportedDataLoaderError", "adopt"]

log = logging.getLogger("resumekit.accelerate")

_FORMAT = 1
_MASK63 = (1 << 63) - 1
_ATTR = "_resumekit_position"


class UnsupportedDataLoaderError(ResumeKitError, TypeError):
    """A prepared dataloader's position cannot be saved exactly (iterable dataset, custom sampler...)."""


def _loader_seed(seed: int, epoch: int, process_index: int) -> int:
    # A pure function of (seed, epoch, process): the DataLoader iterator's base seed (and so worker seeds)
    # is the same in a straight run and after a resume, and it never draws from the global torch stream.
    x = (
        seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + process_index * 0x94D049BB133111EB
    ) & _MASK63
    return x ^ (x >> 31)


class EpochSampler(Sampler[int]):
    """The global sample order of each epoch, resumable at any sample without producing the ones before.

    Installed by :class:`~resumekit_accelerate.AcceleratorCheckpointer` in place of a prepared
    dataloader's ``RandomSampler`` (``shuffle=True``) or ``SequentialSampler`` (``shuffle=False``).
    Accelerate's ``DataLoaderShard`` calls :meth:`set_epoch` with its epoch counter before every pass.

    Args:
        dataset: The (sized, map-style) dataset.
        seed: Seed of the order; must be equal on every process.
        shuffle: Shuffle each epoch (``torch.randperm`` seeded by ``seed + epoch``) or keep index order.
        loader_generator: The generator the DataLoader draws its iterator base seed from; re-seeded from
            ``(seed, epoch, process_index)`` at each :meth:`set_epoch`.
        process_index: This process's index (only mixed into the loader generator's seed).
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int,
        shuffle: bool,
        loader_generator: torch.Generator | None = None,
        process_index: int = 0,
    ) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.loader_generator = loader_generator
        self.process_index = process_index
        self.position: DataLoaderPosition | None = None
        # (epoch, global start) to continue at on the next pass of that epoch; set by a restore.
        self.pending: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass; a restored position is kept only for its own epoch.

        Args:
            epoch: The epoch number.
        """
        self.epoch = int(epoch)
        if self.pending is not None and self.pending[0] != self.epoch:
            self.pending = None
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(_loader_seed(self.seed, self.epoch, self.process_index))

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self.pending is not None and self.pending[0] == self.epoch:
            start = self.pending[1]
        self.pending = None  # one-shot: a later pass of the same epoch starts at its beginning again
        if self.position is not None:
            self.position._begin(self.epoch, start)
        order = epoch_order(self.seed, self.epoch, len(self.dataset), self.shuffle)
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        """The full epoch length, also right after a resume (``len(dataloader)`` stays stable)."""
        return len(self.dataset)


class DataLoaderPosition:
    """The position of one prepared dataloader, as a :class:`~resumekit.TrainingState`.

    Create it with :func:`adopt`. ``state_dict()`` reports the epoch in progress and how many of its
    samples the training loop consumed, summed over processes.

    Args:
        dataloader: The prepared ``DataLoaderShard``.
        sampler: The :class:`EpochSampler` installed in it.
        batch_size: Samples per batch of the user's ``BatchSampler`` (before Accelerate shards it).
        total_batch_size: Global samples the loop consumes per batch (Accelerate's ``total_batch_size``).
        num_processes: Processes sharing the dataloader.
    """

    def __init__(
        self,
        dataloader: Any,
        sampler: EpochSampler,
        batch_size: int,
        total_batch_size: int,
        num_processes: int,
    ) -> None:
        self.dataloader = dataloader
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.total_batch_size = int(total_batch_size)
        self.num_processes = int(num_processes)
        self._epoch: int | None = None  # epoch of the pass in progress (None before the first pass)
        self._start = 0
        self._count = 0
        sampler.position = self
        original = dataloader._update_state_dict

        def count_then_update() -> None:
            self._count += 1
            original()

        # Accelerate calls this once right before each batch it yields to the loop.
        dataloader._update_state_dict = count_then_update

    def _begin(self, epoch: int, start: int) -> None:
        self._epoch, self._start, self._count = epoch, start, 0

    def current(self) -> tuple[int, int]:
        """``(epoch, consumed)``: the epoch the next batch comes from and its global samples consumed."""
        length = len(self.sampler.dataset)
        iteration = int(self.dataloader.iteration)
        if self.sampler.pending is not None:
            return self.sampler.pending
        if self._epoch is not None and iteration == self._epoch:
            consumed = min(length, self._start + self._count * self.total_batch_size)
            batches_done = self._start // self.total_batch_size + self._count
            # After the pass's last batch the next one opens the next epoch. With drop_last the samples
            # left over never make a batch, so the batch count decides, not the sample count.
            if consumed >= length or batches_done >= len(self.dataloader):
                return self._epoch + 1, 0
            return self._epoch, consumed
        return iteration, 0

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the global samples consumed in it, and what its order depends on."""
        epoch, consumed = self.current()
        return {
            "format": _FORMAT,
            "epoch": epoch,
            "consumed": consumed,
            "seed": self.sampler.seed,
            "shuffle": self.sampler.shuffle,
            "dataset_length": len(self.sampler.dataset),
            "batch_size": self.batch_size,
            "total_batch_size": self.total_batch_size,
            "num_processes": self.num_processes,
        }

    def resumekit_validate(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check a saved position against this dataloader without changing anything.

        The core Checkpointer calls this for every entry before it loads any, so a changed dataset
        fails the restore before the model or optimizer is touched.

        Raises:
            StateMismatchError: the record is malformed, the dataset length changed mid-epoch, or the saved
                position does not fall on a batch boundary of this run.
        """
        s = _validated(state_dict)
        length = len(self.sampler.dataset)
        if s["dataset_length"] != length and s["consumed"] > 0:
            raise StateMismatchError(
                f"resumekit_accelerate: the checkpoint is at sample {s['consumed']} of epoch {s['epoch']} of a "
                f"dataset of length {s['dataset_length']}, but the prepared dataloader's dataset has length "
                f"{length}. Restore with the dataset the checkpoint was written with, or leave this dataloader "
                "out (load_state(only=[...]) listing the other entries of ckpt.state()) and start the next "
                f"epoch on the new data with dataloader.set_epoch({s['epoch'] + 1})."
            )
        if s["consumed"] % self.batch_size:
            raise StateMismatchError(
                f"resumekit_accelerate: saved position {s['consumed']} is not a multiple of this run's batch size "
                f"{self.batch_size}; the batches would not line up. Resume with the batch size the "
                f"checkpoint was written with (total {s['total_batch_size']} over {s['num_processes']} process(es))."
            )
        return s

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass continue the saved epoch at the saved sample.

        Raises:
            StateMismatchError: as :meth:`resumekit_validate`.
        """
        s = self.resumekit_validate(state_dict)
        for key in ("seed", "shuffle"):
            if getattr(self.sampler, key) != s[key]:
                warnings.warn(
                    f"resumekit_accelerate: the dataloader now has {key}={getattr(self.sampler, key)!r} but the "
                    f"checkpoint was written with {key}={s[key]!r}; the checkpoint's value is used so the "
                    "epoch in progress continues exactly.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.sampler.seed, self.sampler.shuffle = s["seed"], s["shuffle"]
        self.dataloader.set_epoch(s["epoch"])
        self.sampler.pending = (s["epoch"], s["consumed"]) if s["consumed"] else None
        self._epoch, self._start, self._count = None, 0, 0


def _validated(state_dict: Any) -> dict[str, Any]:
    if not isinstance(state_dict, dict):
        raise StateMismatchError(f"dataloader position must be a dict, got {type(state_dict).__name__}")
    out: dict[str, Any] = {}
    for key in (
        "epoch",
        "consumed",
        "seed",
        "dataset_length",
        "total_batch_size",
        "num_processes",
        "shuffle",
    ):
        if key not in state_dict:
            raise StateMismatchError(
                f"dataloader position record has no {key!r} (keys: {sorted(state_dict)}); it was not written "
                "by resumekit_accelerate"
            )
        value = state_dict[key]
        if key == "shuffle":
            if not isinstance(value, bool):
                raise StateMismatchError(f"dataloader position: 'shuffle' must be a bool, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StateMismatchError(
                f"dataloader position: {key!r} must be a non-negative int, got {value!r}"
            )
        out[key] = value
    if out["consumed"] > out["dataset_length"]:
        raise StateMismatchError(
            f"dataloader position: consumed {out['consumed']} exceeds the dataset length {out['dataset_length']}; "
            "corrupt record"
        )
    return out


def _inner_batch_sampler(dataloader: Any) -> Any:
    outer = dataloader.batch_sampler
    return getattr(outer, "batch_sampler", outer)  # BatchSamplerShard keeps the user's one inside


def adopt(dataloader: Any, *, seed: int, process_index: int, num_processes: int) -> DataLoaderPosition:
    """Install an :class:`EpochSampler` in a prepared dataloader and start counting its batches.

    Idempotent: a dataloader adopted before returns its existing position.

    Args:
        dataloader: A dataloader returned by ``accelerator.prepare``.
        seed: Order seed for a ``RandomSampler`` being replaced (an Accelerate ``SeedableRandomSampler``
            keeps its own ``initial_seed``).
        process_index: This process's index.
        num_processes: Number of processes.

    Returns:
        The dataloader's :class:`DataLoaderPosition`.

    Raises:
        UnsupportedDataLoaderError: the dataloader is not one whose position can be restored exactly.
    """
    existing = getattr(dataloader, _ATTR, None)
    if isinstance(existing, DataLoaderPosition):
        return existing
    from accelerate.data_loader import DataLoaderShard, SeedableRandomSampler  # lazy: optional dependency

    kind = type(dataloader).__name__  # type(): DataLoaderShard reports the wrapped class via __class__
    if not isinstance(dataloader, DataLoaderShard) or not hasattr(dataloader, "_update_state_dict"):
        raise UnsupportedDataLoaderError(
            f"resumekit_accelerate cannot track a {kind}: only map-style dataloaders prepared without "
            "dispatch_batches (Accelerate's DataLoaderShard) resume exactly. Use a map-style dataset, or "
            "pass exact_dataloaders=False to restart such dataloaders at their epoch's beginning."
        )
    dataset = dataloader.dataset
    inner = _inner_batch_sampler(dataloader)
    sampler = getattr(inner, "sampler", None)
    if (
        isinstance(dataset, IterableDataset)
        or not isinstance(inner, BatchSampler)
        or inner.batch_size is None
    ):
        raise UnsupportedDataLoaderError(
            f"resumekit_accelerate cannot track a dataloader over {type(dataset).__name__} with batch sampler "
            f"{type(inner).__name__}: exact positions need a map-style dataset batched by torch's BatchSampler "
            "(DataLoader(dataset, batch_size=..., shuffle=...)). Pass exact_dataloaders=False to restart it "
            "at its epoch's beginning instead."
        )
    if int(getattr(dataloader, "skip_batches", 0)):
        raise UnsupportedDataLoaderError(
            "resumekit_accelerate: this dataloader skips batches (skip_first_batches); resumekit restores "
            "the position itself. Pass the dataloader accelerator.prepare returned instead."
        )
    if isinstance(sampler, EpochSampler):
        epoch_sampler = sampler
    elif isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise UnsupportedDataLoaderError(
                "resumekit_accelerate: RandomSampler with replacement=True or num_samples is not supported; "
                "use shuffle=True (a permutation per epoch)."
            )
        own_seed = int(sampler.initial_seed) if isinstance(sampler, SeedableRandomSampler) else seed
        epoch_sampler = EpochSampler(dataset, own_seed, True)
    elif isinstance(sampler, SequentialSampler):
        epoch_sampler = EpochSampler(dataset, seed, False)
    else:
        raise UnsupportedDataLoaderError(
            f"resumekit_accelerate: the dataloader's sampler is a {type(sampler).__name__}; exact positions "
            "are supported for shuffle=True (RandomSampler) and shuffle=False (SequentialSampler). Pass "
            "exact_dataloaders=False to restart such dataloaders at their epoch's beginning instead."
        )
    if int(dataloader.iteration) > 0 or dataloader in getattr(
        dataloader.gradient_state, "dataloader_references", []
    ):
        raise UnsupportedDataLoaderError(
            "resumekit_accelerate: this dataloader was already iterated before the AcceleratorCheckpointer saw "
            "it, so its order so far cannot be reproduced. Create the AcceleratorCheckpointer right after "
            "accelerator.prepare(...), before the training loop."
        )
    generator = torch.Generator()
    epoch_sampler.loader_generator = generator
    epoch_sampler.process_index = process_index
    inner.sampler = epoch_sampler
    outer = dataloader.batch_sampler
    if outer is not inner and hasattr(outer, "sampler"):
        outer.sampler = epoch_sampler  # Accelerate's set_sampler also sets it there; get_sampler reads it
    # The iterator's base seed now comes from a per-epoch generator, not the global torch stream.
    dataloader.base_dataloader.generator = generator
    position = DataLoaderPosition(
        dataloader, epoch_sampler, int(inner.batch_size), int(dataloader.total_batch_size), num_processes
    )
    setattr(dataloader, _ATTR, position)
    log.info(
        "resumekit_accelerate: dataloader over %s now draws its order from EpochSampler(seed=%d, shuffle=%s)",
        type(dataset).__name__,
        epoch_sampler.seed,
        epoch_sampler.shuffle,
    )
    return position
