"""Read-only access to a checkpoint root for the ``resumekit`` command line.

Everything here reads; nothing writes, deletes or cleans up. A manifest is validated by
:meth:`Manifest.from_json` before any path it names is opened, so a hostile manifest is reported and
never followed. Nothing is unpickled: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import crc32c

from resumekit._messages import missing_file, not_committed, verify_hint
from resumekit.errors import CheckpointCorruptError, CheckpointNotFoundError, ResumeKitError
from resumekit.format.layout import MANIFEST, step_dir
from resumekit.format.manifest import FileRecord, Manifest
from resumekit.format.tensorfile import MAX_HEADER_BYTES, TensorSpec, header_length, parse_head
from resumekit.storage import open_storage
from resumekit.storage.base import Browsable
from resumekit.storage.verify import step_manifest, verify_file

__all__ = [
    "CliError",
    "jsonable",
    "Root",
    "parse_storage_options",
    "split_target",
]

_CHUNK = 8 << 20
_STEP_SUFFIX = re.compile(r"^(?P<url>.+)@(?P<step>[0-9]+)$")


class CliError(ResumeKitError, ValueError):
    """A usage problem the command line reports as one line on stderr, with exit status 2."""


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into fsspec storage options.

    A value that parses as JSON (``true``, ``3``, ``{"endpoint_url": "..."}``) is used as parsed;
    anything else is kept as a string.

    Raises:
        CliError: a pair has no ``=`` or an empty key.
    """
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--storage-option {pair!r} is not KEY=VALUE (e.g. --storage-option anon=true)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def split_target(target: str) -> tuple[str, int | None]:
    """Split ``URL@STEP`` into the URL and the step; a plain ``URL`` has no step.

    A trailing ``@`` followed only by digits is always read as a step.
    """
    m = _STEP_SUFFIX.match(target)
    if m:
        return m.group("url"), int(m.group("step"))
    return target, None


