"""What a bare ``DataLoader`` iterating a :class:`~resumekit.ResumableSampler` does behind the sampler's back.

A sampler handed to ``DataLoader(ds, sampler=...)`` without :class:`~resumekit.ResumableLoader` sees only the
indices the loader pulls, which run ahead of what the training loop received (``prefetch_factor`` batches
per worker). When the sampler starts an iteration it therefore looks up the call stack for the
``_BaseDataLoaderIter`` that is pulling from it and binds to it: the position is then computed from the
iterator's own count of batches handed to the loop (``_num_yielded``), so it is exact with or without
workers. Two things the sampler cannot fix are recorded and warned about instead: the worker processes'
random streams (seeded from a base seed drawn anew by every iterator, and dealt batches round-robin).

The base-seed draw. Every ``iter(DataLoader)`` draws its base seed from the global torch generator. The
straight run made that draw when it created the iterator, before the checkpoint; a resumed run recreates the
iterator after the restore and draws again, shifting every random number the loop draws afterwards. When a
record says its iterator was open at the save, the restored sampler gives that one draw back: it checks that
the global torch CPU state is exactly the state :class:`~resumekit.RNGState` restored, advanced by one
base-seed draw whose value is the iterator's ``_base_seed``, and only then sets the state back.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch.utils.data import BatchSampler
from torch.utils.data.dataloader import _BaseDataLoaderIter

__all__ = ["Binding", "bind", "give_back_base_seed", "inexact_message", "note_restored_cpu_state"]

_STACK_DEPTH = 12  # the sampler's generator is pulled 2-5 frames below the iterator's method

# The torch CPU generator state RNGState last applied in this process (None: none restored).
_restored_cpu_state: torch.Tensor | None = None


def note_restored_cpu_state(state: torch.Tensor) -> None:
    """Called by :meth:`RNGState.load_state_dict` with the torch CPU state it applied."""
    global _restored_cpu_state
    _restored_cpu_state = state.clone()


@dataclass
class Binding:
    """A sampler iteration driven by one DataLoader iterator; counts what that iterator gave the loop."""

    attrs: dict[str, Any]  # the iterator's __dict__: outlives the iterator, so the final count stays readable
    iterator: weakref.ref[Any]
    start_yielded: int
    batch_size: int
    drop_last: bool
    local_remaining: int  # this rank's samples left in the epoch when the iteration began
    num_workers: int
    persistent: bool
    start_position: int = 0  # the sampler's global position when the iteration began
    final_yielded: int | None = None  # the count when a persistent iterator moved to its next iteration
    _index_iter: Any = field(default=None, repr=False)

    def batches(self) -> int:
        """Batches of this iteration the training loop has received."""
        now = self.final_yielded if self.final_yielded is not None else int(self.attrs.get("_num_yielded", 0))
        return max(0, now - self.start_yielded)

    def total_batches(self) -> int:
        """Batches this iteration yields in all."""
        if self.drop_last:
            return self.local_remaining // self.batch_size
        return -(-self.local_remaining // self.batch_size)

    def local_consumed(self) -> int:
        """This rank's samples the loop has received in this iteration."""
        return min(
            self.batches() * self.batch_size, self.total_batches() * self.batch_size, self.local_remaining
        )

    def exhausted(self) -> bool:
        """The loop has received every batch this iteration gives."""
        return self.batches() >= self.total_batches()

    def iterator_open(self) -> bool:
        """The iterator whose creation drew this epoch's base seed is still usable (not ended, not dropped)."""
        if self.iterator() is None or self.final_yielded is not None:
            return False
        return self.persistent or not self.attrs.get("_shutdown", False)

    def in_iteration(self) -> bool:
        """The loop is still inside this iteration (it has not yet been told the iteration ended)."""
        if not self.iterator_open():
            return False
        # A persistent iterator is never dropped; past its last batch the iteration is taken as ended.
        return not (self.persistent and self.exhausted())


def _stack_iterator() -> Any:
    """The innermost DataLoader iterator in the call stack of the sampler's generator, else ``None``."""
    frame: FrameType | None = sys._getframe(3)  # _stack_iterator <- bind <- the sampler's generator <- caller
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, _BaseDataLoaderIter):
            return owner
        frame = frame.f_back
    return None


