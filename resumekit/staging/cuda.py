"""The CUDA side of staging and restore: side-stream device-to-host copies ordered with events, and
reads from storage into device tensors through reused pinned buffers.

Every function is a no-op (or a plain copy) for CPU tensors, so callers need no device branches.
Ordering rules (why each event exists):

- ``ready`` is recorded on the producing stream at the ``save_async`` call: the side stream waits on it,
  so a copy sees every kernel enqueued before the call and none after.
- ``done`` is recorded on the side stream after a copy: a stream that is about to write the tensor waits
  on it (:func:`stream_waits`, GPU-side, the host does not block); the writer thread synchronises on it
  before it reads the pinned buffer.
- ``record_stream`` keeps the caching allocator from handing the source's memory to another stream while
  the side stream still reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["copy_async", "read_into_device", "record_ready", "stream_waits"]

_side_streams: dict[int, Any] = {}
_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = torch.cuda.Stream(device=index)
            _side_streams[index] = stream
        return stream


def record_ready(t: torch.Tensor) -> Any:
    """An event on ``t``'s current stream marking "every write to ``t`` so far" (None on CPU)."""
    if t.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


def copy_async(src: torch.Tensor, dst: torch.Tensor, ready: Any) -> Any:
    """Enqueue ``dst.copy_(src)`` (device to pinned host) on a side stream after ``ready``; return its
    completion event. The host does not wait."""
    stream = _side_stream(src.device)
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        dst.copy_(src, non_blocking=True)
        src.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
    return done


def stream_waits(done: Any, t: torch.Tensor) -> None:
    """Make the current stream of ``t``'s device wait for ``done`` before its next kernel."""
    torch.cuda.current_stream(t.device).wait_event(done)


class PinnedChunks:
    """Two reusable pinned host buffers for storage-to-device reads (double buffering)."""

    def __init__(self, chunk_bytes: int = 64 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self._bufs: list[torch.Tensor] = []

    def get(self) -> list[torch.Tensor]:
        """The two buffers (allocated on first use)."""
        if not self._bufs:
            self._bufs = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        return self._bufs


def read_into_device(
    read_at: Callable[[memoryview, int], None],
    offset: int,
    dest: torch.Tensor,
    chunks: PinnedChunks,
    on_bytes: Callable[[memoryview], None] | None = None,
) -> None:
    """Read ``dest``'s bytes from a file (``read_at(buf, file_offset)``) straight into device memory.

    The file is read chunk by chunk into one pinned buffer while the previous chunk is copied to the
    device from the other, on a side stream; no host copy of the whole tensor is made. ``on_bytes``
    sees each chunk in file order (the caller's checksum). ``dest`` must be contiguous; on return the
    current stream is ordered after the last copy.
    """
    if not dest.is_contiguous():
        raise ValueError("read_into_device needs a contiguous destination tensor")
    flat = dest.detach().view(-1).view(torch.uint8) if dest.numel() else dest.detach().view(torch.uint8)
    total = flat.numel()
    if dest.device.type != "cuda":
        arr: Any = flat.numpy()
        mv = memoryview(arr)
        read_at(mv, offset)
        if on_bytes is not None:
            on_bytes(mv)
        return
    stream = _side_stream(dest.device)
    bufs = chunks.get()
    pending: list[Any] = [None, None]  # the copy still reading each pinned buffer
    stream.wait_stream(torch.cuda.current_stream(dest.device))  # dest is not in use by earlier kernels
    for i, start in enumerate(range(0, total, chunks.chunk_bytes)):
        n = min(chunks.chunk_bytes, total - start)
        slot = i % 2
        if pending[slot] is not None:
            pending[slot].synchronize()  # the copy that last read this buffer is done
        host = bufs[slot][:n]
        host_arr: Any = host.numpy()
        mv = memoryview(host_arr)
        read_at(mv, offset + start)
        if on_bytes is not None:
            on_bytes(mv)
        with torch.cuda.stream(stream):
            flat[start : start + n].copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        pending[slot] = event
    torch.cuda.current_stream(dest.device).wait_stream(stream)
    for event in pending:
        if event is not None:
            event.synchronize()  # the pinned buffers may be reused by the next call
