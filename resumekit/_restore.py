"""The restore path: read and verify one checkpoint, then load entries into the user's objects."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import crc32c
import torch

from ._codec import TensorTable, decode, encode
from ._dist import World
from ._entries import Item, crc_hex
from ._json import parse_strict
from ._keys import load_canonical
from ._manifest import SCOPE_RANK, Manifest, entry_files, step_dir
from ._partial import module_state
from ._shapes import load_matching
from ._storage import Buffer, Storage
from ._tensorfile import (
    RangeReader,
    matches_exactly,
    parse_head,
    read_raw_header,
    read_tensors,
    tensors_from_buffer,
)
from .errors import CheckpointCorruptError, StateMismatchError

if TYPE_CHECKING:
    from ._transfer import Download

__all__ = ["Loaded", "apply_entry", "load_step", "read_verified"]


@dataclass
class Loaded:
    """One checkpoint read and decoded for this rank (not yet applied)."""

    manifest: Manifest
    values: dict[str, Any] = field(default_factory=dict)
    absent_rank: list[str] = field(default_factory=list)


def load_step(
    storage: Storage,
    url: str,
    step: int,
    items: list[Item],
    world: World,
    strict: bool,
    in_place: Callable[[Manifest, Mapping[str, Any]], Collection[str]] | None = None,
    touched: list[str] | None = None,
) -> Loaded | None:
    """Read, verify and decode ``step``'s entries for this rank; None when it is not committed.

    Every file is read once and its size and crc32c are checked. Nothing is loaded into the user's
    objects here, with one exception: after every other entry is decoded, ``in_place(manifest,
    values_so_far)`` names the Module and Optimizer entries whose live tensors a tensor file may be
    read straight into (when it matches them exactly). The caller names entries only when every
    check that follows would pass, so a refused restore still changes nothing; a file that then
    fails its checksum has left unverified bytes in those tensors (the error says so; the fallback
    to an earlier checkpoint overwrites them). The names of entries whose objects were (or were being)
    read into are appended to ``touched``, also when this raises.
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
    # Entries that could be read in place (Modules, Optimizers) come last, so that in_place() can
    # run every check on the values of all the others first.
    live = [it for it in items if live_tensors_possible(it.obj)]
    touchable: frozenset[str] = frozenset()
    with contextlib.ExitStack() as stack:
        # Files opened to check their headers stay open for the data: each file is opened once.
        readers = _Readers(storage, step, m, where, stack, touched if touched is not None else [])
        if not readers.supported:
            readers.prefetch([f for it in items for f in _files_of(m, it, world) if f])
        for it in [it for it in items if not live_tensors_possible(it.obj)] + live:
            if in_place is not None and live and it is live[0]:
                touchable = frozenset(in_place(m, out.values))
                # All or none, decided before any live entry is read: a module file that does not
                # match, or any structure load_state_dict would refuse, would refuse the restore after
                # the read. An optimizer file whose tensors do not match (e.g. a fresh optimizer
                # without state yet) is simply read into new memory.
                if not _all_match(readers, m, [x for x in live if x.name in touchable], world, where):
                    touchable = frozenset()
            _load_entry(readers, m, it, world, where, it.name in touchable, out)
    return out


def _load_entry(
    readers: _Readers, m: Manifest, it: Item, world: World, where: str, touch: bool, out: Loaded
) -> None:
    entry = m.entries.get(it.name)
    if entry is None:
        return
    rank = world.rank if entry.scope == SCOPE_RANK else 0
    if rank not in entry.ranks:
        out.absent_rank.append(it.name)
        return
    json_name, st_name = _files_of(m, it, world)
    skeleton = readers.skeleton(json_name)
    tensors: dict[str, torch.Tensor] = {}
    if st_name:
        live = it if touch and _same_structure(readers.live(it), skeleton) else None
        tensors = _read_tensor_file(readers, m, st_name, where, live)

    def lookup(
        name: str, _t: dict[str, torch.Tensor] = tensors, _w: str = f"{where}/{st_name}"
    ) -> torch.Tensor:
        try:
            return _t[name]
        except KeyError:
            raise CheckpointCorruptError(f"{_w} has no tensor '{name}' the skeleton refers to") from None

    value = decode(skeleton, lookup, it.name)
    # Checked here, before any object is touched: a mapping entry is cleared and updated in place,
    # and a Module or Optimizer takes a dict, so anything else would fail half-applied.
    if (it.kind == "mapping" or live_tensors_possible(it.obj)) and not isinstance(value, dict):
        raise CheckpointCorruptError(
            f"{where}/{json_name}: entry '{it.name}' decodes to a {type(value).__name__}, but its object "
            "takes a dict; the skeleton is corrupt or forged."
        )
    out.values[it.name] = value


