"""The Checkpointer: save training state atomically, restore the newest checkpoint that verifies."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import _retention
from ._async import BackgroundSave, StagingPool
from ._dist import World, current_world
from ._entries import Item, check_step, items_of
from ._env import collect_environment, resumekit_version
from ._manifest import FORMAT_VERSION, SCOPE_RANK, Entry, FileRecord, Manifest, step_dir
from ._partial import check_only, optimisation_group, reset_group, scheduler_position
from ._restore import Loaded, apply_entry, load_step
from ._save import Snapshot, take_snapshot, write
from ._shapes import check_keys, check_param_groups, check_shapes
from ._storage import Storage, open_storage
from .drift import DriftPolicy, DriftReport, compare
from .errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    StorageError,
    UnsafeCheckpointError,
)

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
        self._storage: Storage = open_storage(url, storage_options)
        self.url = self._storage.url
        self._staging = StagingPool()
        self._inflight: BackgroundSave | None = None
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

    def save_async(self, state: Mapping[str, Any], *, step: int) -> None:
        """Start saving ``state`` as checkpoint ``step`` in the background, and return.

        The call blocks only while tensors are copied into host staging buffers (reused across saves,
        pinned for CUDA tensors); the checkpoint holds the values at the moment of the call, so training
        may change the parameters as soon as this returns. A background thread then serialises,
        checksums and commits exactly as :meth:`save` does.

        At most one save is in flight: a second call (or :meth:`save`, :meth:`restore`) first waits for
        the previous one. An error of a background save is raised by the next ``save``/``save_async``,
        :meth:`wait` or :meth:`close` — never lost. At interpreter exit an in-flight save is finished; a
        process killed mid-save leaves it invisible (the commit protocol). Staging needs host memory
        equal to the state's tensors.

        Under torch.distributed every rank must call this together; the background thread talks over a
        separate gloo group created on the first call, so it never interleaves with training collectives.
        """
        self.wait()
        world = current_world(self._group)
        if world.distributed and self._async_world is None:
            import torch.distributed as dist

            self._async_world = World(world.rank, world.size, dist.new_group(backend="gloo"))
        snap = take_snapshot(self._storage, self.url, state, step, world, self._staging, self.per_rank)
        if self._async_world is not None:
            snap.world = self._async_world
        self._inflight = BackgroundSave(lambda: self._write(snap))
        if not self._atexit_registered:
            atexit.register(self._finish_at_exit)
            self._atexit_registered = True

    def wait(self) -> CheckpointInfo | None:
        """Wait for the in-flight :meth:`save_async`, if any; return what it committed.

        Raises:
            Whatever the background save raised (StorageError, StepExistsError, ...).
        """
        inflight, self._inflight = self._inflight, None
        return inflight.result() if inflight is not None else None

    def _finish_at_exit(self) -> None:
        if self._inflight is not None:
            try:
                self.wait()
            except Exception as exc:
                print(f"resumekit: the background save did not commit: {exc}", file=sys.stderr)

    def _write(self, snap: Snapshot) -> CheckpointInfo:
        """Write and commit a snapshot, then apply retention (rank 0)."""
        nbytes = write(
            self._storage,
            snap,
            lambda prefix, files: self._manifest(
                snap.step, snap.writer, prefix, snap.items, files, snap.world
            ),
        )
        if snap.world.rank == 0:
            self._retain()
        url = f"{self.url}/{step_dir(snap.step)}"
        return CheckpointInfo(snap.step, url, nbytes, time.perf_counter() - snap.t0)

    def _manifest(
        self,
        step: int,
        writer: str,
        data_prefix: str,
        items: list[Item],
        files: dict[str, FileRecord],
        world: World,
    ) -> Manifest:
        entries = {
            it.name: Entry(
                scope=it.scope,
                kind=it.kind,
                ranks=tuple(range(world.size)) if it.scope == SCOPE_RANK else (0,),
            )
            for it in items
        }
        return Manifest(
            step=step,
            writer_id=writer,
            world_size=world.size,
            entries=entries,
            files=files,
            environment=collect_environment(world_size=world.size, amp_dtype=self.amp_dtype),
            config=self.config,
            created_unix=time.time(),
            resumekit_version=resumekit_version(),
            data_prefix=data_prefix,
        )

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
        other entry. Every check that can refuse a checkpoint (manifest, drift, names, shapes, dtypes,
        ``resumekit_validate`` hooks) runs before any object is touched.

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
                rate equals an uninterrupted run's there.
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
            StateMismatchError: ``state`` has entries the checkpoint lacks (``strict=True``), or a
                module tensor's shape differs (names the parameter and both shapes).
            ValueError: ``only=`` splits the optimizer/scaler/scheduler group.
        """
        self.wait()
        items = items_of(state, self.per_rank)
        chosen = check_only(state, only) if only is not None else frozenset(state)
        group_reset = [n for n in optimisation_group(state) if n not in chosen]
        # A reset scheduler is moved to its saved position, so its saved state is read (not loaded).
        wanted = [it for it in items if it.name in chosen or it.name in group_reset]
        world = current_world(self._group)
        candidates: list[int] = world.broadcast_json(
            self._storage.step_candidates() if world.rank == 0 else None
        )
        if step is not None:
            check_step(step)
            if step not in candidates or self._storage.read_manifest(step) is None:
                raise CheckpointNotFoundError(
                    f"step {step} is not a committed checkpoint in '{self.url}'; committed steps: {self.steps()}"
                )
            candidates = [step]

        # Reading straight into live tensors skips a copy and fresh memory (on some machines as costly
        # as the disk read). It is done only when every check that runs after the read would pass
        # (drift, validate hooks, exact names and shapes), so a refused restore still changes nothing.
        drift_reports: dict[int, DriftReport] = {}

        def drift(m: Manifest) -> DriftReport:  # computed once per candidate step
            if m.step not in drift_reports:
                drift_reports[m.step] = self._drift(m, world)
            return drift_reports[m.step]

        def in_place(m: Manifest, values: Mapping[str, Any]) -> frozenset[str]:
            if allow_shape_mismatch or drift(m).errors:
                return frozenset()
            for it in items:
                validate = getattr(it.obj, "resumekit_validate", None)
                if it.name in chosen and callable(validate):
                    if it.name not in values:
                        return frozenset()
                    try:
                        validate(values[it.name])
                    except Exception:  # raised again below, before anything is touched
                        return frozenset()
            return frozenset(
                it.name
                for it in items
                if it.name in chosen and not callable(getattr(it.obj, "resumekit_validate", None))
            )

        skipped: list[tuple[int, str]] = []
        loaded: Loaded | None = None
        touched: list[str] = []  # entries read in place by a candidate that then failed
        for s in reversed(candidates):
            result: Loaded | None = None
            reason, io_error = "", ""
            local_io: StorageError | None = None
            try:
                result = load_step(
                    self._storage,
                    self.url,
                    s,
                    wanted,
                    world,
                    strict,
                    None if verify_first else in_place,
                    touched,
                )
            except (CheckpointCorruptError, UnsafeCheckpointError) as exc:
                reason = str(exc)
            except StorageError as exc:
                # The store is unreachable, not the checkpoint corrupt: falling back would silently
                # rewind the run (and its next save of a newer step would collide). Raise instead.
                io_error, local_io = str(exc), exc
            reports = world.all_gather_json([reason, io_error])
            failed_io = [f"rank {r}: {io}" for r, (_, io) in enumerate(reports) if io]
            if failed_io:
                if local_io is not None:
                    if touched and hasattr(local_io, "add_note"):  # Python 3.11+
                        local_io.add_note(_touched_note(touched).strip())
                    raise local_io
                raise StorageError(
                    f"reading checkpoint step {s} in '{self.url}' failed: {'; '.join(failed_io)}"
                )
            bad = [
                f"rank {r}: {msg}" if world.distributed else msg for r, (msg, _) in enumerate(reports) if msg
            ]
            if not bad and result is None:
                continue  # not committed (no manifest): an unfinished write or debris, not a checkpoint
            if not bad and result is not None:
                loaded = result
                break
            why = "; ".join(bad)
            if step is not None:
                raise CheckpointCorruptError(
                    f"checkpoint step {s} in '{self.url}' failed verification: {why}" + _touched_note(touched)
                )
            warnings.warn(
                f"resumekit: checkpoint step {s} in '{self.url}' failed verification and is skipped: {why}. "
                "Falling back to the previous checkpoint.",
                stacklevel=2,
            )
            skipped.append((s, why))
        if loaded is None:
            if skipped:
                listing = "\n".join(f"  step {s}: {why}" for s, why in skipped)
                raise CheckpointCorruptError(
                    f"no checkpoint in '{self.url}' verifies:\n{listing}\n"
                    "Inspect them with `resumekit verify URL`; start fresh with a new folder if none can be saved."
                    + _touched_note(touched)
                )
            return None
        m = loaded.manifest
        report = drift(m)
        report.raise_for_errors()  # before any object is touched
        report.emit(log, stacklevel=2)
        for name in loaded.absent_rank:
            warnings.warn(
                f"resumekit: checkpoint step {m.step} was saved by {m.world_size} rank(s) and has no '{name}' "
                f"record for rank {world.rank}; that entry keeps its current state on this rank.",
                stacklevel=2,
            )
        values = {n: v for n, v in loaded.values.items() if n in chosen}
        # Every check runs before any object is touched: a refused restore changes nothing.
        for it in items:
            if it.name not in values:
                continue
            if isinstance(it.obj, torch.nn.Module) and not allow_shape_mismatch:
                check_shapes(
                    values[it.name], it.obj, entry=it.name, fix="restore(..., allow_shape_mismatch=True)"
                )
                check_keys(values[it.name], it.obj, entry=it.name)
            if isinstance(it.obj, torch.optim.Optimizer):
                check_param_groups(values[it.name], it.obj, entry=it.name)
            validate = getattr(it.obj, "resumekit_validate", None)
            if callable(validate):
                validate(values[it.name])
        skipped_tensors: list[str] = []
        # Order: every other entry, then the group reset, then RNG last (nothing after it draws).
        ordered = [it for it in items if not it.last] + [it for it in items if it.last]
        for i, it in enumerate(ordered):
            if it.last and (i == 0 or not ordered[i - 1].last):
                self._reset(state, group_reset, loaded)
            if it.name in values:
                skipped_tensors.extend(apply_entry(it, values[it.name], allow_shape_mismatch))
        if not any(it.last for it in ordered):
            self._reset(state, group_reset, loaded)
        not_restored = tuple(
            it.name
            for it in items
            if it.name not in loaded.values and it.name not in loaded.absent_rank and it.name in chosen
        )
        return RestoreResult(
            step=m.step,
            url=f"{self.url}/{step_dir(m.step)}",
            config=m.config,
            environment=m.environment,
            drift=report,
            skipped=tuple(skipped),
            not_restored=not_restored,
            reset=tuple(group_reset),
            skipped_tensors=tuple(skipped_tensors),
        )

    def _drift(self, m: Manifest, world: World) -> DriftReport:
        return compare(
            m.environment,
            m.config,
            collect_environment(world_size=world.size, amp_dtype=self.amp_dtype),
            self.config,
            self.drift_policy,
            saved_format=m.format_version,
            current_format=FORMAT_VERSION,
        )

    @staticmethod
    def _reset(state: Mapping[str, Any], group: list[str], loaded: Loaded) -> None:
        if group:
            reset_group(state, group, {n: scheduler_position(loaded.values.get(n, {})) for n in group})

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
            self._staging.clear()


def _touched_note(touched: list[str]) -> str:
    """What a failed restore left in objects it read into in place ("" when none)."""
    if not touched:
        return ""
    names = ", ".join(sorted(set(touched)))
    return (
        f"\nThe tensors of {names} were being read in place and may hold part of a checkpoint: re-create "
        "these objects before using them (restore with verify_first=True to keep them untouched on failure)."
    )
