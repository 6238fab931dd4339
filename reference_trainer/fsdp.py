"""``--fsdp``: the encoder sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank holds a shard of every parameter, gradient and AdamW moment; a layer's full weights exist only
while it runs. The training state is checkpointed the usual way: resumekit saves each rank's own shards
and restores them at any world size (see docs/sharded.md). Only the final export is gathered whole.

Why nothing else in the loop changes: the embeddings an FSDP2 module returns are ordinary per-rank
tensors, exactly as under DDP, so the gathered pairwise loss (:mod:`reference_trainer.loss`) still
covers every pair of the global micro-batch; and FSDP2 averages gradients over ranks (reduce-scatter,
divided by the world size) as DDP's all-reduce does, so the loss needs no extra factor either.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from reference_trainer.devices import Placement

__all__ = ["export_state_dict", "shard_model"]


def shard_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over every rank: one unit per block, then the root.

    A block is a ``Linear`` with the ``LayerNorm`` that follows it (they run together, so their
    parameters are gathered together); the root unit holds whatever is left (the last ``Linear``).
    Every rank must call this with the same model (same seed): the shards are cut from each rank's
    own full copy.

    Args:
        model: The bare model, already on ``placement.device``; its parameters become DTensors.
        placement: An ``"fsdp"`` placement (process group joined).

    Returns:
        ``model`` itself, now an FSDP2 module (same parameter names, no prefix).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(placement.device.type, (placement.world_size,), mesh_dim_names=("dp",))
    layers = list(getattr(model, "layers", []))
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear) or i == len(layers) - 1:
            continue
        block: list[nn.Module] = [layer]
        if i + 1 < len(layers) and isinstance(layers[i + 1], nn.LayerNorm):
            block.append(layers[i + 1])
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def export_state_dict(model: nn.Module, placement: Placement) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights on the CPU, for the final export.

    Under ``--fsdp`` this is a collective: every rank must call it. The full tensors are gathered with
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, which hands them to rank 0 only
    (the other ranks get an empty dict and write nothing). Elsewhere it is ``model.state_dict()``.

    Args:
        model: The bare model (sharded in place under ``--fsdp``).
        placement: Where training runs.

    Returns:
        Parameter and buffer name -> tensor (empty on ranks other than 0 under ``--fsdp``).
    """
    if placement.mode != "fsdp":
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full: dict[str, torch.Tensor] = cast(
        dict[str, torch.Tensor], get_model_state_dict(model, options=options)
    )
    return full
