"""The Checkpointer: save training state atomically, restore the newest checkpoint that verifies."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from resumekit._messages import not_committed
from resumekit.drift import DriftPolicy, DriftReport, compare
from resumekit.engine.apply import apply_plan
from resumekit.engine.collectives import World, current_world
from resumekit.engine.entries import Item, check_step, items_of
from resumekit.engine.environment import collect_environment
from resumekit.engine.live import live_entries
from resumekit.engine.plan import RestoreOptions
from resumekit.engine.readback import verify_committed
from resumekit.engine.reader import positional_reads
from resumekit.engine.restore import read_newest
from resumekit.engine.save import Snapshot, build_manifest, take_snapshot, write
from resumekit.errors import CheckpointCorruptError, CheckpointNotFoundError, UnsafeCheckpointError
from resumekit.format.layout import step_dir
from resumekit.format.manifest import (
    Manifest,
    current_format,
)
from resumekit.sharding.mesh import MESH_KEY, entry_meshes
from resumekit.staging.background import AsyncSaves
from resumekit.storage import open_storage
from resumekit.storage import retention as _retention
from resumekit.storage.base import Storage

__all__ = ["CheckpointInfo", "Checkpointer", "RestoreResult"]

log = logging.getLogger("resumekit")


@dataclass(frozen=True)
class CheckpointInfo:
    """What :meth:`Checkpointer.save` committed."""

    step: int
    url: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`Checkpointer.restore` loaded.

    Attributes:
        step: the step restored.
        url: where the checkpoint lives.
        config: the ``config=`` mapping saved with it.
        environment: the environment fingerprint saved with it.
        drift: differences between the saved and the current environment and config.
        skipped: newer checkpoints that failed verification, with the reason each was skipped.
        not_restored: entries of ``state`` that were left untouched (``strict=False``).
        reset: optimizer/scaler/scheduler entries reset as a group by a partial restore (``only=``).
        skipped_tensors: module tensors not loaded because their shapes differ
            (``allow_shape_mismatch=True``).
    """

    step: int
    url: str
    config: dict[str, Any] | None
    environment: dict[str, Any]
    drift: DriftReport
    skipped: tuple[tuple[int, str], ...] = ()
    not_restored: tuple[str, ...] = ()
    reset: tuple[str, ...] = ()
    skipped_tensors: tuple[str, ...] = ()


