"""Make a DataLoader resume bit for bit: count what the loop consumed, and remove hidden RNG consumers.

:class:`ResumableLoader` wraps a ``DataLoader`` whose sampler is a :class:`~resumekit.ResumableSampler`.
It fixes three things a plain DataLoader gets wrong on a mid-epoch resume:

1. Position. Workers and ``prefetch_factor`` pull indices from the sampler ahead of the loop. The wrapper
   advances the sampler's position only when the loop receives a batch, by the batch's sample count times
   the number of ranks (the position counts global samples).
2. The iterator's base seed. Each ``iter(DataLoader)`` draws a base seed from the *global* torch generator
   (``_BaseDataLoaderIter.__init__``). In a straight run that draw happens at the epoch's start, in a
   resumed run mid-epoch: it shifts the training loop's random stream and changes the worker seeds. The
   wrapper hands the DataLoader a private generator seeded from ``(seed, epoch)`` for that draw, so the
   global stream is never touched and the base seed is a pure function of the epoch.
3. Worker randomness. Random augmentation in ``__getitem__`` draws from the worker's global streams, whose
   state depends on which worker got which batch and how many samples it served before. The wrapper
   re-seeds torch (CPU), ``random`` and NumPy's global state before every sample from
   ``(seed, epoch, sample index)``, so a sample's augmentation is the same whatever the worker, the
   ``num_workers`` or the resume point. With ``num_workers=0`` it does the same in the main process and
   restores the training loop's streams afterwards.
"""

from __future__ import annotations

import hashlib
import random
import struct
import warnings
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, get_worker_info

from resumekit.sampler import ResumableSampler, _TaggedIndex

__all__ = ["ResumableLoader", "sample_seed"]

T = TypeVar("T")

