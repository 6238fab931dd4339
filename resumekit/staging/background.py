"""The machinery behind ``Checkpointer.save_async``: staging modes, the write guard, one background writer.

``staging="overlap"`` (the default) returns after capturing non-tensor state and small tensors; large
parameters and optimizer moments are copied to host buffers in the background while the next forward
and backward run (:mod:`resumekit.staging.buffers`), and the first in-place write to one not yet copied waits
for it (:mod:`resumekit.staging.guards`). ``staging="copy"`` copies every tensor before returning. Both reuse
their buffers across saves; ``staging_budget`` bounds the host memory of the overlapped mode.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from resumekit.staging.buffers import OverlapStager, StagingBuffers
from resumekit.staging.guards import Guard

__all__ = ["AsyncSaves", "BackgroundSave", "STAGING_MODES"]

STAGING_MODES = ("overlap", "copy")


class BackgroundSave:
    """One save running on the checkpointer's writer thread; its result or exception is kept until collected."""

    def __init__(self, executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> None:
        # A long-lived worker: submitting costs a queue put, where starting a thread costs the call
        # a wait for the new thread to get the GIL. concurrent.futures joins its workers at
        # interpreter exit, so an in-flight save finishes (a killed process leaves it invisible).
        self._future: Future[Any] = executor.submit(fn)

    def done(self) -> bool:
        """True once the save has finished (committed or failed)."""
        return self._future.done()

    def result(self) -> Any:
        """Wait for the save; return its result or raise its exception."""
        return self._future.result()


class AsyncSaves:
    """A checkpointer's staging buffers, write guard and the save in flight (at most one)."""

    def __init__(self) -> None:
        self.buffers = StagingBuffers()
        self.guard = Guard()
        self.inflight: BackgroundSave | None = None
        self._executor: ThreadPoolExecutor | None = None

    def stager(self, staging: str, budget: int | None) -> OverlapStager:
        """A stager for one save, after checking the options."""
        if staging not in STAGING_MODES:
            raise ValueError(f"staging must be one of {STAGING_MODES}, got {staging!r}")
        if budget is not None and (type(budget) is not int or budget < 0):
            raise ValueError(f"staging_budget must be a non-negative int (bytes) or None, got {budget!r}")
        if budget is not None and staging == "copy":
            raise ValueError(
                "staging_budget bounds staging='overlap' only; staging='copy' copies everything at the call"
            )
        return OverlapStager(self.buffers, budget, copy_all=staging == "copy")

    def start(self, stager: OverlapStager, write: Callable[[], Any]) -> None:
        """Start the background copies, arm the guard, and run ``write`` on the writer thread."""

        def run() -> Any:
            try:
                stager.start()  # on this thread: the call does not pay for it
                result = write()
            finally:
                stager.close()  # releases any waiter, also when the write failed
            return result

        self.guard.arm(stager)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resumekit-save")
        self.inflight = BackgroundSave(self._executor, run)

    def wait_staged(self) -> None:
        """Return once every tensor of the save in flight has its value of the call copied."""
        self.guard.wait_all()

    def wait(self) -> Any:
        """Wait for the save in flight; return its result (None when there was none)."""
        inflight, self.inflight = self.inflight, None
        try:
            return inflight.result() if inflight is not None else None
        finally:
            self.guard.disarm()

    def clear(self) -> None:
        """Release the staging buffers and the writer thread."""
        self.buffers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
