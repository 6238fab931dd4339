"""Restore plans: what a restore of one step reads, loads, resets and refuses, decided without I/O.

A restore of one checkpoint step is planned in two pure steps around one read of metadata:

1. :func:`plan_step` (the manifest, the live entries, the options, the drift report) gives a
   :class:`StepPlan`: the entries this rank reads and from which files, which are reset, and every
   refusal the manifest alone shows (drift, entries missing under ``strict``).
2. The executor (:mod:`resumekit.engine.reader`) reads the plan's metadata into :class:`Facts`: every
   skeleton, the header of each tensor file that may be read in place, and, whole, every entry that is
   never read in place.
3. :func:`plan_load` (the step plan, the facts, the live entries) gives a :class:`LoadPlan`: every
   other refusal (names, shapes, optimizer groups, ``resumekit_validate`` hooks, reset schedulers) and
   which tensor files go straight into live tensors.

Nothing is read into a live object before :func:`plan_load` returned on every rank, so a refused
restore changes nothing. A sharded entry (FSDP2, tensor parallel: tensors spread over several ranks'
files) is one more kind of :class:`EntryRead`: its metadata is read with the facts and checked against
the live DTensors by :func:`check_entry`; its chunks are read after the load plan, into new memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from resumekit._messages import not_listed
from resumekit.drift import DriftReport
from resumekit.engine.entries import Item
from resumekit.engine.live import LiveEntry, same_structure
from resumekit.engine.partial import (
    Reset,
    check_only,
    is_scheduler,
    optimisation_group,
    plan_resets,
    scheduler_position,
)
from resumekit.engine.shapes import DEFAULT_SHAPE_FIX, check_keys, check_param_groups, check_shapes
from resumekit.errors import CheckpointCorruptError, StateMismatchError
from resumekit.format.codec import decode
from resumekit.format.manifest import SCOPE_RANK, SCOPE_SHARDED, FileRecord, Manifest, entry_files
from resumekit.format.tensorfile import TensorSpec, matches_exactly
from resumekit.sharding.metadata import ShardingMeta
from resumekit.sharding.reshard import check_sharded

__all__ = [
    "EntryRead",
    "Facts",
    "FileRef",
    "LoadPlan",
    "RestoreOptions",
    "StepPlan",
    "plan_load",
    "plan_step",
]

#: Why an entry is read: to load it into its object, or (a reset scheduler) for its saved position.
LOAD, POSITION = "load", "position"


@dataclass(frozen=True)
class RestoreOptions:
    """The options of one restore, checked against the state.

    Attributes:
        chosen: the entries to load (``only=``, else every entry).
        reset: the optimisation-group entries ``only=`` leaves out, reset together.
        strict: refuse a checkpoint that lacks a chosen entry.
        allow_shape_mismatch: load what fits instead of refusing a module's other shapes.
        in_place: tensor files may be read straight into live tensors (positional reads, not
            ``verify_first``, not ``allow_shape_mismatch``).
    """

    chosen: frozenset[str]
    reset: tuple[str, ...] = ()
    strict: bool = True
    allow_shape_mismatch: bool = False
    in_place: bool = False

    @classmethod
    def of(
        cls,
        state: Mapping[str, Any],
        only: Iterable[str] | None,
        *,
        strict: bool = True,
        allow_shape_mismatch: bool = False,
        in_place: bool = False,
    ) -> RestoreOptions:
        """Options for ``state``; ``only=`` is checked here (StateMismatchError), before any I/O."""
        chosen = check_only(state, only) if only is not None else frozenset(state)
        reset = tuple(n for n in optimisation_group(state) if n not in chosen)
        return cls(chosen, reset, strict, allow_shape_mismatch, in_place and not allow_shape_mismatch)


@dataclass(frozen=True)
class FileRef:
    """One file of the step, as the manifest records it."""

    relpath: str
    record: FileRecord


@dataclass(frozen=True)
class EntryRead:
    """One entry this rank reads from one step.

    Attributes:
        name: the entry.
        purpose: ``"load"`` into its object, or ``"position"`` (a reset scheduler's saved step).
        skeleton: its JSON file.
        tensors: its tensor file, if it has one.
        eager: read whole (into new memory) before :func:`plan_load`; otherwise only its header is,
            and its tensors after the plan (straight into live tensors when the plan says so).
        shards: a sharded entry (its ``skeleton`` is then the sharding metadata, read before
            :func:`plan_load`): every rank's shard file and chunk index the manifest lists, of which
            this rank reads, after the plan, only the chunks its live shards overlap (each verified).
            Empty for any other entry, and for a sharded entry without tensors (an optimizer
            saved before its first step).
        sharded_entry: the entry is sharded (``skeleton`` is its sharding metadata), shards or not.
    """

    name: str
    purpose: str
    skeleton: FileRef
    tensors: FileRef | None
    eager: bool
    shards: tuple[FileRef, ...] = ()
    sharded_entry: bool = False

    @property
    def sharded(self) -> bool:
        """Whether the entry is sharded (FSDP2, tensor parallel): read from several ranks' files."""
        return self.sharded_entry or bool(self.shards)


@dataclass(frozen=True)
class StepPlan:
    """What to read from one step, from its manifest alone.

    Attributes:
        step: the step.
        manifest: its validated manifest.
        drift: the saved environment and config against this run's (no error-level item).
        reads: the entries this rank reads.
        reset: the optimisation-group entries reset instead of loaded.
        not_restored: chosen entries the checkpoint lacks (``strict=False``), left untouched.
        absent_rank: chosen per-rank entries without a record for this rank, left untouched.
    """

    step: int
    manifest: Manifest
    drift: DriftReport
    reads: tuple[EntryRead, ...]
    reset: tuple[str, ...]
    not_restored: tuple[str, ...] = ()
    absent_rank: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[FileRef, ...]:
        """Every file the plan reads."""
        return tuple(f for r in self.reads for f in (r.skeleton, r.tensors) if f is not None)


def plan_step(
    manifest: Manifest, entries: Sequence[LiveEntry], options: RestoreOptions, rank: int, drift: DriftReport
) -> StepPlan:
    """Plan the reads of one step for this rank.

    Raises:
        DriftError: the drift policy rates a change as an error.
        StateMismatchError: ``strict`` and the checkpoint lacks a chosen entry.
        CheckpointCorruptError: the manifest does not list an entry's skeleton (falls back).
    """
    drift.raise_for_errors()
    missing = [e.name for e in entries if e.name in options.chosen and e.name not in manifest.entries]
    if missing and options.strict:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} has no entries {missing} (it has {sorted(manifest.entries)}). "
            "Restore with strict=False to leave those entries as they are, or remove them from state. "
            "Nothing was loaded."
        )
    reads: list[EntryRead] = []
    absent: list[str] = []
    for e in entries:
        purpose = _purpose(e, options)
        if purpose is None or e.name not in manifest.entries:
            continue
        if manifest.entries[e.name].scope == SCOPE_SHARDED:
            reads.append(_sharded_read(manifest, e.name, purpose))
            continue
        files = _files_of(manifest, e.name, rank)
        if files is None:
            absent += [e.name] if purpose == LOAD else []
            continue
        eager = purpose == POSITION or not (options.in_place and e.may_read_in_place and files[1] is not None)
        reads.append(EntryRead(e.name, purpose, files[0], files[1], eager))
    return StepPlan(
        manifest.step, manifest, drift, tuple(reads), options.reset, tuple(missing), tuple(absent)
    )


