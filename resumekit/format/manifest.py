"""The manifest: the commit point of a checkpoint, and its validation.

Pure logic. A manifest is written last and alone; a checkpoint exists if and only if its manifest
exists and verifies. Every path it names is a relative name inside the step folder, checked against a
strict pattern before any I/O, so a hostile manifest cannot point outside its step.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import crc32c

from resumekit.errors import CheckpointCorruptError, UnsafeCheckpointError, UnsupportedFormatError
from resumekit.format import layout as _layout
from resumekit.format.layout import is_plain_file_path, valid_writer_prefix
from resumekit.format.strict_json import expect_dict as _dict
from resumekit.format.strict_json import expect_list as _list
from resumekit.format.strict_json import expect_str as _str
from resumekit.format.strict_json import parse_strict

__all__ = [
    "FORMAT_VERSION",
    "SCOPE_SHARDED",
    "UNSHARDED_FORMAT_VERSION",
    "current_format",
    "Entry",
    "FileRecord",
    "Manifest",
    "entry_files",
    "validate_entry_name",
]

#: The newest on-storage format this resumekit reads (and writes for checkpoints with sharded entries).
FORMAT_VERSION = 2
#: The format written for checkpoints without sharded entries, so earlier resumekits keep reading them.
#: Format 2 adds entries of scope "sharded" (see resumekit/sharding/metadata.py).
UNSHARDED_FORMAT_VERSION = 1
#: A manifest larger than this is refused unread.
MAX_MANIFEST_BYTES = 64 << 20
#: A single file larger than this (1 PiB) is treated as hostile.
MAX_FILE_BYTES = 1 << 50
#: Steps, world sizes and ranks at or above this are refused (they are int64 everywhere else).
_MAX_INT = 1 << 63

_SELF_CRC = "manifest_crc32c"


def _canonical_crc(d: dict[str, Any]) -> str:
    body = json.dumps(d, sort_keys=True, indent=1, allow_nan=False).encode("utf-8")
    return f"{crc32c.crc32c(body) & 0xFFFFFFFF:08x}"


def seal(d: dict[str, Any]) -> bytes:
    """Serialise an (edited) manifest dict with a fresh self-checksum.

    For tools that rewrite manifests on purpose (and for tests that forge hostile ones): the checksum
    detects corruption, it is not a signature.
    """
    d = {k: v for k, v in d.items() if k != _SELF_CRC}
    d[_SELF_CRC] = _canonical_crc(d)
    return json.dumps(d, sort_keys=True, indent=1, allow_nan=False).encode("utf-8")


_ENTRY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")

SCOPE_REPLICATED = "replicated"
SCOPE_RANK = "rank"
SCOPE_SHARDED = "sharded"  # format 2: one shard file per rank plus <entry>.sharding.json


def current_format(saved: int) -> int:
    """The format this resumekit writes for a checkpoint like one saved in format ``saved``: formats 1
    (no sharded entries) and 2 (sharded entries) are both current, so neither is drift."""
    return saved if UNSHARDED_FORMAT_VERSION <= saved <= FORMAT_VERSION else FORMAT_VERSION


def entry_files(name: str, scope: str, rank: int, has_tensors: bool) -> tuple[str, str | None]:
    """The skeleton and tensor file names of one entry of ``scope``."""
    return _layout.entry_files(name, scope == SCOPE_RANK, rank, has_tensors)


def validate_entry_name(name: Any) -> str:
    """Check that an entry name is a safe file stem; return it.

    Raises:
        ValueError: (as UnsafeCheckpointError) when it is not.
    """
    if not isinstance(name, str) or not _ENTRY_RE.match(name) or ".." in name:
        raise UnsafeCheckpointError(
            f"state entry name {name!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter, digit or underscore (it becomes a file name)."
        )
    return name


@dataclass(frozen=True)
class FileRecord:
    """Size and checksum of one file of a checkpoint."""

    size: int
    crc32c: str


@dataclass(frozen=True)
class Entry:
    """One top-level entry of the saved state (``model``, ``optimizer``, ...)."""

    scope: str  # "replicated": written once by rank 0; "rank": one record per rank
    kind: str  # "state": a TrainingState; "mapping": a plain dict updated in place
    ranks: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to find, verify and interpret one checkpoint."""

    step: int
    writer_id: str
    world_size: int
    entries: dict[str, Entry]
    files: dict[str, FileRecord]
    environment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    created_unix: float = 0.0
    resumekit_version: str = ""
    format_version: int = UNSHARDED_FORMAT_VERSION
    checksum: str = "crc32c"
    data_prefix: str = ""  # object stores: a folder private to the writer ("w-<writer_id>/")

    def files_of(self, name: str) -> list[str]:
        """Every file entry ``name`` may have in this step, with the writer's folder, in order: a
        sharded entry's metadata then each rank's shard and chunk index; otherwise each rank's
        skeleton then tensors. Which of them the manifest lists is the caller's question."""
        e = self.entries[name]
        if e.scope == SCOPE_SHARDED:
            rels = _layout.sharded_entry_files(name, e.ranks)
        else:
            rels = [f for r in e.ranks for f in entry_files(name, e.scope, r, True) if f is not None]
        return [self.data_prefix + rel for rel in rels]

    def to_json(self) -> bytes:
        """Serialise; keys sorted so that identical manifests are identical bytes.

        The manifest carries the crc32c of its own canonical form (``manifest_crc32c``), so a flipped
        bit anywhere in it, not only in the file records, is detected.
        """
        d = asdict(self)
        d["entries"] = {k: {**asdict(v), "ranks": list(v.ranks)} for k, v in self.entries.items()}
        return seal(d)

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and validate a manifest.

        Raises:
            UnsupportedFormatError: written by a newer format than this resumekit reads.
            UnsafeCheckpointError: a path that is not a plain name inside the step, or absurd sizes.
            CheckpointCorruptError: anything else malformed.
        """
        if len(raw) > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{where}: manifest is {len(raw)} bytes, over {MAX_MANIFEST_BYTES}")
        # Strict parsing (UTF-8 without BOM, no duplicate keys, bounded numbers): the self-checksum
        # covers the parsed form, so only one byte form may parse to a given value's meaning.
        d = parse_strict(raw, where, "manifest")
        if not isinstance(d, dict):
            raise CheckpointCorruptError(f"{where}: manifest is not a JSON object")
        stored = d.pop(_SELF_CRC, None)
        try:
            actual = _canonical_crc(d)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CheckpointCorruptError(f"{where}: manifest cannot be re-serialised ({exc})") from exc
        if stored != actual:
            raise CheckpointCorruptError(
                f"{where}: manifest checksum {actual} does not match its recorded {stored!r}; the manifest "
                "was corrupted or edited after it was written."
            )
        version = d.get("format_version")
        if type(version) is not int or version < 1:
            raise CheckpointCorruptError(
                f"{where}: manifest has no valid format_version ({version!r}; formats are numbered from 1)"
            )
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where}: written in checkpoint format {version}; this resumekit reads up to format "
                f"{FORMAT_VERSION}. Upgrade resumekit (pip install -U resumekit) to read it."
            )
        try:
            files = {_safe_path(p, where): _file_record(r, p, where) for p, r in _dict(d["files"]).items()}
            entries = {validate_entry_name(n): _entry(e, n, where) for n, e in _dict(d["entries"]).items()}
            m = cls(
                step=_int(d["step"]),
                writer_id=_str(d["writer_id"]),
                world_size=_int(d["world_size"]),
                entries=entries,
                files=files,
                environment=_dict(d.get("environment", {})),
                config=None if d.get("config") is None else _dict(d["config"]),
                created_unix=_timestamp(d.get("created_unix", 0.0)),
                resumekit_version=_str(d.get("resumekit_version", "")),
                format_version=version,
                checksum=_str(d.get("checksum", "crc32c")),
                data_prefix=_str(d.get("data_prefix", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (UnsafeCheckpointError, CheckpointCorruptError)):
                raise
            raise CheckpointCorruptError(f"{where}: manifest field missing or malformed: {exc!r}") from exc
        if not valid_writer_prefix(m.data_prefix):
            raise UnsafeCheckpointError(f"{where}: manifest has an unsafe data_prefix {m.data_prefix!r}")
        if m.checksum != "crc32c":
            raise UnsupportedFormatError(f"{where}: unknown checksum algorithm {m.checksum!r}")
        return m


def _safe_path(p: Any, where: str) -> str:
    if not isinstance(p, str) or not is_plain_file_path(p):
        raise UnsafeCheckpointError(
            f"{where}: manifest names file {p!r}, which is not a plain file name inside the step folder "
            "(absolute paths, '..', URLs and other folders are refused). The checkpoint is hostile or "
            "corrupt; nothing was read from that path."
        )
    return p


def _file_record(r: Any, p: str, where: str) -> FileRecord:
    r = _dict(r)
    size, crc = r.get("size"), r.get("crc32c")
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
        raise UnsafeCheckpointError(f"{where}: file {p!r} has an absurd size {size!r}")
    if not isinstance(crc, str) or not re.fullmatch(r"[0-9a-f]{8}", crc):
        raise CheckpointCorruptError(f"{where}: file {p!r} has a malformed crc32c {crc!r}")
    return FileRecord(size, crc)


def _entry(e: Any, name: str, where: str) -> Entry:
    e = _dict(e)
    scope, kind = e.get("scope"), e.get("kind")
    if scope not in (SCOPE_REPLICATED, SCOPE_RANK, SCOPE_SHARDED) or kind not in ("state", "mapping"):
        raise CheckpointCorruptError(f"{where}: entry {name!r} has unknown scope/kind {scope!r}/{kind!r}")
    ranks = tuple(_int(r) for r in _list(e.get("ranks", [0])))
    return Entry(scope=scope, kind=kind, ranks=ranks)


def _int(v: Any) -> int:
    if type(v) is not int or not 0 <= v < _MAX_INT:
        raise TypeError(f"expected a non-negative 64-bit integer, got {_short(v)}")
    return v


def _timestamp(v: Any) -> float:
    # Bounded before conversion: float() of a huge int raises OverflowError, which no caller expects.
    if type(v) not in (int, float) or not -_MAX_INT < v < _MAX_INT:
        raise TypeError(f"created_unix must be a number of seconds, got {_short(v)}")
    return float(v)


def _short(v: Any) -> str:
    """``repr`` for a message, cut short (a hostile value may be huge; a long int's repr may raise)."""
    if type(v) is int and v.bit_length() > 256:
        return f"an integer of {v.bit_length()} bits"
    return repr(v)[:80]
