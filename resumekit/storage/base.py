"""The storage interface: what a backend must offer, and the optional capabilities it may declare.

Every backend follows one rule: write the data files, make them durable, then make the manifest visible
in a single atomic step (:meth:`Stage.commit`). The engine and the command line see storage only
through these Protocols; ``resumekit.storage.local`` and ``resumekit.storage.remote`` implement them,
and a user's own backend (``Checkpointer(storage=...)``) needs only :class:`Storage`.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import torch

from resumekit.format.tensorfile import RangeReader

if TYPE_CHECKING:
    from resumekit.storage.transfer import Download

__all__ = [
    "Browsable",
    "Buffer",
    "FetchesFiles",
    "PositionalReads",
    "Stage",
    "Storage",
    "fetcher",
    "files_at_once",
    "new_buffer",
    "positional",
]

#: The bytes of one checkpoint file in memory: a writable, uninitialised uint8 NumPy array (typed
#: loosely: NumPy's stubs do not declare the buffer protocol that crc32c and torch.frombuffer use).
Buffer = Any


def new_buffer(size: int) -> Buffer:
    """Uninitialised host memory for ``size`` bytes.

    Not ``bytearray(size)``: CPython zero-fills it, touching every page once before the read touches it
    again, which doubled restore time in benchmarks/results/save_restore.md.
    """
    return torch.empty(size, dtype=torch.uint8).numpy()


class Stage(Protocol):
    """A checkpoint being written: data files first, then :meth:`commit`."""

    data_prefix: str
    #: How many data files a save writes at once (``open_write`` is called from that many threads).
    parallel_files: int

    def open_write(self, relpath: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Open a data file for writing; it is durable when the context exits without error."""
        ...

    def commit(self, manifest: bytes) -> None:
        """Make the checkpoint visible, atomically. Raises StepExistsError/CommitConflictError."""
        ...

    def abort(self) -> None:
        """Remove what this stage wrote; never raises."""
        ...


class Storage(Protocol):
    """One checkpoint root (a folder or an object-store prefix): what every backend offers.

    A backend may also offer the optional capabilities below (:class:`PositionalReads`,
    :class:`FetchesFiles`); restore asks for them through :func:`positional` and :func:`fetcher`.
    """

    url: str

    def step_candidates(self) -> list[int]:
        """Steps that have a folder, newest last; their manifests are not checked yet."""
        ...

    def read_manifest(self, step: int) -> bytes | None:
        """The manifest of ``step``, or None when it does not exist (not committed)."""
        ...

    def read_file(self, step: int, relpath: str, size: int) -> Buffer:
        """The whole content of a checkpoint file, which must be ``size`` bytes long."""
        ...

    def stage(self, step: int, writer_id: str) -> Stage:
        """Start writing ``step`` (all ranks of one save share the writer id)."""
        ...

    def delete_step(self, step: int) -> None:
        """Delete a committed step: its manifest first, then its data."""
        ...

    def cleanup(self, grace_seconds: float) -> list[str]:
        """Remove debris (unfinished stages, half-deleted steps) older than the grace period."""
        ...


class Browsable(Storage, Protocol):
    """The storage interface plus what read-only tools (the command line) need of it."""

    def open_read(self, step: int, relpath: str) -> IO[bytes]:
        """A step's file opened for streaming and ranged reads; FileNotFoundError when missing."""
        ...

    def root_kind(self) -> str:
        """``"folder"``, ``"file"`` or ``"missing"``."""
        ...

    def unfinished(self) -> list[tuple[int, str]]:
        """Temporary folders of saves that never committed: (step, folder name)."""
        ...


class PositionalReads(Protocol):
    """Capability: positional reads of a file, several in flight (local disk).

    Restore then reads a tensor file's header alone before its data, and its data straight into live
    tensors.
    """

    def open_reader(
        self, step: int, relpath: str, size: int
    ) -> contextlib.AbstractContextManager[RangeReader]:
        """Open a step's file of ``size`` bytes for :class:`~resumekit.format.tensorfile.RangeReader` reads."""
        ...


class FetchesFiles(Protocol):
    """Capability: fetch several whole files at once under one budget of requests (object stores)."""

    def fetch_files(self, step: int, files: list[tuple[str, int]]) -> list[Future[Download]]:
        """Futures of the files ``[(relpath, size)]``, each with the crc32c computed as it arrived."""
        ...


# Capabilities are found by the method's presence, not by isinstance on a runtime-checkable Protocol:
# that check uses inspect.getattr_static from Python 3.12 on, which misses what a wrapping storage
# (fault injection, instrumentation) forwards through __getattr__.


def positional(storage: Storage) -> PositionalReads | None:
    """``storage`` as :class:`PositionalReads` when it offers ``open_reader``, else None."""
    return cast(PositionalReads, storage) if callable(getattr(storage, "open_reader", None)) else None


def fetcher(storage: Storage) -> FetchesFiles | None:
    """``storage`` as :class:`FetchesFiles` when it offers ``fetch_files``, else None."""
    return cast(FetchesFiles, storage) if callable(getattr(storage, "fetch_files", None)) else None


def files_at_once(stage: Stage) -> int:
    """How many data files ``stage`` takes from as many threads (1 for a stage that does not say)."""
    return max(1, int(getattr(stage, "parallel_files", 1)))
