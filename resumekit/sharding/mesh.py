"""The device mesh of each sharded entry, as the environment records it for drift.

A sharded checkpoint records, under the environment key ``mesh``, the mesh every sharded entry's
DTensors live on: ``{"model": {"shape": [2, 2], "dim_names": ["dp", "tp"]}, ...}`` (lists, so the
order of the dimensions survives the manifest's sorted keys). A restore compares it with the mesh of
the live entries it loads into (drift key ``env.mesh``): restore reshards, so a different mesh is a
warning by default, never an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from resumekit.engine.entries import Item
from resumekit.format.manifest import SCOPE_SHARDED
from resumekit.sharding.shards import dtensor_type

__all__ = ["MESH_KEY", "entry_meshes", "mesh_of"]

#: The environment key that holds the sharded entries' meshes.
MESH_KEY = "mesh"


def mesh_of(obj: Any) -> dict[str, Any] | None:
    """The mesh of the first DTensor of a Module (parameters, then buffers) or an Optimizer's
    parameters, as ``{"shape": [...], "dim_names": [...]}`` (names empty for an unnamed mesh); None
    when ``obj`` holds no DTensor."""
    dt = dtensor_type()
    if dt is None:
        return None
    if isinstance(obj, torch.nn.Module):
        tensors: Iterable[Any] = (*obj.parameters(), *obj.buffers())
    elif isinstance(obj, torch.optim.Optimizer):
        tensors = (p for g in obj.param_groups for p in g["params"])
    else:
        return None
    for t in tensors:
        if isinstance(t, dt):
            mesh = t.device_mesh
            return {"shape": [int(s) for s in mesh.shape], "dim_names": list(mesh.mesh_dim_names or ())}
    return None


def entry_meshes(items: Iterable[Item]) -> dict[str, dict[str, Any]]:
    """Entry name -> its mesh, for every sharded entry of ``items`` (empty when none is sharded)."""
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        if it.scope == SCOPE_SHARDED:
            mesh = mesh_of(it.obj)
            if mesh is not None:
                out[it.name] = mesh
    return out
