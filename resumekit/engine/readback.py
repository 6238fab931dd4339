"""Opt-in read-back of a checkpoint just committed (``Checkpointer(..., verify_after_save=True)``).

Save already refuses every state the format cannot restore (the skeleton is decoded at save time), so
this guards against what happens after the bytes leave the process: a storage layer that acknowledges
writes it then loses or alters (a faulty disk or controller, a misbehaving object-store proxy, a
filesystem bug). The step is read back exactly as ``restore()`` reads it, by the same planner and
reader, on every rank (each rank its own files and the replicated ones), into new memory: the user's
objects are never touched. Retention, which runs after this, then never deletes older checkpoints in
favour of one that does not read back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from resumekit.drift import DriftReport
from resumekit.engine.collectives import World
from resumekit.engine.entries import Item
from resumekit.engine.live import live_entries
from resumekit.engine.plan import RestoreOptions
from resumekit.engine.restore import read_newest
from resumekit.errors import CheckpointCorruptError
from resumekit.format.layout import step_dir
from resumekit.format.manifest import Manifest
from resumekit.storage.base import Storage

__all__ = ["verify_committed"]


def verify_committed(
    storage: Storage,
    url: str,
    step: int,
    items: Sequence[Item],
    world: World,
    drift_of: Callable[[Manifest], DriftReport],
) -> None:
    """Read ``step`` back on every rank and decode it; every rank of ``world`` calls this together.

    Raises:
        CheckpointCorruptError: on every rank, when the step does not read back on some rank; it stays
            on storage (restore would skip it for the previous one), and retention has not run.
        StorageError: the read-back itself failed (I/O).
    """
    options = RestoreOptions(chosen=frozenset(it.name for it in items), strict=True, in_place=False)
    try:
        found = read_newest(storage, url, [step], live_entries(items), options, world, drift_of, exact=True)
        error = None if found is not None else "its manifest is not there"
    except CheckpointCorruptError as exc:
        error = str(exc)
    if error:
        raise CheckpointCorruptError(
            f"checkpoint step {step} in '{url}/{step_dir(step)}' was committed but does not read back "
            f"({error}). The storage lost or altered bytes after acknowledging them. Retention did not "
            "run, so earlier checkpoints are intact; restore() skips this step for the previous one. "
            "Check the storage, then delete the step (or save the next one)."
        )
