"""Overlapped staging: copy a save's tensors to host buffers *after* ``save_async`` returns.

The call captures every non-tensor value and every small or unguardable tensor at once, and registers
the large parameters and optimizer moments as *pending*: a background thread copies them while the next
forward and backward run (which read them but never write them). The first write to a pending tensor
waits for that tensor's copy (see :mod:`resumekit.staging.guards`); a write nothing could intercept is caught by
the tensor's version counter, and the save then fails loudly instead of committing the new value.

Invariant: a tensor's bytes reach the checkpoint only from a copy (or, with a budget, a direct stream of
the live tensor) that started and ended with the version counter it had at the call, while no guarded
writer could run. So a committed checkpoint holds exactly the values of the call.

Memory: without a budget every pending tensor gets its own host buffer, reused by the next save (the
fastest; extra host memory = the state's size). With ``budget`` bytes, buffers come from a pool of at
most that size, freed as the writer finishes each tensor; a tensor that finds no room is streamed by the
writer straight from live memory, and a write to it waits until the writer has passed it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from resumekit.errors import StagingError
from resumekit.staging import cuda as _cuda

__all__ = ["OverlapStager", "StagingBuffers", "INLINE_BYTES"]

#: Tensors smaller than this are copied at the call: their copy costs less than tracking them.
INLINE_BYTES = 1 << 20

_PENDING, _COPYING, _STAGED, _STREAMING, _WRITTEN, _ABANDONED = range(6)


@dataclass(eq=False)
class Record:
    """One pending tensor of one save."""

    entry: str
    name: str
    src: torch.Tensor
    version: int
    nbytes: int
    ready: Any = None  # CUDA: an event on the producing stream, recorded at the call
    state: int = _PENDING
    buf: torch.Tensor | None = None
    pooled: bool = False  # buf came from the budget pool and is returned after the write
    done_event: Any = None  # CUDA: the side-stream copy's completion
    sealed: bool = False  # later writes are ordered after the copy (CUDA)
    done: threading.Event = field(default_factory=threading.Event)

    def where(self) -> str:
        return f"'{self.entry}' tensor '{self.name}'"


class StagingBuffers:
    """Host buffers reused across saves: one per (entry, tensor) without a budget, else a bounded pool."""

    def __init__(self) -> None:
        self._own: dict[tuple[str, str], torch.Tensor] = {}
        self._free: list[torch.Tensor] = []  # flat uint8 buffers of the budget pool
        self.pool_bytes = 0
        self.peak_bytes = 0

    def own(self, entry: str, name: str, like: torch.Tensor) -> torch.Tensor:
        """The reusable buffer for ``entry``/``name`` (allocated, pinned for CUDA, on first use)."""
        key = (entry, name)
        pin = like.device.type == "cuda"
        buf = self._own.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or (pin and not buf.is_pinned()):
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._own[key] = buf
        return buf

    def take(self, nbytes: int, budget: int, pin: bool) -> torch.Tensor | None:
        """A flat uint8 buffer of at least ``nbytes`` from the pool, or None when it has no room."""
        fits = [b for b in self._free if b.numel() >= nbytes and (b.is_pinned() or not pin)]
        if fits:
            buf = min(fits, key=lambda b: b.numel())
            self._free.remove(buf)
            return buf
        while self._free and self.pool_bytes + nbytes > budget:
            self.pool_bytes -= self._free.pop(
                self._free.index(max(self._free, key=lambda b: b.numel()))
            ).numel()
        if self.pool_bytes + nbytes > budget:
            return None
        self.pool_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.pool_bytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def give_back(self, buf: torch.Tensor) -> None:
        """Return a pool buffer for reuse."""
        self._free.append(buf)

    def clear(self) -> None:
        """Release every buffer."""
        self._own.clear()
        self._free.clear()
        self.pool_bytes = 0


def _view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n = like.numel() * like.element_size()
    return flat[:n].view(like.dtype).view(like.shape) if n else torch.empty(like.shape, dtype=like.dtype)


class OverlapStager:
    """The pending tensors of one save, the thread that copies them, and the writer's access to them.

    Args:
        buffers: the checkpointer's reusable buffers.
        budget: at most this many bytes of pool buffers (None: one buffer per tensor, the fastest).
        copy_all: copy every tensor at the call (``staging="copy"``): nothing is pending, no guard runs.
    """

    def __init__(self, buffers: StagingBuffers, budget: int | None, copy_all: bool = False) -> None:
        self._buffers = buffers
        self._copy_all_now = copy_all
        self._budget = budget
        self._cond = threading.Condition()
        self._records: list[Record] = []
        self._by_key: dict[tuple[str, str], Record] = {}
        self._by_storage: dict[tuple[str, int], list[Record]] = {}
        self._guarded_storages: set[tuple[str, int]] = set()
        self._error: StagingError | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._settled = False
        self.inline_bytes = 0

    # -- at the call (training thread) ----------------------------------------------------------------

    def add(self, entry: str, obj: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Register an entry's tensors: guardable large ones become pending, the rest are copied now.

        Guardable: the parameters of a Module entry and the state tensors of an Optimizer entry, which
        training writes only through the optimizer step or an explicit in-place op (both intercepted).
        Buffers (BatchNorm statistics change inside forward), gradients (backward accumulates in C++)
        and tensors of other objects are copied at the call.
        """
        guardable = _guardable_storages(obj)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            t = t.detach()
            nbytes = t.numel() * t.element_size()
            key = _storage_key(t)
            version = _version(t)
            if (
                self._copy_all_now
                or nbytes < INLINE_BYTES
                or key is None
                or key not in guardable
                or version is None
            ):
                buf = self._buffers.own(entry, name, t)
                buf.copy_(t)  # synchronous (CUDA included): this tensor is final now
                self.inline_bytes += nbytes
                out[name] = buf
                continue
            rec = Record(entry, name, t, version, nbytes, ready=_cuda.record_ready(t))
            self._records.append(rec)
            self._by_key[(entry, name)] = rec
            self._by_storage.setdefault(key, []).append(rec)
            out[name] = t  # the writer asks for the staged copy through source()
        return out

    def forget(self, entry: str, names: Iterable[str]) -> None:
        """Drop ``entry``'s registered tensors ``names`` (this save does not write them); before
        :meth:`start` only."""
        gone = [self._by_key.pop((entry, n)) for n in names if (entry, n) in self._by_key]
        if not gone:
            return
        ids = {id(r) for r in gone}
        self._records = [r for r in self._records if id(r) not in ids]
        for key in list(self._by_storage):
            kept = [r for r in self._by_storage[key] if id(r) not in ids]
            if kept:
                self._by_storage[key] = kept
            else:
                del self._by_storage[key]

    @property
    def pending(self) -> bool:
        """True while some tensor is still neither copied nor written."""
        if self._settled:
            return False
        # A CUDA copy that is enqueued but not yet ordered before later writes is still pending.
        busy = any(
            r.state in (_PENDING, _COPYING, _STREAMING) or (r.done_event is not None and not r.sealed)
            for r in self._records
            if r.state != _ABANDONED
        )
        self._settled = not busy  # records only move forward: once settled, always settled
        return busy

    def storages(self) -> frozenset[tuple[str, int]]:
        """The storages with pending tensors (what the guards watch)."""
        return frozenset(self._by_storage)

    def start(self) -> None:
        """Run the background copies, on the writer thread before it writes (no budget: the writer
        needs every copy anyway), or beside it on a thread of their own (a budget: the writer frees
        the room they need)."""
        if not self._records:
            return
        if self._budget is None:
            self._copy_all()
        else:
            self._thread = threading.Thread(target=self._copy_all, name="resumekit-stage", daemon=True)
            self._thread.start()

    # -- guards (training thread, before a write) -------------------------------------------------------

    def before_write(self, tensors: Any) -> None:
        """Called before ``tensors`` (a tensor or a sequence) are written in place: wait for their copies."""
        for t in tensors if isinstance(tensors, (list, tuple)) else (tensors,):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            for rec in self._by_storage.get(key, ()) if key is not None else ():
                self.ensure(rec)

    def before_write_all(self) -> None:
        """Wait for every pending tensor (an optimizer step writes them all)."""
        for rec in self._records:
            self.ensure(rec)

    def ensure(self, rec: Record) -> None:
        """Return once ``rec``'s value of the call is safe from a write that follows."""
        with self._cond:
            if rec.state == _PENDING and self._error is None and not self._closed:
                buf = self._buffer_for(rec)
                if buf is not None:
                    rec.state = _COPYING
            else:
                buf = None
        if buf is not None:
            self._copy(rec, buf)
        rec.done.wait()
        if rec.done_event is not None and not rec.sealed:
            # CUDA: order this thread's stream after the copy, without waiting on the host.
            if _version(rec.src) != rec.version:
                self._fail(rec, "changed before its copy was enqueued")
            _cuda.stream_waits(rec.done_event, rec.src)
            rec.sealed = True

    # -- background copies ------------------------------------------------------------------------------

    def _copy_all(self) -> None:
        for rec in self._records:
            with self._cond:
                while True:
                    if rec.state != _PENDING or self._error is not None or self._closed:
                        buf = None
                        break
                    buf = self._buffer_for(rec)
                    if buf is not None:
                        rec.state = _COPYING
                        break
                    if self._budget is not None and rec.nbytes > self._budget:
                        break  # never fits: the writer streams it
                    self._cond.wait()  # the writer frees room as it finishes tensors
            if buf is not None:
                self._copy(rec, buf)

    def _buffer_for(self, rec: Record) -> torch.Tensor | None:
        """A destination for ``rec`` (caller holds the lock), or None when the budget has no room."""
        if self._budget is None:
            return self._buffers.own(rec.entry, rec.name, rec.src)
        flat = self._buffers.take(rec.nbytes, self._budget, rec.src.device.type == "cuda")
        if flat is None:
            return None
        rec.pooled = True
        return _view(flat, rec.src)

    def _copy(self, rec: Record, buf: torch.Tensor) -> None:
        try:
            if rec.src.device.type == "cuda":
                rec.done_event = _cuda.copy_async(rec.src, buf, rec.ready)
            else:
                before = _version(rec.src)
                buf.copy_(rec.src)
                if before != rec.version or _version(rec.src) != rec.version:
                    self._fail(rec, "was written in place before its copy finished")
        except Exception as exc:  # e.g. out of pinned memory: the save fails, training goes on
            self._fail(rec, f"could not be copied ({exc})")
        with self._cond:
            rec.buf = buf
            rec.state = _STAGED
            rec.done.set()
            self._cond.notify_all()

    def _fail(self, rec: Record, what: str) -> None:
        with self._cond:
            if self._error is None:
                self._error = StagingError(
                    f"save_async: {rec.where()} {what}, by a write resumekit could not intercept (another "
                    "thread, C++ code, or a write through `.data` outside the thread that called save_async). "
                    "The checkpoint would not hold the values of the call, so it is not committed. Fix: call "
                    "ckpt.wait_staged() before such writes, or use save_async(..., staging='copy')."
                )
            self._cond.notify_all()

    # -- the writer (background save thread) ------------------------------------------------------------

    def lookup(self, entry: str) -> Mapping[str, Record]:
        """The pending records of ``entry`` by tensor name."""
        return {n: r for (e, n), r in self._by_key.items() if e == entry}

    @contextlib.contextmanager
    def source(self, entry: str, name: str, live: torch.Tensor) -> Iterator[torch.Tensor]:
        """The tensor the writer reads for ``entry``/``name``: the staged copy, or the live tensor
        itself while every write to it is held back (budget mode, no room)."""
        rec = self._by_key.get((entry, name))
        if rec is None:
            yield live  # copied at the call
            return
        with self._cond:
            if rec.state == _PENDING and self._error is None:
                buf = self._buffer_for(rec)
                rec.state = _COPYING if buf is not None else _STREAMING
            else:
                buf = None
        if buf is not None:
            self._copy(rec, buf)
        if rec.state == _STREAMING:
            try:
                yield rec.src
                if _version(rec.src) != rec.version:
                    self._fail(rec, "was written in place while it was being written to storage")
            finally:
                self._settle(rec)
            self.raise_error()
            return
        rec.done.wait()
        self.raise_error()
        if rec.done_event is not None:
            rec.done_event.synchronize()
            if not rec.sealed and _version(rec.src) != rec.version:
                self._fail(rec, "was written in place while its device-to-host copy ran")
            rec.sealed = True
            self.raise_error()
        if rec.buf is None:
            raise StagingError(f"save_async: {rec.where()} was never staged (the save was abandoned)")
        try:
            yield rec.buf
        finally:
            self._settle(rec)

    def _settle(self, rec: Record) -> None:
        with self._cond:
            if rec.pooled and rec.buf is not None:
                self._buffers.give_back(rec.buf.view(-1).view(torch.uint8) if rec.buf.numel() else rec.buf)
            rec.state = _WRITTEN
            rec.buf = None if rec.pooled else rec.buf
            rec.done.set()
            self._cond.notify_all()

    def raise_error(self) -> None:
        """Raise the staging failure, if any (the save must not commit)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """After the write (committed or failed): release every waiter and the pool buffers."""
        with self._cond:
            self._closed = True
            for rec in self._records:
                if rec.state == _PENDING:
                    rec.state = _ABANDONED
                rec.done.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for rec in self._records:
                if rec.pooled and rec.buf is not None:
                    self._buffers.give_back(rec.buf.view(-1).view(torch.uint8))
                rec.buf = None


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    local = getattr(t, "_local_tensor", None)  # a DTensor: its data is its local shard's storage
    if isinstance(local, torch.Tensor):
        t = local
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


def _guardable_storages(obj: Any) -> frozenset[tuple[str, int]]:
    keys: list[tuple[str, int] | None] = []
    if isinstance(obj, torch.nn.Module):
        keys = [_storage_key(p) for p in obj.parameters()]
    elif isinstance(obj, torch.optim.Optimizer):
        keys = [
            _storage_key(v) for s in obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ]
    return frozenset(k for k in keys if k is not None)