def _purpose(e: LiveEntry, options: RestoreOptions) -> str | None:
    if e.name in options.chosen:
        return LOAD
    if e.name in options.reset and is_scheduler(e.item.obj):
        return POSITION
    return None  # a reset optimizer or scaler needs nothing from the checkpoint


def _files_of(m: Manifest, name: str, rank: int) -> tuple[FileRef, FileRef | None] | None:
    """The skeleton and tensor file of ``name`` that ``rank`` reads; None when it has no record."""
    entry = m.entries[name]
    owner = rank if entry.scope == SCOPE_RANK else 0
    if owner not in entry.ranks:
        return None
    json_name, st_name = (m.data_prefix + f if f else "" for f in entry_files(name, entry.scope, owner, True))
    if json_name not in m.files:
        raise CheckpointCorruptError(not_listed(f"checkpoint step {m.step}", json_name))
    tensors = FileRef(st_name, m.files[st_name]) if st_name in m.files else None
    return FileRef(json_name, m.files[json_name]), tensors


def _sharded_read(m: Manifest, name: str, purpose: str) -> EntryRead:
    """A sharded entry's read: its metadata before the load plan, the shards it lists after."""
    meta, *names = m.files_of(name)
    if meta not in m.files:
        raise CheckpointCorruptError(not_listed(f"checkpoint step {m.step}", meta))
    # No shard file at all is legitimate: an optimizer that has not stepped yet has no tensors. A
    # missing file is still caught: the metadata names every chunk's file and must find each listed.
    shards = tuple(FileRef(n, m.files[n]) for n in names if n in m.files)
    return EntryRead(name, purpose, FileRef(meta, m.files[meta]), None, False, shards, sharded_entry=True)


@dataclass(frozen=True)
class Facts:
    """What was read of a step before its load plan.

    Attributes:
        skeletons: entry -> its parsed JSON skeleton.
        specs: entry -> the tensors its file's header declares (entries not read whole).
        values: entry -> its decoded state (entries read whole, verified).
        sharded: sharded entry -> its sharding metadata (verified and validated).
    """

    skeletons: Mapping[str, Any]
    specs: Mapping[str, Mapping[str, TensorSpec]]
    values: Mapping[str, Any]
    sharded: Mapping[str, ShardingMeta] = field(default_factory=dict)

    def saved(self, name: str) -> Any:
        """The entry's saved state: decoded, or, before its tensors are read, decoded with stand-ins of
        the right shape and dtype (one element of memory each), which every check needs; a sharded
        entry's metadata (names, shapes and dtypes of every saved tensor)."""
        if name in self.sharded:
            return self.sharded[name]
        if name in self.values:
            return self.values[name]
        specs = self.specs.get(name, {})

        def stand_in(tensor: str) -> torch.Tensor:
            spec = specs.get(tensor)
            if spec is None:
                raise CheckpointCorruptError(
                    f"entry '{name}': the skeleton refers to tensor '{tensor}', which its file lacks"
                )
            return torch.zeros((), dtype=spec.dtype).expand(spec.shape)

        return decode(self.skeletons[name], stand_in, name)