def bind(sampler: Any, local_remaining: int) -> tuple[Binding | None, Any]:
    """Find the DataLoader iterator driving ``sampler``'s iteration that starts now.

    Returns:
        ``(binding, iterator)``: the iterator found in the call stack (or ``None``), and a binding that reads
        the loop's consumption from it, ``None`` when that cannot be read (no DataLoader, a batch sampler
        other than ``BatchSampler``, ``in_order=False``).
    """
    it = _stack_iterator()
    if it is None:
        return None, None
    index_sampler = getattr(it, "_index_sampler", None)
    if index_sampler is sampler:
        batch_size, drop_last = 1, False
    elif isinstance(index_sampler, BatchSampler) and index_sampler.sampler is sampler:
        batch_size, drop_last = int(index_sampler.batch_size), bool(index_sampler.drop_last)
    else:
        return None, it
    if getattr(it, "_in_order", True) is False:
        return None, it
    attrs = it.__dict__
    binding = Binding(
        attrs=attrs,
        iterator=weakref.ref(it),
        start_yielded=int(attrs.get("_num_yielded", 0)),
        batch_size=batch_size,
        drop_last=drop_last,
        local_remaining=local_remaining,
        num_workers=int(getattr(it, "_num_workers", 0)),
        persistent=bool(getattr(it, "_persistent_workers", False)),
    )
    index_iter = attrs.get("_sampler_iter")
    if index_iter is not None:
        # A persistent iterator replaces _sampler_iter before it zeroes _num_yielded: the old index
        # iterator dies in that assignment, and this callback reads the count it ended with.
        def _ended(_ref: Any, b: Binding = binding) -> None:
            if b.final_yielded is None:
                b.final_yielded = int(b.attrs.get("_num_yielded", 0))

        try:
            binding._index_iter = weakref.ref(index_iter, _ended)
        except TypeError:  # not weak-referenceable: the count is read live only
            binding._index_iter = None
    return binding, it


def give_back_base_seed(iterator: Any) -> str:
    """Undo the base-seed draw of a DataLoader iterator recreated after a restore.

    Returns:
        ``"given back"`` (the global torch CPU state is back to what RNGState restored), ``"untouched"``
        (nothing drew from it: the loader has its own generator), ``"no record"`` (no RNGState was
        restored in this process) or ``"moved"`` (something else drew from it since the restore).
    """
    restored = _restored_cpu_state
    if restored is None:
        return "no record"
    now = torch.get_rng_state()
    if torch.equal(now, restored):
        return "untouched"
    g = torch.Generator()
    g.set_state(restored)
    # The exact draw _BaseDataLoaderIter.__init__ makes when the loader has no generator of its own.
    drawn = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
    if torch.equal(now, g.get_state()) and getattr(iterator, "_base_seed", None) == drawn:
        torch.set_rng_state(restored)
        return "given back"
    return "moved"


def inexact_message(workers: int, counts_prefetch: bool, *, saving: bool) -> str:
    """What a bare DataLoader leaves inexact, and the one-line fix."""
    where = (
        f"this sampler is iterated by a DataLoader with num_workers={workers} that is not wrapped in "
        "resumekit.ResumableLoader"
        if saving
        else f"this checkpoint was written by a run whose DataLoader had num_workers={workers} and was not "
        "wrapped in resumekit.ResumableLoader"
    )
    if counts_prefetch:
        wrong = (
            " and drew its indices through a batch sampler resumekit cannot read (a custom batch_sampler= or "
            "in_order=False): the saved position counts the indices the workers prefetched, not the batches "
            "the loop received, so a resume skips up to num_workers * prefetch_factor batches"
        )
    else:
        wrong = (
            ". The saved position is exact (it counts the batches the loop received), but random numbers "
            "drawn in the worker processes (augmentation in __getitem__, collate_fn) differ after a resume: "
            "workers seed themselves from a base seed every new iterator draws, and after a resume batches "
            "land on other workers"
        )
    tense = "will differ from" if saving else "differ from"
    return (
        f"{where}{wrong}. The resumed run's data or random numbers {tense} the uninterrupted run's. Fix "
        "(one line): loader = resumekit.ResumableLoader(DataLoader(...)), keeping the sampler in the state "
        "(seed_workers=False if __getitem__ draws no random numbers)."
    )
