"""The :class:`~resumekit.ResumableSampler` record: check a saved one before anything is applied."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resumekit.errors import StateMismatchError

__all__ = ["validated"]

_ORDER_KINDS = ("torch", "random-access")
# Flags about the loop that produced the record; absent from records written before they existed.
_OPTIONAL_BOOLS = ("in_iteration", "counts_prefetch")
_OPTIONAL_INTS = ("open_iterator", "unwrapped_workers")


def _per_rank_count(remaining: int, num_replicas: int, drop_last: bool) -> int:
    return remaining // num_replicas if drop_last else -(-remaining // num_replicas)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, bool)):
        value = value.item()  # numpy scalars after a round trip through storage
    return value


def validated(state_dict: Any) -> dict[str, Any]:
    """Check a saved sampler record's keys, types and invariants; return it with plain Python values."""
    if not isinstance(state_dict, Mapping):
        raise StateMismatchError(
            f"ResumableSampler.load_state_dict: expected a dict, got {type(state_dict).__name__}"
        )
    ints = ("seed", "epoch", "consumed", "partition_start", "dataset_length", "num_replicas")
    bools = ("shuffle", "drop_last")
    defaults: dict[str, Any] = {**dict.fromkeys(_OPTIONAL_BOOLS, False), **dict.fromkeys(_OPTIONAL_INTS, 0)}
    out: dict[str, Any] = {}
    for key in (*ints, *_OPTIONAL_INTS, *bools, *_OPTIONAL_BOOLS):
        if key not in state_dict and key not in defaults:
            raise StateMismatchError(
                f"ResumableSampler record has no {key!r} (keys: {sorted(state_dict)}); it was not written by "
                "ResumableSampler.state_dict()"
            )
        value = _plain(state_dict.get(key, defaults.get(key)))
        if key in bools or key in _OPTIONAL_BOOLS:
            if not isinstance(value, (bool, int)):
                raise StateMismatchError(f"ResumableSampler record: {key!r} must be a bool, got {value!r}")
            out[key] = bool(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise StateMismatchError(f"ResumableSampler record: {key!r} must be an int, got {value!r}")
            out[key] = int(value)
    order = state_dict.get("order", "torch")  # records from before order kinds were all "torch"
    if not isinstance(order, str) or order not in _ORDER_KINDS:
        raise StateMismatchError(
            f"ResumableSampler record: 'order' must be one of {_ORDER_KINDS}, got {order!r}; corrupt record "
            "or written by a newer resumekit"
        )
    out["order"] = str(order)
    if (
        out["num_replicas"] < 1
        or out["dataset_length"] < 0
        or out["unwrapped_workers"] < 0
        or out["open_iterator"] not in (0, 1, 2)
    ):
        raise StateMismatchError(
            f"ResumableSampler record: num_replicas={out['num_replicas']}, dataset_length="
            f"{out['dataset_length']} or unwrapped_workers={out['unwrapped_workers']} is out of range; corrupt "
            "record"
        )
    start, consumed, w = out["partition_start"], out["consumed"], out["num_replicas"]
    count = _per_rank_count(max(0, out["dataset_length"] - start), w, out["drop_last"])
    if not 0 <= start <= consumed or (consumed - start) % w or consumed > start + count * w:
        raise StateMismatchError(
            f"ResumableSampler record: position {consumed} does not lie on a step of {w} samples inside the "
            f"partition starting at {start} (length {out['dataset_length']}); corrupt record"
        )
    return out
