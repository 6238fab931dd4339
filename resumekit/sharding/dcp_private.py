"""The two private helpers of torch.distributed.checkpoint that resumekit's sharding uses, in one place.

DCP's resharding arithmetic (which region of which saved chunk lands where in a target shard) and its
mapping of parameter names through wrappers are not public API. resumekit uses them rather than
re-deriving them (issue 13), and imports them only here, so a torch release that moves them fails in
one place with a message that says what to do, instead of an ImportError deep inside a restore.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_read_items", "create_read_items_for_chunks", "get_fqns"]


def _missing(name: str, exc: Exception) -> ImportError:
    import torch

    return ImportError(
        f"resumekit's sharded state needs torch.distributed.checkpoint's {name}, which torch "
        f"{torch.__version__} does not provide ({exc}). Sharded (FSDP2 / DTensor) checkpoints are tested "
        "with torch 2.13; install a torch version in that range, or save a full state dict instead."
    )


def create_read_items(fqn: str, md: Any, obj: Any) -> Any:
    """``planner_helpers._create_read_items``: the reads that fill ``obj`` (a target shard) from the
    saved chunks described by ``md``."""
    try:
        from torch.distributed.checkpoint.planner_helpers import _create_read_items
    except ImportError as exc:  # pragma: no cover - depends on the torch release
        raise _missing("planner_helpers._create_read_items", exc) from exc
    return _create_read_items(fqn, md, obj)


def create_read_items_for_chunks(fqn: str, md: Any, chunks: Any) -> Any:
    """``planner_helpers.create_read_items_for_chunk_list``: the reads that fill the target chunks
    ``chunks`` (this rank's boxes) from the saved chunks described by ``md``."""
    try:
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    except ImportError as exc:  # pragma: no cover - depends on the torch release
        raise _missing("planner_helpers.create_read_items_for_chunk_list", exc) from exc
    return create_read_items_for_chunk_list(fqn, md, chunks)


def get_fqns(model: Any, name: str) -> Any:
    """``state_dict._get_fqns``: the fully qualified names a (wrapped) parameter name stands for."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError as exc:  # pragma: no cover - depends on the torch release
        raise _missing("state_dict._get_fqns", exc) from exc
    return _get_fqns(model, name)
