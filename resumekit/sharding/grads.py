"""Gradients FSDP2 holds outside ``.grad``, which no checkpoint of ``.grad`` can carry.

Micro-batches run with ``set_requires_gradient_sync(False)`` leave their gradients unsharded inside
FSDP2's own parameter state until a synchronising backward reduce-scatters them into the ``.grad``
shards. :class:`~resumekit.AccumulatedGradients` refuses to save while any are held there, rather than
silently save an accumulation window without them.
"""

from __future__ import annotations

import torch

__all__ = ["unsynced_fsdp_grads"]


def unsynced_fsdp_grads(model: torch.nn.Module) -> list[str]:
    """Names of the FSDP2 modules of ``model`` that hold gradients outside ``.grad``.

    Best effort over FSDP2's internals: empty where they differ (an older or newer torch).
    """
    held: list[str] = []
    for name, module in model.named_modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        try:
            group = get_state()._fsdp_param_group
            params = list(group.fsdp_params) if group is not None else []
        except Exception:  # not an FSDP2 module after all, or internals moved
            continue
        for fp in params:
            unsharded = getattr(fp, "_unsharded_param", None)
            if getattr(fp, "unsharded_accumulated_grad", None) is not None or (
                unsharded is not None and unsharded.grad is not None
            ):
                held.append(name or "<root>")
                break
    return held
