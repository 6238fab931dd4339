"""User-facing messages that several modules raise or report, spelled once.

Each function returns the sentence that says what failed and where; callers append the likely cause
and the fix that fit their context (a restore falls back, the command line points at ``verify``).
"""

from __future__ import annotations

__all__ = [
    "CORRUPTED_AFTER_WRITE",
    "crc_mismatch",
    "missing_file",
    "not_listed",
    "not_committed",
    "step_mismatch",
    "verify_hint",
    "wrong_size",
]

#: The likely cause of a file whose checksum does not match its manifest.
CORRUPTED_AFTER_WRITE = "the file was corrupted after it was written (disk, transfer or a manual edit)."


def missing_file(where: str) -> str:
    """A file the manifest lists is not on storage."""
    return f"{where} is missing; the manifest lists it"


def not_listed(where: str, relpath: str) -> str:
    """A file a step needs is not in its manifest (a forged or damaged manifest)."""
    return f"{where}: manifest does not list '{relpath}'"


def wrong_size(where: str, actual: int, expected: int) -> str:
    """A file's size differs from the manifest's record."""
    return f"{where} is {actual} bytes, the manifest says {expected}"


def crc_mismatch(where: str, actual: str, expected: str) -> str:
    """A file's crc32c differs from the manifest's record."""
    return f"{where}: crc32c {actual} does not match the manifest's {expected}"


def step_mismatch(where: str, recorded: int) -> str:
    """A manifest records another step than the folder it lies in."""
    return f"{where}: manifest says step {recorded}; the folder was renamed or copied"


def not_committed(step: int, url: str, committed: list[int]) -> str:
    """A requested step has no manifest."""
    return f"step {step} is not a committed checkpoint in '{url}'; committed steps: {committed}"


def verify_hint(url: str) -> str:
    """The command that lists every damaged file of a root."""
    return f"run `resumekit verify {url}` to list every damaged file."
