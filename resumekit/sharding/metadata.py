"""The sharding metadata of one sharded entry: versioned JSON, and the pure plans built from it.

Pure logic, no I/O and no torch.distributed. A sharded entry (an FSDP2 or tensor-parallel module, or
its optimizer) is saved as one safetensors file per rank holding that rank's own chunks, plus one
``<entry>.sharding.json`` written by rank 0 that says, for every tensor, its global shape and dtype
and which chunk (offsets, sizes) lives in which file under which name. Non-tensor values of the
entry (learning rates, betas) are in the same JSON, encoded by the codec.

Ranks agree on this metadata by exchanging their local plans as JSON (never pickle); every rank
computes the same owners from the same gathered plans, so no further exchange is needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resumekit.errors import CheckpointCorruptError, UnsupportedValueError
from resumekit.format.layout import index_file, meta_file, shard_file
from resumekit.format.strict_json import expect_dict as _dict
from resumekit.format.strict_json import expect_list as _list
from resumekit.format.strict_json import expect_str as _str

__all__ = [
    "SHARDING_VERSION",
    "ChunkRecord",
    "ShardingMeta",
    "TensorRecord",
    "assign_owners",
    "check_ranks_agree",
    "index_file",
    "meta_file",
    "shard_file",
]

#: The version of ``<entry>.sharding.json`` this resumekit writes and reads.
SHARDING_VERSION = 1
#: Dimensions and offsets larger than this are refused as hostile (torch sizes are int64).
_MAX_DIM = 1 << 48


def chunk_name(key: str, offsets: list[int]) -> str:
    """The tensor name of one chunk inside a shard file (unique: one chunk per key and offset)."""
    return f"{key}@{','.join(str(o) for o in offsets)}"


@dataclass(frozen=True)
class ChunkRecord:
    """One saved chunk of a tensor: where it sits in the global tensor, and where it is stored."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    name: str


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a sharded entry: its global shape and dtype, and the chunks that tile it."""

    dtype: str  # the safetensors spelling ("F32", "BF16", ...)
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]


@dataclass(frozen=True)
class ShardingMeta:
    """Everything needed to reassemble one sharded entry at any world size."""

    world_size: int
    mesh: dict[str, Any]
    tensors: dict[str, TensorRecord]
    values: dict[str, Any]  # key -> codec-encoded non-tensor value
    version: int = SHARDING_VERSION
    files: tuple[str, ...] = field(default=())

    def to_json(self) -> bytes:
        """Serialise (keys sorted: identical metadata are identical bytes)."""
        d = {
            "format": "resumekit.sharded",
            "version": self.version,
            "world_size": self.world_size,
            "mesh": self.mesh,
            "files": list(self.files),
            "values": self.values,
            "tensors": {
                k: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": [
                        {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "name": c.name}
                        for c in t.chunks
                    ],
                }
                for k, t in self.tensors.items()
            },
        }
        return json.dumps(d, sort_keys=True, allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, where: str, known_files: Mapping[str, Any]) -> ShardingMeta:
        """Parse and validate; every chunk must lie inside its tensor and name a file in ``known_files``.

        Raises:
            UnsupportedFormatError: (as CheckpointCorruptError's sibling) a newer sharding version.
            CheckpointCorruptError: anything malformed.
        """
        from resumekit.errors import UnsupportedFormatError
        from resumekit.format.strict_json import parse_strict

        d = parse_strict(raw, where, "sharding metadata")
        if not isinstance(d, dict) or d.get("format") != "resumekit.sharded":
            raise CheckpointCorruptError(f"{where} is not resumekit sharding metadata")
        version = d.get("version")
        if type(version) is not int or version < 1:
            raise CheckpointCorruptError(f"{where} has no integer version")
        if version > SHARDING_VERSION:
            raise UnsupportedFormatError(
                f"{where}: sharding metadata version {version}; this resumekit reads up to "
                f"{SHARDING_VERSION}. Upgrade resumekit (pip install -U resumekit) to read it."
            )
        try:
            tensors = {_str(k): _tensor(v, k, where, known_files) for k, v in _dict(d["tensors"]).items()}
            return cls(
                world_size=_int(d["world_size"]),
                mesh=_dict(d.get("mesh", {})),
                tensors=tensors,
                values=_dict(d["values"]),
                version=version,
                files=tuple(_str(f) for f in _list(d.get("files", []))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointCorruptError):
                raise
            raise CheckpointCorruptError(f"{where}: field missing or malformed: {exc!r}") from exc


def _tensor(v: Any, key: str, where: str, known_files: Mapping[str, Any]) -> TensorRecord:
    v = _dict(v)
    shape = tuple(_int(s) for s in _list(v["shape"]))
    chunks = []
    for c in _list(v["chunks"]):
        c = _dict(c)
        offsets = tuple(_int(o) for o in _list(c["offsets"]))
        sizes = tuple(_int(s) for s in _list(c["sizes"]))
        file = _str(c["file"])
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise CheckpointCorruptError(f"{where}: a chunk of '{key}' has the wrong number of dimensions")
        if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise CheckpointCorruptError(f"{where}: a chunk of '{key}' lies outside its shape {list(shape)}")
        if file not in known_files:
            raise CheckpointCorruptError(
                f"{where}: a chunk of '{key}' is in '{file}', which the manifest does not list"
            )
        chunks.append(ChunkRecord(offsets, sizes, file, _str(c["name"])))
    return TensorRecord(_str(v["dtype"]), shape, tuple(chunks))


def assign_owners(plans: list[dict[str, Any]]) -> dict[tuple[str, tuple[int, ...]], int]:
    """Which rank writes each chunk, from every rank's plan (``plans[rank]["chunks"]``: a list of
    ``[key, offsets, sizes, nbytes]``).

    A chunk held by several ranks (a replicated placement, or a plain tensor every rank holds) is
    written once, by the holder with the fewest bytes assigned so far (ties: the lowest rank), so the
    write load stays balanced. Deterministic: every rank computes the same answer from the same plans.
    Empty chunks (an uneven dimension leaves some ranks nothing) are not written at all.
    """
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    nbytes: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank, plan in enumerate(plans):
        for key, offsets, _sizes, n in plan["chunks"]:
            cid = (key, tuple(offsets))
            holders.setdefault(cid, []).append(rank)
            nbytes[cid] = n
    load = [0] * len(plans)
    owners: dict[tuple[str, tuple[int, ...]], int] = {}
    # Biggest first, so the greedy balance is not decided by the small tensors.
    for cid in sorted(holders, key=lambda c: (-nbytes[c], c)):
        if nbytes[cid] == 0:
            continue
        owner = min(holders[cid], key=lambda r: (load[r], r))
        owners[cid] = owner
        load[owner] += nbytes[cid]
    return owners


def check_ranks_agree(entry: str, plans: list[dict[str, Any]]) -> None:
    """Refuse a sharded entry whose ranks disagree on anything that is saved once for all of them.

    Non-tensor values (``plans[rank]["values"]``), plain (unsharded) tensors (their crc32c in
    ``plans[rank]["plain"]``) and every tensor's global shape and dtype (``plans[rank]["tensors"]``)
    must be identical on every rank: a value that differs would otherwise silently collapse to one
    rank's (DCP's de-duplication does exactly that).

    Raises:
        UnsupportedValueError: naming the entry, the key and which ranks hold which value.
    """
    for field_name, what in (
        ("tensors", "global shape/dtype"),
        ("values", "value"),
        ("plain", "unsharded tensor"),
    ):
        # Equal whole fields make every key equal: one comparison per rank, and the key-by-key search
        # (for the message) only when something differs.
        if len({json.dumps(p[field_name], sort_keys=True) for p in plans}) == 1:
            continue
        keys = sorted({k for p in plans for k in p[field_name]})
        for key in keys:
            groups: dict[str, list[int]] = {}
            for rank, p in enumerate(plans):
                groups.setdefault(json.dumps(p[field_name].get(key), sort_keys=True), []).append(rank)
            if len(groups) > 1:
                desc = "; ".join(
                    f"rank(s) {', '.join(str(r) for r in ranks)}: {_short(v)}" for v, ranks in groups.items()
                )
                raise UnsupportedValueError(
                    f"sharded entry '{entry}': the {what} at '{key}' differs between ranks ({desc}). A "
                    "sharded entry stores one copy of every non-sharded value, so saving it would keep one "
                    "rank's and lose the others'. Make the value identical on every rank, or keep it in a "
                    "separate per-rank entry (Checkpointer(per_rank=(...)))."
                )


def _short(v: str) -> str:
    if v == "null":
        return "absent"
    return v if len(v) <= 80 else v[:77] + "..."


def _int(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _MAX_DIM:
        raise TypeError(f"expected a non-negative integer, got {v!r}")
    return v
