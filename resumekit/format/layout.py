"""Every name resumekit gives to something on storage, built and parsed in one place.

```
<root>/step-000000001200/            a committed step (zero-padded, so names sort like numbers)
    manifest.json                    the commit point
    <entry>.json, <entry>.safetensors           a replicated entry's skeleton and tensors
    rank-00003/<entry>.json, ...                a per-rank entry
    w-<writer id>/...                           object stores: the files of one writer
<root>/.tmp-step-000000001200-<writer id>/      local disk: a save not yet committed
```

A sharded entry (format 2) has ``<entry>.sharding.json`` (its metadata) and, per rank,
``rank-00003/<entry>.shard.safetensors`` (that rank's chunks) beside ``rank-00003/<entry>.chunks.json``
(their byte ranges and checksums). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MANIFEST",
    "TMP_PREFIX",
    "entry_files",
    "file_kind",
    "meta_entry",
    "index_file",
    "meta_file",
    "shard_file",
    "sharded_entry_files",
    "is_plain_file_path",
    "is_tensor_file",
    "parse_step_dir",
    "parse_tmp_dir",
    "rank_prefix",
    "skeleton_of",
    "step_dir",
    "tmp_dir",
    "valid_writer_prefix",
    "writer_prefix",
]

#: The commit point of a step, written last.
MANIFEST = "manifest.json"
#: Local disk: the prefix of a save's folder before it is renamed into place.
TMP_PREFIX = ".tmp-"
SKELETON_SUFFIX = ".json"
TENSOR_SUFFIX = ".safetensors"
_SHARD_SUFFIX = ".shard" + TENSOR_SUFFIX
_META_SUFFIX = ".sharding" + SKELETON_SUFFIX
_INDEX_SUFFIX = ".chunks" + SKELETON_SUFFIX

_STEP_RE = re.compile(r"^step-([0-9]{12,20})$")
_WRITER_PREFIX_RE = re.compile(r"^w-[0-9a-f]{16}/$")
# A file a manifest may list: an optional writer folder, an optional rank folder, one plain name.
_FILE_RE = re.compile(
    r"^(w-[0-9a-f]{16}/)?(rank-[0-9]{5}/)?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\.(json|safetensors)$"
)


def step_dir(step: int) -> str:
    """Folder name of a step: zero-padded so that names sort like numbers."""
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step a folder name denotes, or None for anything else (temporary folders, debris)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dir(step: int, writer_id: str) -> str:
    """Local disk: the folder a save of ``step`` by ``writer_id`` is written into before its rename."""
    return f"{TMP_PREFIX}{step_dir(step)}-{writer_id}"


def parse_tmp_dir(name: str) -> int | None:
    """The step of a temporary save folder's name, or None when ``name`` is not one."""
    if not name.startswith(TMP_PREFIX):
        return None
    return parse_step_dir(name[len(TMP_PREFIX) :].rsplit("-", 1)[0])


def writer_prefix(writer_id: str) -> str:
    """Object stores: the folder inside a step private to one writer, so racing writers never mix."""
    return f"w-{writer_id}/"


def valid_writer_prefix(prefix: str) -> bool:
    """Whether ``prefix`` is a writer folder as :func:`writer_prefix` builds it (or empty)."""
    return prefix == "" or bool(_WRITER_PREFIX_RE.match(prefix))


def rank_prefix(rank: int) -> str:
    """Folder of per-rank entries inside a step."""
    return f"rank-{rank:05d}/"


def entry_files(name: str, per_rank: bool, rank: int, has_tensors: bool) -> tuple[str, str | None]:
    """The skeleton and tensor file names of one entry (``per_rank``: inside its rank's folder)."""
    prefix = rank_prefix(rank) if per_rank else ""
    return f"{prefix}{name}{SKELETON_SUFFIX}", (f"{prefix}{name}{TENSOR_SUFFIX}" if has_tensors else None)


def meta_file(entry: str) -> str:
    """The sharding metadata file of a sharded ``entry``."""
    return f"{entry}{_META_SUFFIX}"


def shard_file(entry: str, rank: int) -> str:
    """The safetensors file holding ``rank``'s chunks of a sharded ``entry``."""
    return f"{rank_prefix(rank)}{entry}{_SHARD_SUFFIX}"


def index_file(shard: str) -> str:
    """The chunk index beside a shard file: byte range and crc32c of its header and of every chunk,
    so a rank reading part of another rank's file verifies exactly the bytes it uses."""
    return shard.removesuffix(_SHARD_SUFFIX) + _INDEX_SUFFIX


def sharded_entry_files(entry: str, ranks: Iterable[int]) -> list[str]:
    """Every file of a sharded entry: its metadata, then each rank's shard file and chunk index."""
    return [meta_file(entry)] + [
        f for r in ranks for f in (shard_file(entry, r), index_file(shard_file(entry, r)))
    ]


def file_kind(relpath: str) -> str:
    """What a step's file is, from its name: ``"sharding"`` (a sharded entry's metadata), ``"chunks"``
    (a chunk index), ``"shard"`` (a rank's chunks), ``"tensors"``, ``"skeleton"`` or ``"other"``."""
    if relpath.endswith(_META_SUFFIX):
        return "sharding"
    if relpath.endswith(_INDEX_SUFFIX):
        return "chunks"
    if relpath.endswith(_SHARD_SUFFIX):
        return "shard"
    if relpath.endswith(TENSOR_SUFFIX):
        return "tensors"
    return "skeleton" if relpath.endswith(SKELETON_SUFFIX) else "other"


def meta_entry(relpath: str) -> str:
    """The entry whose sharding metadata file ``relpath`` (without the writer's folder) is."""
    return relpath.removesuffix(_META_SUFFIX)


def is_tensor_file(relpath: str) -> bool:
    """Whether a step's file holds tensors (safetensors) rather than JSON."""
    return relpath.endswith(TENSOR_SUFFIX)


def skeleton_of(relpath: str) -> str:
    """The skeleton (JSON) file of the entry a step's file belongs to."""
    stem = relpath[: -len(TENSOR_SUFFIX)] if is_tensor_file(relpath) else relpath.rsplit(".", 1)[0]
    return stem + SKELETON_SUFFIX


def is_plain_file_path(path: str) -> bool:
    """Whether ``path`` is a name a manifest may list: relative, inside the step, no traversal."""
    return bool(_FILE_RE.match(path)) and ".." not in path
