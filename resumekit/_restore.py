"""The restore path: read and verify one checkpoint, then load entries into the user's objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from ._codec import decode
from ._dist import World
from ._entries import Item, crc_hex
from ._keys import load_canonical
from ._manifest import SCOPE_RANK, Manifest, entry_files, step_dir
from ._shapes import load_matching
from ._storage import Buffer, Storage
from ._tensorfile import tensors_from_buffer
from .errors import CheckpointCorruptError, StateMismatchError

__all__ = ["Loaded", "apply_entry", "load_step", "read_verified"]


@dataclass
class Loaded:
    """One checkpoint read and decoded for this rank (not yet applied)."""

    manifest: Manifest
    values: dict[str, Any] = field(default_factory=dict)
    absent_rank: list[str] = field(default_factory=list)


def load_step(
    storage: Storage, url: str, step: int, items: list[Item], world: World, strict: bool
) -> Loaded | None:
    """Read, verify and decode ``step``'s entries for this rank; None when it is not committed.

    Every file is read once; its size and crc32c are checked before it is parsed. Nothing is loaded
    into the user's objects here.
    """
    where = f"{url}/{step_dir(step)}"
    raw = storage.read_manifest(step)
    if raw is None:
        return None
    m = Manifest.from_json(raw, f"{where}/manifest.json")
    if m.step != step:
        raise CheckpointCorruptError(
            f"{where}: manifest says step {m.step}; the folder was renamed or copied"
        )
    missing = [it.name for it in items if it.name not in m.entries]
    if missing and strict:
        raise StateMismatchError(
            f"checkpoint step {step} in '{url}' has no entries {missing} (it has {sorted(m.entries)}). "
            "Restore with strict=False to leave those entries as they are, or remove them from state."
        )
    out = Loaded(m)
    for it in items:
        entry = m.entries.get(it.name)
        if entry is None:
            continue
        rank = world.rank if entry.scope == SCOPE_RANK else 0
        if rank not in entry.ranks:
            out.absent_rank.append(it.name)
            continue
        json_name, st_name = entry_files(it.name, entry.scope, rank, True)
        json_name, st_name = m.data_prefix + json_name, m.data_prefix + (st_name or "")
        try:
            skeleton = json.loads(read_verified(storage, step, m, json_name, where).tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointCorruptError(f"{where}/{json_name} is not valid JSON ({exc})") from exc
        tensors: dict[str, torch.Tensor] = {}
        if st_name in m.files:
            tensors = tensors_from_buffer(
                read_verified(storage, step, m, st_name, where), f"{where}/{st_name}"
            )

        def lookup(
            name: str, _t: dict[str, torch.Tensor] = tensors, _w: str = f"{where}/{st_name}"
        ) -> torch.Tensor:
            try:
                return _t[name]
            except KeyError:
                raise CheckpointCorruptError(f"{_w} has no tensor '{name}' the skeleton refers to") from None

        out.values[it.name] = decode(skeleton, lookup, it.name)
    return out


def read_verified(storage: Storage, step: int, m: Manifest, relpath: str, where: str) -> Buffer:
    """A file's bytes, after checking them against the manifest's size and crc32c."""
    rec = m.files.get(relpath)
    if rec is None:
        raise CheckpointCorruptError(f"{where}: manifest does not list '{relpath}'")
    buf = storage.read_file(step, relpath, rec.size)
    actual = crc_hex(crc32c.crc32c(buf))
    if actual != rec.crc32c:
        raise CheckpointCorruptError(
            f"{where}/{relpath}: crc32c {actual} does not match the manifest's {rec.crc32c}; "
            "the file was corrupted after it was written (disk, transfer or a manual edit)."
        )
    return buf


def apply_entry(it: Item, value: Any, allow_shape_mismatch: bool) -> list[str]:
    """Load one entry's decoded state into its object; return module tensors skipped for shape."""
    if isinstance(it.obj, torch.nn.Module):
        if allow_shape_mismatch:
            return list(load_matching(it.obj, value).skipped)
        load_canonical(it.obj, value)
    elif it.kind == "state":
        it.obj.load_state_dict(value)
    else:
        it.obj.clear()
        it.obj.update(value)
    return []
