"""Executing a restore plan's reads: every file of one step read once and verified (size, crc32c).

A :class:`StepReader` reads in two passes, one per plan: :meth:`~StepReader.read_facts` reads what
:func:`~resumekit.engine.plan.plan_load` needs (skeletons, tensor headers, entries read whole), and
:meth:`~StepReader.read_values` the remaining tensor files, straight into live tensors where the load
plan says so. Nothing here loads state into an object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import crc32c
import torch

from resumekit._messages import CORRUPTED_AFTER_WRITE
from resumekit.engine.live import LiveEntry
from resumekit.engine.plan import EntryRead, Facts, FileRef, LoadPlan, StepPlan
from resumekit.errors import CheckpointCorruptError
from resumekit.format.codec import decode
from resumekit.format.layout import step_dir
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import (
    RangeReader,
    TensorSpec,
    parse_head,
    read_raw_header,
    read_tensors,
    tensors_from_buffer,
)
from resumekit.sharding.chunkfiles import ShardFiles
from resumekit.sharding.reshard import read_meta, read_sharded
from resumekit.storage.base import Buffer, Storage, fetcher, positional
from resumekit.storage.verify import verify_file

if TYPE_CHECKING:
    from resumekit.storage.transfer import Download

__all__ = ["StepReader", "positional_reads"]


def positional_reads(storage: Storage) -> bool:
    """Whether ``storage`` offers positional reads (:class:`~resumekit.storage.base.PositionalReads`):
    tensor files may then be read straight into live tensors, and their headers alone before the data."""
    return positional(storage) is not None


class StepReader(contextlib.ExitStack):
    """The files of one step: opened once for positional reads, or fetched whole and concurrently.

    Attributes:
        touched: entries whose live tensors a file was (being) read into; a failure after that leaves
            unverified bytes in them.
    """

    def __init__(self, storage: Storage, url: str, plan: StepPlan) -> None:
        super().__init__()
        self.storage = storage
        self.plan = plan
        self.where = f"{url}/{step_dir(plan.step)}"
        self._positional = positional(storage)
        self.positional = self._positional is not None
        self.touched: list[str] = []
        self._open: dict[str, RangeReader] = {}
        self._fetched: dict[str, Future[Download]] = {}
        self._headers: dict[str, bytes] = {}
        self._parsed: dict[str, dict[str, TensorSpec]] = {}
        self._shards: ShardFiles | None = None
        self.callback(self._cancel_fetches)

    # -- the two passes -----------------------------------------------------------------------------

    def read_facts(self) -> Facts:
        """Read every skeleton, the header of each tensor file read later, and the entries read whole."""
        if not self.positional:
            self._prefetch(self.plan.files)
        skeletons: dict[str, Any] = {}
        specs: dict[str, Any] = {}
        values: dict[str, Any] = {}
        sharded: dict[str, Any] = {}
        for r in self.plan.reads:
            if r.sharded:  # its metadata now; the chunks this rank needs after the load plan
                raw = self._whole(r.skeleton).tobytes()
                sharded[r.name] = read_meta(raw, self._at(r.skeleton), self.plan.manifest)
                continue
            skeletons[r.name] = self._skeleton(r.skeleton)
            if r.eager:
                values[r.name] = self._decode(r, skeletons[r.name], self._tensors(r.tensors, None))
            elif r.tensors is not None:
                specs[r.name] = self._specs(r.tensors)
        return Facts(skeletons, specs, values, sharded)

    def read_values(self, load: LoadPlan, facts: Facts, entries: Mapping[str, LiveEntry]) -> dict[str, Any]:
        """Every loaded entry's decoded state: the facts' whole reads, plus the tensor files read now
        (into the live tensors of ``load.in_place``)."""
        values = {n: v for n, v in facts.values.items() if n in load.loads}
        items = [e.item for e in entries.values()]
        for r in load.step.reads:
            if r.sharded:
                obj = entries[r.name].item.obj
                values[r.name] = read_sharded(self._shard_files(), r.name, facts.sharded[r.name], obj, items)
                continue
            if r.eager:
                continue
            view = entries[r.name].view
            into = r.name if r.name in load.in_place and view is not None else None
            dest = view.tensors if into is not None and view is not None else None
            values[r.name] = self._decode(r, facts.skeletons[r.name], self._tensors(r.tensors, dest, into))
        return values

    # -- files ----------------------------------------------------------------------------------------

    def _shard_files(self) -> ShardFiles:
        """The step's shard files, read chunk by chunk where the storage allows; closed with the reader."""
        if self._shards is None:
            self._shards = self.enter_context(
                ShardFiles(self.storage, self.plan.step, self.plan.manifest, self.where)
            )
        return self._shards

    def _at(self, ref: FileRef) -> str:
        return f"{self.where}/{ref.relpath}"

    def _prefetch(self, refs: tuple[FileRef, ...]) -> None:
        """Start fetching whole files at once where the storage can (an object store: their ranged GETs
        share one budget, and each file's checksum is computed as it arrives)."""
        store = fetcher(self.storage)
        wanted = list(dict.fromkeys((f.relpath, f.record.size) for f in refs))
        if store is None or len(wanted) < 2:
            return
        for (rel, _), fut in zip(wanted, store.fetch_files(self.plan.step, wanted)):
            self._fetched[rel] = fut

    def _cancel_fetches(self) -> None:
        for fut in self._fetched.values():
            fut.cancel()

    def _whole(self, ref: FileRef) -> Buffer:
        """A whole file's bytes, verified against the manifest's size and crc32c."""
        fut = self._fetched.pop(ref.relpath, None)
        if fut is not None:
            got = fut.result()
            buf, crc = got.buffer, got.crc32c
        else:
            buf = self.storage.read_file(self.plan.step, ref.relpath, ref.record.size)
            crc = crc32c.crc32c(buf)
        verify_file(self._at(ref), ref.record, len(buf), crc)
        return buf

    def _skeleton(self, ref: FileRef) -> Any:
        return parse_strict(self._whole(ref).tobytes(), self._at(ref), "skeleton")

    def _reader(self, ref: FileRef) -> RangeReader:
        reader = self._open.get(ref.relpath)
        if reader is None:
            if self._positional is None:  # callers check ``positional`` first
                raise TypeError(f"{type(self.storage).__name__} offers no positional reads")
            opened = self._positional.open_reader(self.plan.step, ref.relpath, ref.record.size)
            reader = self.enter_context(opened)
            self._open[ref.relpath] = reader
        return reader

    def _header(self, ref: FileRef) -> bytes:
        """A tensor file's raw header (length prefix and JSON), read once."""
        if ref.relpath not in self._headers:
            self._headers[ref.relpath] = read_raw_header(self._reader(ref), ref.record.size, self._at(ref))
        return self._headers[ref.relpath]

    def _specs(self, ref: FileRef) -> dict[str, TensorSpec]:
        """A tensor file's header, parsed and validated once (the plan checks it, the read uses it)."""
        if ref.relpath not in self._parsed:
            self._parsed[ref.relpath] = parse_head(self._header(ref), ref.record.size, self._at(ref))
        return self._parsed[ref.relpath]

    def _tensors(
        self, ref: FileRef | None, dest: Mapping[str, torch.Tensor] | None, into: str | None = None
    ) -> dict[str, torch.Tensor]:
        """A tensor file's tensors, verified; read into ``dest`` (the live tensors of entry ``into``)
        when it matches them exactly, with the checksum in the same pass."""
        if ref is None:
            return {}
        if not self.positional:  # a storage without positional reads (an object store)
            return tensors_from_buffer(self._whole(ref), self._at(ref))
        if into is not None:
            self.touched.append(into)
        size = ref.record.size
        tensors, crc = read_tensors(
            self._reader(ref), size, self._at(ref), dest, self._header(ref), self._specs(ref)
        )
        fix = CORRUPTED_AFTER_WRITE
        if into is not None:
            fix += (
                f" It was read into '{into}' in place: falling back to an earlier checkpoint overwrites "
                "those tensors; if no checkpoint verifies, re-initialise that object."
            )
        verify_file(self._at(ref), ref.record, size, crc, fix=fix)
        return tensors

    def _decode(self, r: EntryRead, skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
        where = self._at(r.tensors) if r.tensors is not None else self._at(r.skeleton)

        def lookup(name: str) -> torch.Tensor:
            try:
                return tensors[name]
            except KeyError:
                raise CheckpointCorruptError(
                    f"{where} has no tensor '{name}' the skeleton refers to"
                ) from None

        return decode(skeleton, lookup, r.name)
