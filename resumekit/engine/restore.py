"""The restore path: find the newest step that verifies; plan it, read it; every rank agrees twice.

For each candidate step, newest first:

1. read its manifest; :func:`~resumekit.engine.plan.plan_step`; read the plan's facts (skeletons, headers,
   entries read whole); :func:`~resumekit.engine.plan.plan_load`. Nothing live has changed yet.
2. every rank learns every rank's outcome: a refusal or an unreachable store raises on all ranks; a
   corrupt step (any rank) is skipped by all for the previous one.
3. read the remaining tensor files (straight into live tensors where the plan says so), verified.
4. ranks agree again, as in 2.

The caller applies the plan (:mod:`resumekit.engine.apply`) once a step has been read on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from resumekit.drift import DriftReport
from resumekit.engine.collectives import Outcomes, World
from resumekit.engine.live import LiveEntry
from resumekit.engine.plan import Facts, LoadPlan, RestoreOptions, plan_load, plan_step
from resumekit.engine.reader import StepReader
from resumekit.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
)
from resumekit.format.layout import MANIFEST, step_dir
from resumekit.format.manifest import Manifest
from resumekit.storage.base import Storage
from resumekit.storage.verify import step_manifest

__all__ = ["Found", "read_newest"]


@dataclass(frozen=True)
class Found:
    """A step read and verified on every rank, ready to apply."""

    plan: LoadPlan
    values: dict[str, Any]
    skipped: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class _Target:
    storage: Storage
    url: str
    entries: Sequence[LiveEntry]
    options: RestoreOptions
    world: World
    drift_of: Callable[[Manifest], DriftReport]


def read_newest(
    storage: Storage,
    url: str,
    candidates: Sequence[int],
    entries: Sequence[LiveEntry],
    options: RestoreOptions,
    world: World,
    drift_of: Callable[[Manifest], DriftReport],
    *,
    exact: bool,
) -> Found | None:
    """Read the newest of ``candidates`` that verifies on every rank (``exact``: the only one, no
    fallback); None when none is committed.

    Raises:
        CheckpointCorruptError: no committed step verifies (each one's failure listed), or ``exact``
            and it does not.
        StorageError: the store could not be read; no fallback (it would silently rewind the run).
        StateMismatchError, DriftError, UnsupportedFormatError: a refusal, on every rank, before any
            object changed.
    """
    target = _Target(storage, url, entries, options, world, drift_of)
    skipped: list[tuple[int, str]] = []
    touched: list[str] = []  # entries read in place by a candidate that then failed
    for s in reversed(candidates):
        kind, why, found = _read_step(target, s, touched)
        if found is not None:
            return Found(found.plan, found.values, tuple(skipped))
        if kind == "absent":
            continue  # not committed (no manifest): an unfinished write or debris, not a checkpoint
        if exact:
            raise CheckpointCorruptError(
                f"checkpoint step {s} in '{url}' failed verification: {why}" + _touched_note(touched)
            )
        warnings.warn(
            f"resumekit: checkpoint step {s} in '{url}' failed verification and is skipped: {why}. "
            "Falling back to the previous checkpoint.",
            stacklevel=3,
        )
        skipped.append((s, why))
    if skipped:
        listing = "\n".join(f"  step {s}: {why}" for s, why in skipped)
        raise CheckpointCorruptError(
            f"no checkpoint in '{url}' verifies:\n{listing}\n"
            "Inspect them with `resumekit verify URL`; start fresh with a new folder if none can be saved."
            + _touched_note(touched)
        )
    return None


def _read_step(t: _Target, s: int, touched: list[str]) -> tuple[str, str, Found | None]:
    """``(kind, why, found)``: ``kind`` is ``"ok"`` (with the plan and values, ``skipped`` empty),
    ``"absent"`` or ``"corrupt"`` (``why``: what failed verification, on which rank)."""
    with contextlib.ExitStack() as stack:
        staged: tuple[StepReader, Facts, LoadPlan] | None = None
        error: BaseException | None = None
        try:
            staged = _plan(t, s, stack)
        except Exception as exc:
            error = exc
        kind, why = _agree(t, s, error, touched, reading=False)
        if kind != "ok" or staged is None:
            return kind, why, None
        reader, facts, load = staged
        values: dict[str, Any] = {}
        try:
            values = reader.read_values(load, facts, {e.name: e for e in t.entries})
        except Exception as exc:
            error = exc
        touched += reader.touched
        kind, why = _agree(t, s, error, touched, reading=True)
        return kind, why, Found(load, values, ()) if kind == "ok" else None


def _plan(t: _Target, s: int, stack: contextlib.ExitStack) -> tuple[StepReader, Facts, LoadPlan]:
    """Plan step ``s`` and read what its load plan needs; nothing live changes here."""
    m = _manifest(t.storage, t.url, s)
    step = plan_step(m, t.entries, t.options, t.world.rank, t.drift_of(m))
    reader = stack.enter_context(StepReader(t.storage, t.url, step))
    facts = reader.read_facts()
    return reader, facts, plan_load(step, facts, t.entries, t.options)


def _manifest(storage: Storage, url: str, s: int) -> Manifest:
    where = f"{url}/{step_dir(s)}/{MANIFEST}"
    raw = storage.read_manifest(s)
    if raw is None:
        raise _Absent(f"{where} does not exist")
    return step_manifest(raw, s, where)


class _Absent(CheckpointNotFoundError):
    """A candidate step without a manifest: not committed (a write in progress, or debris)."""


def _kind(exc: BaseException) -> str:
    if isinstance(exc, _Absent):
        return "absent"
    if isinstance(exc, (CheckpointCorruptError, UnsafeCheckpointError)):
        return "corrupt"
    if isinstance(exc, StorageError):
        return "io"
    return "refused"  # drift, names, shapes, groups, validate hooks, a newer format


def _agree(
    t: _Target, s: int, error: BaseException | None, touched: list[str], *, reading: bool
) -> tuple[str, str]:
    """Every rank's outcome of one stage (``reading``: the tensor reads, after the plan): raise together
    on I/O failures and refusals; otherwise ``("ok", "")``, ``("absent", "")`` or ``("corrupt", why)``
    when the step failed verification on some rank."""
    kind = _kind(error) if error is not None else "ok"
    out = t.world.gather_outcomes(error, kind)
    # Whatever raises from here on, the user must learn what it left half-read (not only on I/O errors).
    if touched and kind in ("io", "refused") and error is not None and hasattr(error, "add_note"):
        error.add_note(_touched_note(touched).strip())  # Python 3.11+
    out.raise_failures(
        error if kind == "io" else None,
        lambda why: StorageError(f"reading checkpoint step {s} in '{t.url}' failed: {why}"),
        "io",
    )
    out.raise_failures(
        error if kind == "refused" else None,
        lambda why: StateMismatchError(
            f"restoring checkpoint step {s} failed on {why} while its tensors were read; objects read "
            "in place on that rank may hold part of the checkpoint"
            if reading
            else f"restoring checkpoint step {s} was refused on {why}. Nothing was loaded."
        ),
        "refused",
    )
    if out.of("corrupt"):
        return "corrupt", _why(out, error)
    return ("absent", "") if out.of("absent") else ("ok", "")


def _why(out: Outcomes, local: BaseException | None) -> str:
    if not out.distributed:
        return str(local)
    return "; ".join(f"rank {f.rank}: {f.message}" for f in out.of("corrupt"))


def _touched_note(touched: list[str]) -> str:
    """What a failed restore left in objects it read into in place ("" when none)."""
    if not touched:
        return ""
    names = ", ".join(sorted(set(touched)))
    return (
        f"\nThe tensors of {names} were being read in place and may hold part of a checkpoint: re-create "
        "these objects before using them (restore with verify_first=True to keep them untouched on failure)."
    )