def _files_of(m: Manifest, it: Item, world: World) -> tuple[str, str]:
    """The JSON and tensor file (``""`` when it has none) of ``it`` that this rank reads."""
    entry = m.entries.get(it.name)
    if entry is None:
        return "", ""
    rank = world.rank if entry.scope == SCOPE_RANK else 0
    if rank not in entry.ranks:
        return "", ""
    json_name, st_name = entry_files(it.name, entry.scope, rank, True)
    return m.data_prefix + json_name, (
        m.data_prefix + st_name if st_name and m.data_prefix + st_name in m.files else ""
    )


class _Readers:
    """The files of one step: opened once for positional reads, or fetched whole and concurrently."""

    def __init__(
        self,
        storage: Storage,
        step: int,
        m: Manifest,
        where: str,
        stack: contextlib.ExitStack,
        touched: list[str],
    ) -> None:
        self.storage = storage
        self.touched = touched  # entries whose live tensors a file is (being) read into
        self.step = step
        self.m = m
        self.where = where
        self.stack = stack
        self.supported = callable(getattr(storage, "open_reader", None))
        self.open: dict[str, RangeReader] = {}
        self.fetched: dict[str, Future[Download]] = {}
        self.skeletons: dict[str, Any] = {}
        self.headers: dict[str, bytes] = {}
        self.lives: dict[str, _Live | None] = {}
        self.stack.callback(self._cancel_fetches)

    def prefetch(self, relpaths: list[str]) -> None:
        """Start fetching whole files at once where the storage can (an object store: their ranged GETs
        share one budget, and each file's checksum is computed as it arrives); each is verified where it
        is used."""
        fetch_files = getattr(self.storage, "fetch_files", None)
        wanted = [(rel, self.m.files[rel].size) for rel in dict.fromkeys(relpaths) if rel in self.m.files]
        if fetch_files is None or len(wanted) < 2:
            return
        for (rel, _), fut in zip(wanted, fetch_files(self.step, wanted)):
            self.fetched[rel] = fut

    def _cancel_fetches(self) -> None:
        for fut in self.fetched.values():
            fut.cancel()

    def skeleton(self, relpath: str) -> Any:
        """A JSON file's content, verified and parsed once (the in-place checks read it early)."""
        if relpath not in self.skeletons:
            self.skeletons[relpath] = parse_strict(
                self.verified(relpath).tobytes(), f"{self.where}/{relpath}", "skeleton"
            )
        return self.skeletons[relpath]

    def verified(self, relpath: str) -> Buffer:
        """A whole file's bytes, checked against the manifest's size and crc32c."""
        fut = self.fetched.pop(relpath, None)
        return read_verified(self.storage, self.step, self.m, relpath, self.where, fut)

    def header(self, relpath: str, size: int) -> bytes:
        """A tensor file's raw header (length prefix and JSON), read once."""
        if relpath not in self.headers:
            self.headers[relpath] = read_raw_header(self.get(relpath, size), size, f"{self.where}/{relpath}")
        return self.headers[relpath]

    def live(self, it: Item) -> _Live | None:
        """``it``'s own state as a save would encode it, computed once (None: no in-place read)."""
        if it.name not in self.lives:
            self.lives[it.name] = _live_view(it.obj)
        return self.lives[it.name]

    def get(self, relpath: str, size: int) -> RangeReader:
        reader = self.open.get(relpath)
        if reader is None:
            open_reader = self.storage.open_reader  # type: ignore[attr-defined]  # checked in __init__
            reader = self.stack.enter_context(open_reader(self.step, relpath, size))
            self.open[relpath] = reader
        return reader


