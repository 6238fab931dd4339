"""This rank's box (offsets and sizes in the global tensor) of a DTensor's local shard, computed once
per layout.

DCP computes it (``DTensor.__create_chunk_list__``) in about 90 us a tensor; it is a pure function of
the global shape, the mesh and the placements on a given rank, and a model's parameters and optimizer
moments share a few layouts. Saves and restores ask for it once per tensor and call.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["own_box"]

#: mesh -> (global shape, placements) -> box (None: not one box).
_BOXES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def own_box(dv: Any) -> Any:
    """DCP's own chunk (``ChunkStorageMetadata``) of this rank for the DTensor ``dv``, as its planner
    computes it; None when the local shard is not one box."""
    layouts = _BOXES.setdefault(dv.device_mesh, {})
    key = (tuple(dv.shape), tuple(dv.placements))
    if key not in layouts:
        boxes = dv.__create_chunk_list__()
        layouts[key] = boxes[0] if len(boxes) == 1 else None
    return layouts[key]
