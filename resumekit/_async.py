"""Host staging buffers and the single background writer behind ``Checkpointer.save_async``.

The training loop is blocked only while tensors are copied into staging buffers on the host; a
background thread then serialises, checksums and commits. Buffers are reused across saves (pinned
when the source is on CUDA, so device-to-host copies run at full speed).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

__all__ = ["BackgroundSave", "StagingPool"]


class StagingPool:
    """Reusable host copies of tensors, keyed by entry and tensor name."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def copy(self, entry: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return host copies of ``tensors`` holding their values at the moment of the call."""
        out: dict[str, torch.Tensor] = {}
        cuda = False
        for name, t in tensors.items():
            t = t.detach()
            key = (entry, name)
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                pin = t.device.type == "cuda"
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                self._buffers[key] = buf
            buf.copy_(t, non_blocking=t.device.type == "cuda")
            cuda = cuda or t.device.type == "cuda"
            out[name] = buf
        if cuda:
            torch.cuda.synchronize()
        return out

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()


class BackgroundSave:
    """One save running on a thread; its result or exception is kept until collected."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._result: Any = None
        self._error: BaseException | None = None
        # Not a daemon: at interpreter exit the save finishes (atexit also waits), or, if the process
        # is killed, the commit protocol leaves it invisible.
        self._thread = threading.Thread(target=self._run, name="resumekit-save", daemon=False)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        """True once the save has finished (committed or failed)."""
        return not self._thread.is_alive()

    def result(self) -> Any:
        """Wait for the save; return its result or raise its exception."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