class Checkpointer:
    """Saves and restores training state atomically, locally or on any fsspec store.

    Args:
        url: a local folder, ``file://``, ``s3://``, ``gs://``, ``memory://`` or any fsspec URL.
        keep_last: keep only this many newest checkpoints (None keeps all). Retention runs only
            after a new checkpoint is committed.
        keep_every: also keep every step divisible by this forever (milestones).
        config: the run's configuration (JSON-serialisable); saved in every manifest and compared on
            restore for drift.
        drift_policy: how to treat each kind of drift; defaults to :class:`~resumekit.DriftPolicy`'s.
        per_rank: entry names saved once per rank (objects with ``resumekit_scope = "rank"``, such as
            :class:`~resumekit.RNGState`, are per rank already). Others are saved by rank 0 only.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        process_group: the torch.distributed group that saves together (default: the world).
        orphan_grace_seconds: unfinished writes younger than this are never cleaned up (another
            writer may still be finishing them).
        amp_dtype: the autocast dtype the run trains with (e.g. ``torch.bfloat16``), recorded with
            the environment so a change on resume is reported as drift.
        storage: the storage backend to read and write through instead of the one ``url`` opens
            (``url`` and ``storage_options`` are then not used; the checkpointer's ``url`` is the
            storage's). For tests and fault injection: wrap ``resumekit.storage.open_storage(url)``.
        verify_after_save: after each commit, read the step back as ``restore()`` would (every
            checksum, header and skeleton, on every rank) before retention runs, and raise
            ``CheckpointCorruptError`` if it does not read back. Guards against storage that loses or
            alters acknowledged writes; costs about one restore's read per save (see docs/format.md).
        async_timeout: seconds each collective of a :meth:`save_async`'s background exchange waits
            for the other ranks (a rank stuck in its write fails the save on every rank after this
            long, at :meth:`wait` or the next save). None: torch's default for a gloo group (30 min).

    Example:
        >>> ckpt = Checkpointer("/tmp/run-7", keep_last=3)  # doctest: +SKIP
        >>> restored = ckpt.restore(state)                 # doctest: +SKIP
        >>> ckpt.save(state, step=100)                     # doctest: +SKIP
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        config: Mapping[str, Any] | None = None,
        drift_policy: DriftPolicy | None = None,
        per_rank: tuple[str, ...] | list[str] = (),
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        orphan_grace_seconds: float = 3600.0,
        amp_dtype: str | torch.dtype | None = None,
        storage: Storage | None = None,
        verify_after_save: bool = False,
        async_timeout: float | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        # None means "no config recorded" (not compared on restore); {} is a recorded, empty config.
        self.config: dict[str, Any] | None = dict(config) if config is not None else None
        try:
            json.dumps(self.config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"config must be JSON-serialisable (str keys; str, int, float, bool, None, lists, dicts): {exc}"
            ) from exc
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.drift_policy = drift_policy or DriftPolicy()
        self.per_rank = frozenset(per_rank)
        self.orphan_grace_seconds = float(orphan_grace_seconds)
        self._group = process_group
        self.amp_dtype = amp_dtype
        self._storage: Storage = storage if storage is not None else open_storage(url, storage_options)
        self.verify_after_save = bool(verify_after_save)
        if async_timeout is not None and not (type(async_timeout) in (int, float) and async_timeout > 0):
            raise ValueError(
                f"async_timeout must be a positive number of seconds or None, got {async_timeout!r}"
            )
        self.async_timeout = async_timeout
        self.url = self._storage.url
        self._async = AsyncSaves()
        self._async_world: World | None = None
        self._atexit_registered = False

    # -- discovery ----------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending (those with a manifest; not yet verified)."""
        return [s for s in self._storage.step_candidates() if self._committed(s)]

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        for s in reversed(self._storage.step_candidates()):
            if self._committed(s):
                return s
        return None

    def _committed(self, step: int) -> bool:
        # A step whose manifest the storage refuses to read (a link out of the root, a FIFO, an absurd
        # size) is no checkpoint of this root: not listed, so retention never touches it; restore names
        # it when it skips it.
        try:
            return self._storage.read_manifest(step) is not None
        except (CheckpointCorruptError, UnsafeCheckpointError):
            return False

    # -- save ---------------------------------------------------------------------------------------

    def save(self, state: Mapping[str, Any], *, step: int) -> CheckpointInfo:
        """Write ``state`` as checkpoint ``step`` and commit it atomically; then apply retention.

        Under torch.distributed every rank of the group must call this together. Entries identical
        across ranks are written once by rank 0; per-rank entries by each rank; the manifest only
        after every rank's files are durable. Tensors stream from their own memory to storage: no
        second copy of the state is made (CUDA tensors pass through host memory one at a time).

        Args:
            state: entry name -> object with ``state_dict()``/``load_state_dict()`` (or a plain dict).
            step: the step number (a non-negative int); an existing step is never overwritten.

        Returns:
            What was committed.

        Raises:
            StepExistsError: the step is already committed.
            StorageError: an I/O failure (errno kept); nothing became visible.
            UnsupportedValueError: a state value cannot be stored without pickle.
        """
        self.wait()
        snap = take_snapshot(
            self._storage, self.url, state, step, current_world(self._group), None, self.per_rank
        )
        return self._write(snap)

    def save_async(
        self,
        state: Mapping[str, Any],
        *,
        step: int,
        staging: str = "overlap",
        staging_budget: int | None = None,
    ) -> None:
        """Start saving ``state`` as checkpoint ``step`` in the background, and return.

        The checkpoint holds the values at the moment of the call, whatever training does next. With
        ``staging="overlap"`` (the default, the fastest) the call captures non-tensor state and small
        tensors, and returns; parameters and optimizer moments are copied to host buffers in the
        background while the next forward and backward run, and the first in-place write to one not yet
        copied (an optimizer step, ``p.add_(...)``, ``load_state_dict``) waits for that copy. A write
        resumekit cannot intercept (another thread, C++ code) is detected by the tensor's version
        counter and fails the save with :class:`~resumekit.errors.StagingError` rather than commit a
        changed value. ``staging="copy"`` copies every tensor before returning. See docs/async.md.

        Host memory: staging buffers as large as the state's tensors, reused by the next save; with
        ``staging_budget=`` bytes, at most that much, at the price of writes waiting for the storage.

        At most one save is in flight: a second call (or :meth:`save`, :meth:`restore`) first waits for
        the previous one. An error of a background save is raised by the next ``save``/``save_async``,
        :meth:`wait` or :meth:`close` — never lost. At interpreter exit an in-flight save is finished; a
        process killed mid-save leaves it invisible (the commit protocol).

        Under torch.distributed every rank must call this together; the background thread talks over a
        separate gloo group created on the first call, so it never interleaves with training collectives.

        Args:
            state: as for :meth:`save`.
            step: as for :meth:`save`.
            staging: ``"overlap"`` or ``"copy"``.
            staging_budget: bound on the staging buffers in bytes (overlap only); None for no bound.
        """
        self.wait()
        stager = self._async.stager(staging, staging_budget)
        world = current_world(self._group)
        if world.distributed and self._async_world is None:
            self._async_world = World(
                world.rank, world.size, _background_group(self._group, self.async_timeout)
            )
        snap = take_snapshot(self._storage, self.url, state, step, world, stager, self.per_rank)
        if self._async_world is not None:
            snap.world = self._async_world
        self._async.start(stager, lambda: self._write(snap))
        if not self._atexit_registered:
            atexit.register(self._finish_at_exit)
            self._atexit_registered = True

    def wait_staged(self) -> None:
        """Return once the save in flight holds a copy of every tensor: writes may follow at once.

        Needed only before writes resumekit cannot intercept (from another thread, or C++ code that
        changes a parameter in place) while ``save_async(..., staging="overlap")`` is copying.
        """
        self._async.wait_staged()

    def wait(self) -> CheckpointInfo | None:
        """Wait for the in-flight :meth:`save_async`, if any; return what it committed.

        Raises:
            Whatever the background save raised (StorageError, StagingError, StepExistsError, ...).
        """
        result: CheckpointInfo | None = self._async.wait()
        return result

    def _finish_at_exit(self) -> None:
        if self._async.inflight is not None:
            try:
                self.wait()
            except Exception as exc:
                print(f"resumekit: the background save did not commit: {exc}", file=sys.stderr)

    def _write(self, snap: Snapshot) -> CheckpointInfo:
        """Write and commit a snapshot, then apply retention (rank 0)."""
        nbytes = write(
            self._storage,
            snap,
            lambda prefix, files: build_manifest(
                snap, prefix, files, config=self.config, amp_dtype=self.amp_dtype
            ),
        )
        if self.verify_after_save:  # before retention: never evict good steps for an unreadable one
            verify_committed(
                self._storage,
                self.url,
                snap.step,
                snap.items,
                snap.world,
                lambda m: self._drift(m, snap.world, snap.items),
            )
        if snap.world.rank == 0:
            self._retain()
        url = f"{self.url}/{step_dir(snap.step)}"
        return CheckpointInfo(snap.step, url, nbytes, time.perf_counter() - snap.t0)

    def _retain(self) -> None:
        try:
            # Only committed checkpoints count toward keep_last: an uncommitted folder (a crashed
            # object-store write) must never evict a real checkpoint.
            for s in _retention.steps_to_delete(
                self.steps(), keep_last=self.keep_last, keep_every=self.keep_every
            ):
                self._storage.delete_step(s)
            self._storage.cleanup(self.orphan_grace_seconds)
        except Exception as exc:  # the new checkpoint is committed; a failed clean-up must not hide that
            warnings.warn(
                f"resumekit: retention in '{self.url}' failed ({exc}); will retry after the next save",
                stacklevel=3,
            )

    # -- restore ------------------------------------------------------------------------------------

    def restore(
        self,
        state: Mapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        only: Iterable[str] | None = None,
        allow_shape_mismatch: bool = False,
        verify_first: bool = False,
    ) -> RestoreResult | None:
        """Load the newest checkpoint that verifies (or ``step``) into ``state``, in place.

        Every file is read once and checked against the manifest's size and crc32c. A checkpoint that
        fails is named in a warning and the previous one is tried. RNG entries are restored after every
        other entry. A restore applies completely or not at all: it is planned first, and every check
        that can refuse it (manifest, drift, names, shapes, optimizer groups, what ``only=`` implies,
        ``resumekit_validate`` hooks) runs on every rank before any object is touched.

        On local disk, a Module's or Optimizer's tensor file that matches its live tensors exactly is
        read straight into them, with the checksum computed in the same pass: no second copy of the
        state in memory and no copy afterwards. The price: if such a file then fails its checksum (bit
        rot between save and restore), those tensors hold unverified bytes until the fallback to the
        previous checkpoint overwrites them; if no checkpoint verifies, the error says which objects to
        re-create. ``verify_first=True`` keeps every object untouched until every byte is verified, at
        the cost of memory for a full copy of the checkpoint's tensors and a copy into the objects.

        Args:
            state: entry name -> object, as given to :meth:`save`.
            step: restore exactly this step (no fallback); None for the newest that verifies.
            strict: when False, entries of ``state`` missing from the checkpoint are left untouched
                (listed in ``RestoreResult.not_restored``) instead of raising.
            only: restore just these entries (e.g. ``["model"]`` for weights only). The optimizer,
                gradient scaler and LR scheduler are restored together or reset together: left out,
                optimizers lose their moments, scalers return to their initial scale, and schedulers
                (pass freshly created ones) are stepped to the checkpoint's position so the learning
                rate equals an uninterrupted run's there. A ``ReduceLROnPlateau`` cannot be moved (its
                rate depends on past metrics): it is left as passed, with a warning.
            allow_shape_mismatch: load every module tensor whose shape fits and keep the model's own
                values for the rest (listed in ``RestoreResult.skipped_tensors``), e.g. after a
                vocabulary grew. By default a mismatch raises before anything is loaded.
            verify_first: verify every file of the checkpoint before any tensor of ``state`` changes,
                even when a checksum fails (see above). Use it to roll a live run back to an earlier
                checkpoint while keeping the live state should every checkpoint turn out corrupt.

        Returns:
            None when the root holds no committed checkpoint (a fresh run), else a :class:`RestoreResult`.

        Raises:
            CheckpointNotFoundError: ``step`` was given and is not committed.
            CheckpointCorruptError: no committed checkpoint verifies (each one's failure is listed).
            StorageError: the store could not be read (after retries); no fallback to an older
                checkpoint happens, since that would silently rewind the run. Tensors being read in
                place may then hold part of the checkpoint (never with ``verify_first=True``).
            UnsupportedFormatError: the checkpoint needs a newer resumekit.
            DriftError: the drift policy rates a change as an error (nothing was loaded).
            StateMismatchError: ``state`` has entries the checkpoint lacks (``strict=True``); a module
                tensor's name or shape differs (names the parameter and both shapes); ``only=`` names
                unknown entries or splits the optimizer/scaler/scheduler group; a scheduler to reset
                has stepped past the checkpoint (nothing was loaded in each case). Also when an
                object's own ``load_state_dict`` raises: the message names the entry and the entries
                already applied, and chains the original exception.
        """
        self.wait()
        world = current_world(self._group)
        entries = live_entries(items_of(state, self.per_rank))
        options = RestoreOptions.of(
            state,
            only,
            strict=strict,
            allow_shape_mismatch=allow_shape_mismatch,
            in_place=not verify_first and positional_reads(self._storage),
        )
        found = read_newest(
            self._storage,
            self.url,
            self._restore_candidates(world, step),
            entries,
            options,
            world,
            lambda m: self._drift(m, world, [e.item for e in entries]),
            exact=step is not None,
        )
        if found is None:
            return None
        plan = found.plan.step
        plan.drift.emit(log, stacklevel=2)
        for message in [
            *map(self._absent_note(plan.step, plan.manifest.world_size, world), plan.absent_rank),
            *found.plan.warnings,
        ]:
            warnings.warn(message, stacklevel=2)
        skipped_tensors = apply_plan(found.plan, found.values, entries, allow_shape_mismatch)
        return RestoreResult(
            step=plan.step,
            url=f"{self.url}/{step_dir(plan.step)}",
            config=plan.manifest.config,
            environment=plan.manifest.environment,
            drift=plan.drift,
            skipped=found.skipped,
            not_restored=plan.not_restored,
            reset=plan.reset,
            skipped_tensors=skipped_tensors,
        )

    def _restore_candidates(self, world: World, step: int | None) -> list[int]:
        """The steps a restore may read, newest last, as rank 0 lists them (every rank the same)."""
        candidates: list[int] = world.broadcast_json(
            self._storage.step_candidates() if world.rank == 0 else None
        )
        if step is None:
            return candidates
        check_step(step)
        if step not in candidates or self._storage.read_manifest(step) is None:
            raise CheckpointNotFoundError(not_committed(step, self.url, self.steps()))
        return [step]

    @staticmethod
    def _absent_note(step: int, saved_world: int, world: World) -> Callable[[str], str]:
        return lambda name: (
            f"resumekit: checkpoint step {step} was saved by {saved_world} rank(s) and has no '{name}' "
            f"record for rank {world.rank}; that entry keeps its current state on this rank."
        )

    def _drift(self, m: Manifest, world: World, items: Iterable[Item]) -> DriftReport:
        current = collect_environment(world_size=world.size, amp_dtype=self.amp_dtype)
        # Always set: a sharded checkpoint restored into plain objects reports its mesh as gone. A
        # checkpoint without the key (unsharded, or older) is not compared.
        current[MESH_KEY] = entry_meshes(items)
        return compare(
            m.environment,
            m.config,
            current,
            self.config,
            self.drift_policy,
            saved_format=m.format_version,
            current_format=current_format(m.format_version),
        )

    # -- context manager ----------------------------------------------------------------------------

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the save in flight (raising its error, if any) and release staging buffers. Idempotent."""
        try:
            self.wait()
        finally:
            self._async.clear()


def _background_group(group: Any, timeout: float | None) -> Any:
    """A gloo group over the ranks of ``group`` (None: the world) for a background save's exchanges,
    so they never interleave with the training thread's collectives on ``group``. Only those ranks
    take part in creating it: a subgroup that saves on its own needs nothing from the other ranks."""
    import torch.distributed as dist

    ranks = None if group is None else dist.get_process_group_ranks(group)
    limit = None if timeout is None else timedelta(seconds=timeout)
    return dist.new_group(
        ranks=ranks, timeout=limit, backend="gloo", use_local_synchronization=ranks is not None
    )
