"""A storage wrapper that SIGKILLs a rank at a chosen point of a save (fault injection).

Passed as ``Checkpointer(url, storage=KillingStorage(open_storage(url)))`` on every rank; it delegates
everything to the wrapped backend. Unarmed, it records the files this rank writes (path and size), so
a test learns from one clean save where the next one's kill points lie. Armed (:meth:`arm`), it kills
this process with a real ``SIGKILL`` at one of :data:`KILL_POINTS`:

- ``stage``: when the save opens its stage, after capture and agreement, before any file is written;
- ``mid-file``: once ``nbytes`` bytes of the data file ``path`` have been written;
- ``durable``: once ``nfiles`` data files are durable (their ``open_write`` exited without error);
- ``commit``: rank 0, after every rank's outcome was gathered, before the manifest is written;
- ``manifest``: rank 0, once half the manifest's bytes are written into the staging folder;
- ``rename``: rank 0, with the manifest durable in the staging folder, before the rename that publishes it;
- ``peer``: rank 0, after the gather, kills another rank (process ``pid``, waiting in the collective
  that follows the commit) and commits once it is dead.

``manifest`` and ``rename`` reach inside the local backend's commit through the OS calls it makes (``open`` and
``os.rename``), patched only while that commit runs.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import IO, Any

from resumekit.format.layout import MANIFEST

KILL_POINTS = ("stage", "mid-file", "durable", "commit", "manifest", "rename", "peer")


def die() -> None:
    """End this process as a power cut or the OOM killer would: no handler, no clean-up runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_and_wait(pid: int) -> None:
    """SIGKILL process ``pid`` (not a child of this one) and return once it is dead."""
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # dead, not yet reaped
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} outlived its SIGKILL")


class _DyingFile:
    """A file that dies once ``limit`` bytes went through it (the bytes before the limit are kept)."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f, self._limit, self._done = f, limit, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._done + len(view) >= self._limit:
            self._f.write(view[: self._limit - self._done])
            self._f.flush()
            die()
        self._done += len(view)
        return self._f.write(view)

    def __enter__(self) -> _DyingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _KillingStage:
    def __init__(self, inner: Any, owner: KillingStorage) -> None:
        self._inner, self._owner = inner, owner
        self.data_prefix = inner.data_prefix
        self.parallel_files = getattr(inner, "parallel_files", 1)

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[Any]:
        o = self._owner
        with self._inner.open_write(relpath) as f:
            name = relpath[len(self.data_prefix) :]
            dying = o.point == "mid-file" and name == o.path
            counted = _CountingFile(_DyingFile(f, o.nbytes) if dying else f)
            yield counted
        o.written[name] = counted.size  # durable: the wrapped open_write exited without error
        if o.point == "durable" and len(o.written) == o.nfiles:
            die()

    def commit(self, manifest: bytes) -> None:
        point = self._owner.point
        if point == "commit":
            die()
        if point == "peer":
            kill_and_wait(self._owner.pid)
        real_open, real_rename = builtins.open, os.rename

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(file, mode, *args, **kwargs)
            if point == "manifest" and "w" in mode and os.path.basename(str(file)) == MANIFEST:
                return _DyingFile(f, max(1, len(manifest) // 2))
            return f

        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if point == "rename":
                die()
            real_rename(src, dst, *args, **kwargs)

        builtins.open, os.rename = open_, rename  # type: ignore[assignment]
        try:
            self._inner.commit(manifest)
        finally:
            builtins.open, os.rename = real_open, real_rename

    def abort(self) -> None:
        self._inner.abort()


class _CountingFile:
    def __init__(self, f: Any) -> None:
        self._f, self.size = f, 0

    def write(self, data: Any) -> int:
        n: int = self._f.write(data)
        self.size += memoryview(data).nbytes
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class KillingStorage:
    """Delegates to ``inner``; records the files each save writes; dies where :meth:`arm` says."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.point: str | None = None
        self.path, self.nbytes, self.nfiles, self.pid = "", 0, 0, 0
        #: The data files of the latest save (path relative to the data prefix -> bytes), once durable.
        self.written: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def arm(self, point: str, *, path: str = "", nbytes: int = 0, nfiles: int = 0, pid: int = 0) -> None:
        """Die (or kill ``pid``) at ``point`` of the next save (see the module docstring)."""
        if point not in KILL_POINTS:
            raise ValueError(f"unknown kill point {point!r}; expected one of {KILL_POINTS}")
        self.point, self.path, self.nbytes, self.nfiles, self.pid = point, path, nbytes, nfiles, pid

    def stage(self, step: int, writer_id: str) -> _KillingStage:
        """Start writing ``step`` through the wrapped backend (dies first when armed for ``stage``)."""
        if self.point == "stage":
            die()
        self.written = {}
        return _KillingStage(self._inner.stage(step, writer_id), self)
