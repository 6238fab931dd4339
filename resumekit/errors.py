"""The exceptions resumekit raises.

Every error derives from :class:`ResumeKitError`; each leaf also derives from the built-in exception a
caller would naturally catch (``FileNotFoundError``, ``ValueError``, ...), so existing ``except`` clauses
keep working. Messages name what failed, where, the likely cause and the fix.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "CommitConflictError",
    "DriftError",
    "ResumeKitError",
    "StagingError",
    "StateMismatchError",
    "StepExistsError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
]


class ResumeKitError(Exception):
    """Root of every error resumekit raises."""


class CheckpointNotFoundError(ResumeKitError, FileNotFoundError):
    """A requested checkpoint (or checkpoint root) does not exist."""


class CheckpointCorruptError(ResumeKitError, ValueError):
    """A checkpoint's files do not match its manifest (size, checksum, or structure)."""


class UnsafeCheckpointError(ResumeKitError, ValueError):
    """A checkpoint asks for something resumekit refuses to do: a path outside its folder, pickle
    data, or absurd sizes. Nothing outside the step folder has been touched when this is raised."""


class UnsupportedFormatError(ResumeKitError, ValueError):
    """A checkpoint was written in a newer on-storage format than this resumekit can read."""


class StepExistsError(ResumeKitError, FileExistsError):
    """A save targeted a step that is already committed; checkpoints are never overwritten."""


class CommitConflictError(ResumeKitError, FileExistsError):
    """Another writer committed the same step first (two writers on one prefix)."""


class StorageError(ResumeKitError, OSError):
    """An I/O operation failed; ``errno`` and the original exception (``__cause__``) are kept."""


class UnsupportedValueError(ResumeKitError, TypeError):
    """A ``state_dict()`` holds a value resumekit cannot store without pickle."""


class DriftError(ResumeKitError, ValueError):
    """The environment or config changed in a way the drift policy treats as an error."""


class StateMismatchError(ResumeKitError, ValueError):
    """Saved state does not fit the object it is restored into (missing entry, shape mismatch...)."""


class StagingError(ResumeKitError, RuntimeError):
    """A ``save_async`` could not prove its staged copy holds the values of the call (a tensor was
    written in place before its copy, by code resumekit cannot intercept); the save is not committed."""