def jsonable(v: Any) -> Any:
    """``v`` as strict JSON data: non-finite floats become ``"nan"``/``"inf"``, other exotic values
    their ``repr`` (a hostile manifest may hold ``NaN``, which Python's json module reads)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return repr(v)


@dataclass
class FileCheck:
    """What reading one file found: its size, crc32c and its first bytes (for a header)."""

    size: int
    crc32c: int
    head: bytes
    content: bytes | None  # the whole file, kept only for JSON files
    span_crcs: list[int] | None = None  # crc32c of each requested byte span, in the order given


class Root:
    """A checkpoint root opened for reading.

    Args:
        url: a local folder, ``file://`` or any fsspec URL.
        storage_options: passed to fsspec.
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        try:
            # Both storage classes offer the read-only methods of Browsable.
            self.storage = cast(Browsable, open_storage(url, storage_options))
        except (ValueError, ImportError) as exc:
            raise CliError(f"cannot open '{url}': {exc}") from exc
        self.url = self.storage.url.rstrip("/") or self.storage.url
        # One command, one view: each manifest is read once, so every part of a report agrees.
        self._manifests: dict[int, bytes | None] = {}

    # -- discovery ----------------------------------------------------------------------------------

    def candidates(self) -> list[int]:
        """Step folders, ascending; committed or not.

        Raises:
            CliError: the root does not exist or holds no step folders (not a checkpoint root).
        """
        kind = self.storage.root_kind()
        if kind == "missing":
            raise CliError(f"'{self.url}' does not exist; pass the folder given to Checkpointer(url)")
        if kind == "file":
            raise CliError(f"'{self.url}' is a file, not a checkpoint folder")
        try:
            steps = self.storage.step_candidates()
        except Exception as exc:  # any backend failure (credentials, network, ...) on the first I/O
            raise CliError(f"cannot list '{self.url}': {type(exc).__name__}: {exc}") from exc
        if not steps and not self.unfinished():
            raise CliError(
                f"'{self.url}' is not a checkpoint root: it has no step-NNNNNNNNNNNN folders. "
                "Pass the folder given to Checkpointer(url)."
            )
        return steps

    def unfinished(self) -> list[tuple[int, str]]:
        """Temporary folders of saves that never committed: (step, folder name)."""
        return self.storage.unfinished()

    def committed(self) -> list[int]:
        """Steps whose folder has a manifest (not validated), ascending."""
        return [s for s in self.candidates() if self.raw_manifest(s) is not None]

    def resolve(self, step: int | None) -> int:
        """``step`` if it is committed, else the newest committed step.

        Raises:
            CliError: the step is not committed, or there is no committed step.
        """
        candidates = self.candidates()
        if step is None:
            # Newest first, stopping at the first manifest: one read on a healthy root.
            for s in reversed(candidates):
                if self.raw_manifest(s) is not None:
                    return s
            raise CliError(f"'{self.url}' has no committed checkpoint (no step folder has a manifest)")
        if step not in candidates or self.raw_manifest(step) is None:
            raise CliError(not_committed(step, self.url, self.committed()))
        return step

    def where(self, step: int, relpath: str = "") -> str:
        """The URL of a step folder, or of a file inside it."""
        base = f"{self.url}/{step_dir(step)}"
        return f"{base}/{relpath}" if relpath else base

    def manifest(self, step: int) -> Manifest:
        """Read and validate the manifest of ``step``.

        Raises:
            CheckpointNotFoundError: no manifest (not committed).
            CheckpointCorruptError, UnsafeCheckpointError, UnsupportedFormatError: it does not validate.
        """
        raw = self.raw_manifest(step)
        where = self.where(step, MANIFEST)
        if raw is None:
            raise CheckpointNotFoundError(f"{where} does not exist: step {step} is not committed")
        return step_manifest(raw, step, where)

    def raw_manifest(self, step: int) -> bytes | None:
        """The manifest's bytes, unvalidated (None when absent); each is read once per command."""
        if step not in self._manifests:
            self._manifests[step] = self.storage.read_manifest(step)
        return self._manifests[step]

    # -- files ----------------------------------------------------------------------------------------
    # Paths below come from a validated manifest only: plain names inside the step folder.

    @contextlib.contextmanager
    def _open(self, step: int, relpath: str) -> Iterator[IO[bytes]]:
        try:
            with self.storage.open_read(step, relpath) as f:
                yield f
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(missing_file(self.where(step, relpath))) from exc

    def actual_size(self, step: int, relpath: str) -> int | None:
        """The file's size on storage, or None when it is missing."""
        try:
            with self._open(step, relpath) as f:
                return f.seek(0, os.SEEK_END)
        except CheckpointCorruptError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise

    def read_range(self, step: int, relpath: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file."""
        with self._open(step, relpath) as f:
            f.seek(start)
            return f.read(end - start)

    def tensor_specs(self, step: int, relpath: str, size: int) -> dict[str, TensorSpec]:
        """The tensors a safetensors file declares, from its header bytes only."""
        where = self.where(step, relpath)
        n = header_length(self.read_range(step, relpath, 0, 8), size, where)
        return parse_head(self.read_range(step, relpath, 0, 8 + n), size, where)

    def check_file(
        self, step: int, relpath: str, keep_content: bool, spans: list[tuple[int, int]] | None = None
    ) -> FileCheck:
        """Stream a file once: its size, crc32c, the bytes a safetensors header needs, (for
        ``keep_content``) the whole content, and the crc32c of each of ``spans`` (``[begin, end)``
        byte ranges, e.g. a shard's chunks). Memory stays at one chunk for tensor files."""
        crc = total = 0
        head = bytearray()
        want = 8
        parts: list[bytes] = []
        span_crcs = [0] * len(spans) if spans is not None else None
        with self._open(step, relpath) as f:
            while chunk := f.read(_CHUNK):
                if spans is not None and span_crcs is not None:
                    end, view = total + len(chunk), memoryview(chunk)  # slices without copies
                    for i, (b, e) in enumerate(spans):
                        lo, hi = max(b, total), min(e, end)
                        if lo < hi:
                            span_crcs[i] = crc32c.crc32c(view[lo - total : hi - total], span_crcs[i])
                crc = crc32c.crc32c(chunk, crc)
                total += len(chunk)
                pos = 0
                while len(head) < want and pos < len(chunk):
                    take = chunk[pos : pos + want - len(head)]
                    head += take
                    pos += len(take)
                    if want == 8 and len(head) == 8:
                        (n,) = struct.unpack("<Q", bytes(head))
                        want = 8 + min(int(n), MAX_HEADER_BYTES)
                if keep_content:
                    parts.append(chunk)
        return FileCheck(total, crc, bytes(head), b"".join(parts) if keep_content else None, span_crcs)

    def read_verified(self, step: int, relpath: str, rec: FileRecord) -> Any:
        """A whole file, checked against the manifest's size and crc32c.

        Raises:
            CheckpointCorruptError: missing, wrong size or wrong checksum.
        """
        where = self.where(step, relpath)
        # Sizes come from the manifest: check the real size before allocating a buffer of that size.
        verify_file(where, rec, self.actual_size(step, relpath), fix=verify_hint(self.url))
        buf = self.storage.read_file(step, relpath, rec.size)
        verify_file(where, rec, len(buf), crc32c.crc32c(buf), fix=verify_hint(self.url))
        return buf