_MASK64 = (1 << 64) - 1
# Domain tags keep the per-sample seeds and the iterator base seed independent streams.
_SAMPLE_DOMAIN = 0x5A3D_1E5E
_BASE_SEED_DOMAIN = 0xB45E_5EED


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 128-bit seed a sample's augmentation runs under, a pure function of its arguments.

    Computed as BLAKE2b (16-byte digest) of ``(seed, epoch, index)`` packed as little-endian 64-bit words
    (each taken modulo ``2**64``), so it is the same on every platform, process and Python version.

    Args:
        seed: The sampler's seed.
        epoch: The epoch.
        index: The dataset index of the sample.

    Returns:
        A non-negative int below ``2**128``; torch receives its low 64 bits.
    """
    words = struct.pack("<4Q", seed & _MASK64, epoch & _MASK64, index & _MASK64, _SAMPLE_DOMAIN)
    return int.from_bytes(hashlib.blake2b(words, digest_size=16).digest(), "little")


def _base_seed_generator(seed: int, epoch: int) -> torch.Generator:
    words = np.random.SeedSequence([seed & _MASK64, epoch & _MASK64, _BASE_SEED_DOMAIN])
    g = torch.Generator()
    g.manual_seed(int(words.generate_state(1, np.uint64)[0]))
    return g


def _seed_global_streams(seed: int) -> None:
    # torch.manual_seed would also reseed every CUDA generator; only the CPU stream is a worker's to set.
    torch.default_generator.manual_seed(seed & _MASK64)
    random.seed(seed)
    np.random.seed(np.array([(seed >> (32 * k)) & 0xFFFF_FFFF for k in range(4)], dtype=np.uint32))


class _SeededDataset(Dataset):
    """The user's dataset, fetched under a per-sample seed when the index carries ``(seed, epoch)``.

    Attribute reads and writes pass through to the user's dataset (a ``worker_init_fn`` that opens a file
    handle on ``get_worker_info().dataset`` keeps working).
    """

    def __init__(self, dataset: Any) -> None:
        object.__setattr__(self, "_rk_dataset", dataset)

    def __len__(self) -> int:
        return len(self._rk_dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[Any]) -> list[Any]:
        # DataLoader's fetcher calls this once per batch: the main-process save/restore below is paid
        # once a batch, the re-seeding once a sample.
        if get_worker_info() is not None:
            # A worker's global streams are its own: seed them and move on.
            return [self._fetch(i) for i in indices]
        # In the main process the global streams belong to the training loop: give them back untouched.
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            return [self._fetch(i) for i in indices]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

    def _fetch(self, index: Any) -> Any:
        if not isinstance(index, _TaggedIndex):
            return self._rk_dataset[index]
        _seed_global_streams(sample_seed(index.seed, index.epoch, int(index)))
        return self._rk_dataset[int(index)]

    def __getattr__(self, name: str) -> Any:
        if name == "_rk_dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._rk_dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._rk_dataset, name, value)

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return (_SeededDataset, (self._rk_dataset,))


class ResumableLoader(Generic[T]):
    """Wrap a ``DataLoader`` so a checkpoint's data position is what the training loop consumed.

    Iterate it exactly like the DataLoader. Put the sampler (not this wrapper) in the checkpointed state.

    Example:
        >>> import torch, resumekit as rk
        >>> from torch.utils.data import DataLoader
        >>> data = torch.arange(10.0)
        >>> sampler = rk.ResumableSampler(data, seed=0)
        >>> loader = rk.ResumableLoader(DataLoader(data, batch_size=4, sampler=sampler))
        >>> [len(b) for b in loader]
        [4, 4, 2]

    Args:
        loader: A DataLoader over a map-style dataset whose ``sampler=`` is a ResumableSampler (or whose
            ``batch_sampler=`` is a ``torch.utils.data.BatchSampler`` over one). It must use
            ``in_order=True`` (the default). Wrap it before iterating it.
        seed_workers: Re-seed torch (CPU), ``random`` and NumPy before every sample from
            ``(seed, epoch, index)`` so random augmentation replays exactly. Set ``False`` only if
            ``__getitem__`` draws no random numbers, or seeds itself.

    Raises:
        TypeError: The loader does not draw its indices from a ResumableSampler, or its dataset is iterable.
        ValueError: ``in_order=False``, or a persistent-workers loader was already iterated.
    """

    def __init__(self, loader: DataLoader[T], *, seed_workers: bool = True) -> None:
        if isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "ResumableLoader: the DataLoader's dataset is an IterableDataset; exact resume by position "
                "needs a map-style dataset and a ResumableSampler"
            )
        batch_sampler = loader.batch_sampler
        sampler: Any
        if batch_sampler is None:
            sampler, self._batch_size, self._drop_last = loader.sampler, None, False
        elif isinstance(batch_sampler, BatchSampler):
            sampler = batch_sampler.sampler
            self._batch_size, self._drop_last = batch_sampler.batch_size, batch_sampler.drop_last
        else:
            sampler = None
        if not isinstance(sampler, ResumableSampler):
            source = batch_sampler if sampler is None else sampler
            found = type(source).__name__
            raise TypeError(
                f"ResumableLoader: the DataLoader draws its indices from a {found}, not a "
                "ResumableSampler. Build it as DataLoader(dataset, batch_size=..., "
                "sampler=resumekit.ResumableSampler(dataset, ...)) (no shuffle=; the sampler shuffles)."
            )
        if getattr(loader, "in_order", True) is False:
            raise ValueError(
                "ResumableLoader: the DataLoader has in_order=False, so batches arrive out of sampler order "
                "and no position describes what the loop consumed; construct it with in_order=True"
            )
        existing = getattr(loader, "_iterator", None)
        if seed_workers and existing is not None and not isinstance(existing._dataset, _SeededDataset):
            raise ValueError(
                "ResumableLoader: this persistent-workers DataLoader was already iterated; its workers hold "
                "the unwrapped dataset. Wrap the DataLoader before its first iteration."
            )
        if loader.generator is not None:
            warnings.warn(
                "ResumableLoader: the DataLoader's generator= is not used for the workers' base seed; "
                "resumekit derives it from the sampler's (seed, epoch) so that a resumed run reproduces it.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._loader = loader
        self._sampler = sampler
        self._seed_workers = seed_workers
        sampler._external_count = True
        sampler._tag_indices = seed_workers

    @property
    def loader(self) -> DataLoader[T]:
        """The wrapped DataLoader."""
        return self._loader

    @property
    def sampler(self) -> ResumableSampler:
        """The ResumableSampler whose position this wrapper advances."""
        return self._sampler

    def __len__(self) -> int:
        """The DataLoader's length: batches in the current epoch (after a mid-epoch resume, those left)."""
        return len(self._loader)

    def __iter__(self) -> Iterator[T]:
        sampler = self._sampler
        iterator = self._start()
        token = sampler._token = object()
        sampler._live = True
        try:
            for batch in iterator:
                # The loop receives this batch now: only now does the position move past it.
                sampler._advance(self._samples_in_next_batch())
                yield batch
            sampler._mark_finished()
        finally:
            if sampler._token is token:
                sampler._live = False

    def _samples_in_next_batch(self) -> int:
        if self._batch_size is None:
            return 1
        if self._drop_last:
            return self._batch_size
        return min(self._batch_size, self._sampler.remaining())

    def _start(self) -> Iterator[T]:
        sampler, loader = self._sampler, self._loader
        # Decide the epoch before deriving the base seed from it (iteration may start the next epoch).
        sampler._roll_over_if_finished()
        original_dataset, original_generator = loader.dataset, loader.generator
        # The iterator reads `dataset` and `generator` only while it is created: swap them in for that
        # moment and give the user's loader back unchanged.
        if self._seed_workers:
            object.__setattr__(loader, "dataset", _SeededDataset(original_dataset))
        loader.generator = _base_seed_generator(sampler.seed, sampler.epoch)
        try:
            return iter(loader)
        finally:
            object.__setattr__(loader, "dataset", original_dataset)
            loader.generator = original_generator

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)

    def __repr__(self) -> str:
        return f"ResumableLoader({self._loader!r}, sampler={self._sampler!r})"