@dataclass(frozen=True)
class LoadPlan:
    """What to load, how, and what to reset; every refusal has been raised.

    Attributes:
        step: the step plan it completes.
        in_place: entries whose tensor file is read straight into their live tensors.
        resets: how each left-out optimisation-group member is reset.
        warnings: what to tell the user when the plan is applied (e.g. a reset ReduceLROnPlateau).
    """

    step: StepPlan
    in_place: frozenset[str]
    resets: tuple[Reset, ...]
    warnings: tuple[str, ...] = ()

    @property
    def loads(self) -> tuple[str, ...]:
        """The entries loaded into their objects."""
        return tuple(r.name for r in self.step.reads if r.purpose == LOAD)


def plan_load(
    step: StepPlan, facts: Facts, entries: Sequence[LiveEntry], options: RestoreOptions
) -> LoadPlan:
    """Complete a step plan from its facts: refuse what would fail, choose what is read in place.

    Raises:
        StateMismatchError: names, shapes or optimizer groups that do not fit, a scheduler that cannot
            be reset, or whatever a ``resumekit_validate`` hook raises.
        CheckpointCorruptError: a skeleton that does not decode (falls back).
    """
    by_name = {e.name: e for e in entries}
    items = [e.item for e in entries]
    positions: dict[str, int | None] = {}
    for r in step.reads:
        saved = facts.saved(r.name)
        if r.purpose == POSITION:
            positions[r.name] = scheduler_position(saved)
        else:
            check_entry(by_name[r.name], saved, options, items)
    state = {e.name: e.item.obj for e in entries}
    resets, notes = plan_resets(state, step.reset, positions)
    return LoadPlan(step, _in_place(step, facts, by_name), resets, notes)


def check_entry(e: LiveEntry, saved: Any, options: RestoreOptions, items: Sequence[Item] = ()) -> None:
    """Every check that can refuse loading ``saved`` into ``e``'s object, run before anything loads.

    A sharded entry's ``saved`` is its :class:`~resumekit.sharding.metadata.ShardingMeta`: every saved name,
    shape and dtype is checked against the live object's DTensors (or plain tensors); a sharded
    optimizer's model is found among ``items``.

    Raises:
        StateMismatchError: a module's names or shapes, an optimizer's parameter groups.
        CheckpointCorruptError: a mapping, Module or Optimizer entry whose skeleton decodes to
            something other than a dict (forged or corrupt; falls back).
        Whatever the object's ``resumekit_validate`` hook raises.
    """
    obj = e.item.obj
    if isinstance(saved, ShardingMeta):
        check_sharded(e.name, saved, obj, items)  # no validate hook: it would see metadata, not state
        return
    # A mapping entry is cleared and updated in place, and a Module or Optimizer takes a dict:
    # anything else would fail half-applied.
    takes_dict = e.item.kind == "mapping" or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))
    if takes_dict and not isinstance(saved, dict):
        raise CheckpointCorruptError(
            f"entry '{e.name}' decodes to a {type(saved).__name__}, but its object takes a dict; "
            "the skeleton is corrupt or forged."
        )
    if isinstance(obj, torch.nn.Module) and not options.allow_shape_mismatch:
        check_shapes(saved, obj, entry=e.name, fix=DEFAULT_SHAPE_FIX, keys=e.keys)
        check_keys(saved, obj, entry=e.name, keys=e.keys)
    if isinstance(obj, torch.optim.Optimizer):
        check_param_groups(saved, obj, entry=e.name)
    if e.validate is not None:
        e.validate(saved)


def _in_place(step: StepPlan, facts: Facts, by_name: Mapping[str, LiveEntry]) -> frozenset[str]:
    """The entries whose tensor files go straight into their live tensors: all that may, or none.

    All or none, so that no entry is read in place when another's structure would make its
    ``load_state_dict`` refuse. An optimizer whose tensors differ from the file's (a fresh one,
    without state yet) is read into new memory without stopping the others.
    """
    lazy = [r for r in step.reads if not r.eager and not r.sharded]  # shards go into new memory
    exact: set[str] = set()
    for r in lazy:
        view = by_name[r.name].view
        if view is None or not same_structure(by_name[r.name], view, facts.skeletons[r.name]):
            return frozenset()
        if matches_exactly(view.tensors, facts.specs.get(r.name, {})):
            exact.add(r.name)
        elif isinstance(by_name[r.name].item.obj, torch.nn.Module):
            return frozenset()
    return frozenset(exact)
