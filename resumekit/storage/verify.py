"""The one check of a checkpoint file against its manifest record (present, its size, its crc32c),
and of a manifest against the step folder it lies in.

Restore and the command line both call these, so a file is judged the same way wherever it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from resumekit._messages import CORRUPTED_AFTER_WRITE, crc_mismatch, missing_file, step_mismatch, wrong_size
from resumekit.errors import CheckpointCorruptError
from resumekit.format.manifest import FileRecord, Manifest

__all__ = ["FileProblem", "crc_hex", "file_problem", "step_manifest", "verify_file"]


def crc_hex(crc: int) -> str:
    """A crc32c as the manifest spells it (eight lowercase hex digits)."""
    return f"{crc & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class FileProblem:
    """Why a file does not match its record: ``kind`` is ``missing``, ``size`` or ``crc32c``."""

    kind: str
    message: str


def file_problem(where: str, rec: FileRecord, size: int | None, crc: int | None = None) -> FileProblem | None:
    """What is wrong with a file of ``size`` bytes (None: missing) and checksum ``crc`` (None: not
    computed yet, only the size is judged); None when it matches ``rec``."""
    if size is None:
        return FileProblem("missing", missing_file(where))
    if size != rec.size:
        return FileProblem("size", wrong_size(where, size, rec.size))
    if crc is not None and crc_hex(crc) != rec.crc32c:
        return FileProblem("crc32c", crc_mismatch(where, crc_hex(crc), rec.crc32c))
    return None


def verify_file(
    where: str, rec: FileRecord, size: int | None, crc: int | None = None, *, fix: str = CORRUPTED_AFTER_WRITE
) -> None:
    """Raise when the file does not match ``rec`` (see :func:`file_problem`).

    Raises:
        CheckpointCorruptError: naming the file, what differs, and ``fix`` (the likely cause or the
            command to run).
    """
    problem = file_problem(where, rec, size, crc)
    if problem is not None:
        raise CheckpointCorruptError(f"{problem.message}; {fix}")


def step_manifest(raw: bytes, step: int, where: str) -> Manifest:
    """The manifest read from step ``step``'s folder, validated, and recording that same step.

    Raises:
        CheckpointCorruptError: it records another step (the folder was renamed or copied), or it
            does not validate (as :meth:`Manifest.from_json`, which may also raise
            UnsafeCheckpointError or UnsupportedFormatError).
    """
    m = Manifest.from_json(raw, where)
    if m.step != step:
        raise CheckpointCorruptError(step_mismatch(where, m.step))
    return m
