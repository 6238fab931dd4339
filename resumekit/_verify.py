"""Opt-in read-back of a checkpoint just committed (``Checkpointer(..., verify_after_save=True)``).

Save already refuses every state the format cannot restore (the skeleton is decoded at save time), so
this guards against what happens after the bytes leave the process: a storage layer that acknowledges
writes it then loses or alters (a faulty disk or controller, a misbehaving object-store proxy, a
filesystem bug). The step is read back exactly as ``restore()`` reads it (manifest, every file's size
and crc32c, every header and skeleton decoded), without touching the user's objects; retention, which
runs after this, then never deletes older checkpoints in favour of one that does not read back.
"""

from __future__ import annotations

from ._dist import World
from ._entries import Item, describe
from ._manifest import step_dir
from ._restore import load_step
from ._storage import Storage
from .errors import CheckpointCorruptError, StorageError

__all__ = ["verify_committed"]


def verify_committed(storage: Storage, url: str, step: int, items: list[Item], world: World) -> None:
    """Read ``step`` back on rank 0 (its replicated entries and its own per-rank ones) and decode it.

    Every rank of ``world`` must call this together; all raise together.

    Raises:
        CheckpointCorruptError: the step does not read back; it stays on storage (restore would skip
            it for the previous one), and retention has not run.
        StorageError: the read-back itself failed (I/O).
    """
    error: str | None = None
    if world.rank == 0:
        try:
            loaded = load_step(storage, url, step, items, world, strict=True)
            if loaded is None:
                raise CheckpointCorruptError("its manifest is not there")
        except (CheckpointCorruptError, StorageError, ValueError, OSError) as exc:
            error = describe(exc)
    error = world.broadcast_json(error)
    if error:
        raise CheckpointCorruptError(
            f"checkpoint step {step} in '{url}/{step_dir(step)}' was committed but does not read back "
            f"({error}). The storage lost or altered bytes after acknowledging them. Retention did not "
            "run, so earlier checkpoints are intact; restore() skips this step for the previous one. "
            "Check the storage, then delete the step (or save the next one)."
        )