def _read_tensor_file(
    readers: _Readers, m: Manifest, relpath: str, where: str, live: Item | None
) -> dict[str, torch.Tensor]:
    """A tensor file's tensors, checked against the manifest's size and crc32c.

    Read with positional reads (several in flight, the checksum in the same pass) where the storage
    offers them, into the live tensors of ``live`` when the file matches them exactly.
    """
    rec = m.files.get(relpath)
    if rec is None:
        raise CheckpointCorruptError(f"{where}: manifest does not list '{relpath}'")
    if not readers.supported:  # a storage without positional reads (an object store)
        buf = readers.verified(relpath)
        return tensors_from_buffer(buf, f"{where}/{relpath}")
    view = readers.live(live) if live is not None else None
    raw_header = readers.header(relpath, rec.size)
    dest = view.tensors if view is not None else None
    if dest is not None and not matches_exactly(dest, parse_head(raw_header, rec.size, f"{where}/{relpath}")):
        dest = None  # e.g. an optimizer without state yet: its tensors go into new memory
    if dest is not None and live is not None:
        readers.touched.append(live.name)
    reader = readers.get(relpath, rec.size)
    tensors, crc = read_tensors(reader, rec.size, f"{where}/{relpath}", dest, raw_header)
    actual = crc_hex(crc)
    if actual != rec.crc32c:
        raise CheckpointCorruptError(
            f"{where}/{relpath}: crc32c {actual} does not match the manifest's {rec.crc32c}; "
            "the file was corrupted after it was written (disk, transfer or a manual edit)."
            + (
                f" It was read into '{live.name}' in place: falling back to an earlier checkpoint overwrites "
                "those tensors; if no checkpoint verifies, re-initialise that object."
                if dest is not None and live is not None
                else ""
            )
        )
    return tensors


def _all_match(readers: _Readers, m: Manifest, live: list[Item], world: World, where: str) -> bool:
    """Whether every saved structure of ``live`` is one its ``load_state_dict`` accepts (see
    :func:`_same_structure`), and every module's tensor file matches its live tensors exactly (headers)."""
    if not readers.supported:
        return False
    for it in live:
        json_name, st_name = _files_of(m, it, world)
        rec = m.files.get(st_name)
        if rec is None:
            continue
        view = readers.live(it)
        if not _same_structure(view, readers.skeleton(json_name)):
            return False
        if not isinstance(it.obj, torch.nn.Module):
            continue  # an optimizer's tensors are matched when its file is read
        header = parse_head(readers.header(st_name, rec.size), rec.size, f"{where}/{st_name}")
        if view is None or not matches_exactly(view.tensors, header):
            return False
    return True


def live_tensors_possible(obj: Any) -> bool:
    """Whether ``obj``'s checkpoint tensors may be read into its live tensors: a Module or Optimizer,
    whose ``load_state_dict`` sets every value it is given anyway."""
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))


@dataclass(frozen=True)
class _Live:
    """A live Module's or Optimizer's state as a save encodes it: the JSON skeleton and its tensors."""

    module: bool
    skeleton: Any
    tensors: dict[str, torch.Tensor]


def _live_view(obj: Any) -> _Live | None:
    if not live_tensors_possible(obj):
        return None
    module = isinstance(obj, torch.nn.Module)
    try:
        table = TensorTable()
        skeleton = encode(module_state(obj) if module else obj.state_dict(), table)
        # As the JSON file holds it (tuples become lists), so the two compare equal when they match.
        return _Live(module, json.loads(json.dumps(skeleton)), table.tensors)
    except Exception:  # a state the codec refuses is save's error to report; here: no shortcut
        return None


def _same_structure(view: _Live | None, saved: Any) -> bool:
    """Whether ``load_state_dict`` cannot refuse the saved state for a reason other than tensor names,
    dtypes and shapes (those are compared with the file's header).

    A Module: the saved skeleton equals its own (same keys, non-tensor values and metadata versions), so
    the key check after the read passes. An Optimizer: the same parameter indices in the same groups,
    which ``Optimizer.load_state_dict`` checks only after every tensor was read.
    """
    if view is None:
        return False
    if view.module:
        return bool(view.skeleton == saved)
    saved_groups = _param_groups(saved)
    return saved_groups is not None and saved_groups == _param_groups(view.skeleton)


def _param_groups(skeleton: Any) -> list[Any] | None:
    groups = skeleton.get("param_groups") if isinstance(skeleton, dict) else None
    if not isinstance(groups, list):
        return None
    return [g.get("params") if isinstance(g, dict) else None for g in groups]


def read_verified(
    storage: Storage,
    step: int,
    m: Manifest,
    relpath: str,
    where: str,
    fetched: Future[Download] | None = None,
) -> Buffer:
    """A file's bytes (``fetched``: already on their way, with their crc32c), after checking them
    against the manifest's size and crc32c."""
    rec = m.files.get(relpath)
    if rec is None:
        raise CheckpointCorruptError(f"{where}: manifest does not list '{relpath}'")
    if fetched is not None:
        got = fetched.result()
        buf, actual = got.buffer, crc_hex(got.crc32c)
    else:
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
