"""Sharded entries on the restore path: reassemble each rank's target shards from the saved chunks.

The target layout is the live object's own: its DTensors (FSDP2, tensor parallel, any mesh, any world
size) or plain tensors (a model in one process, with no process group). DCP's planner helper computes
which region of which saved chunk lands where in each target shard (the resharding arithmetic); the
bytes come from resumekit's own files, each verified against the manifest's crc32c before use. Nothing
here is collective: each rank reads what its shards overlap, and the caller gathers every rank's
outcome so all ranks accept or reject a step together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resumekit.engine.entries import Item
from resumekit.errors import CheckpointCorruptError, StateMismatchError
from resumekit.format.codec import decode
from resumekit.format.manifest import Manifest
from resumekit.format.tensorfile import ST_TO_DTYPE
from resumekit.sharding.boxes import own_box
from resumekit.sharding.chunkfiles import ChunkRead, ShardFiles, narrow
from resumekit.sharding.dcp_private import create_read_items, create_read_items_for_chunks
from resumekit.sharding.metadata import ShardingMeta, TensorRecord
from resumekit.sharding.shards import dtensor_type, owning_module, param_fqns

__all__ = ["ShardFiles", "ShardedValue", "check_sharded", "read_meta", "read_sharded"]


@dataclass
class ShardedValue:
    """A sharded entry read and verified for this rank, in the live object's layout (not yet applied)."""

    entry: str
    meta: ShardingMeta
    state: dict[str, Any]
    model: torch.nn.Module | None = None  # an optimizer's model (its state is keyed by parameter names)

    def apply(self, obj: Any) -> None:
        """Load into ``obj`` with DCP's state-dict helpers (every check already passed)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, self.state, options=StateDictOptions(strict=True))
        else:
            if self.model is None:  # read_sharded sets it for every optimizer
                raise StateMismatchError(f"sharded optimizer entry '{self.entry}' has no model")
            if not any(k.startswith("state.") for k in self.state):
                _apply_unstepped(obj, self.model, self.state)
                return
            opts = StateDictOptions(flatten_optimizer_state_dict=True)
            set_optimizer_state_dict(self.model, obj, self.state, options=opts)


def _apply_unstepped(opt: torch.optim.Optimizer, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load an optimizer saved before its first step: its options, and no per-parameter state.

    The mirror of the save side's ``param_group_values``: DCP's loader would first step the optimizer
    to create its state (a first Adam step would then be its second) and then fails to unflatten a
    state without ``state.*`` keys, so this is done here. ``check_sharded`` already matched every
    parameter name against the live optimizer.
    """
    fqns = param_fqns(model)
    for group in opt.param_groups:
        for p in group["params"]:
            for k in group:
                key = f"param_groups.{fqns[id(p)]}.{k}"
                if k != "params" and key in state:
                    group[k] = state[key]
    opt.state.clear()  # the saved optimizer had not stepped: no moments, no step count


def read_meta(raw: bytes, where: str, m: Manifest) -> ShardingMeta:
    """An entry's sharding metadata (its file's verified bytes), validated against the manifest."""
    prefix = m.data_prefix
    known = {p[len(prefix) :]: r for p, r in m.files.items() if p.startswith(prefix)}
    return ShardingMeta.from_json(raw, where, known)


def _targets(name: str, meta: ShardingMeta, obj: Any, items: Sequence[Item]) -> _Targets:
    """Each saved tensor's live counterpart (None: read whole into new memory), after checking every
    name, shape and dtype against ``obj``; pure, so a refusal changes nothing."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    likes: dict[str, Any] = {}
    if isinstance(obj, torch.nn.Module):
        live: dict[str, Any] = dict(get_model_state_dict(obj))
        _check_names(name, set(meta.tensors) | set(meta.values), set(live))
        for k, rec in meta.tensors.items():
            likes[k] = _check_like(name, k, rec, live[k], exact_dtype=True)
        return _Targets(likes, None, True)
    if isinstance(obj, torch.optim.Optimizer):
        model = owning_module(obj, name, items)
        params: dict[str, Any] = dict(get_model_state_dict(model))
        fqns = param_fqns(model)
        _check_optimizer_params(name, meta, {fqns[id(p)] for g in obj.param_groups for p in g["params"]})
        for k, rec in meta.tensors.items():
            param = params.get(k[len("state.") :].rsplit(".", 1)[0]) if k.startswith("state.") else None
            like = param if param is not None and tuple(param.shape) == rec.shape else None
            likes[k] = _check_like(name, k, rec, like, exact_dtype=False)
        return _Targets(likes, model, False)
    raise StateMismatchError(
        f"checkpoint entry '{name}' is sharded; restore it into a Module or Optimizer, not a "
        f"{type(obj).__name__}"
    )


@dataclass(frozen=True)
class _Targets:
    likes: dict[str, Any]
    model: torch.nn.Module | None
    exact_dtype: bool


def check_sharded(name: str, meta: ShardingMeta, obj: Any, items: Sequence[Item]) -> None:
    """Every check that can refuse restoring sharded entry ``name`` into ``obj``, without reading shards.

    Raises:
        StateMismatchError: names, shapes or dtypes differ from the live object (names them), or the
            object is not a Module or Optimizer.
        UnsupportedValueError: a sharded optimizer without its model in the state.
        CheckpointCorruptError: a tensor of unknown dtype.
    """
    _targets(name, meta, obj, items)


def read_sharded(
    files: ShardFiles, name: str, meta: ShardingMeta, obj: Any, items: Sequence[Item]
) -> ShardedValue:
    """Read sharded entry ``name`` into fresh tensors laid out like ``obj``'s: only the chunks this
    rank's shards overlap, each verified.

    Raises:
        CheckpointCorruptError: a file fails its checksum, or the metadata is inconsistent.
        StateMismatchError: names, shapes or dtypes differ from the live object (names them).
    """
    t = _targets(name, meta, obj, items)
    state: dict[str, Any] = {}
    reads: list[ChunkRead] = []
    # Fresh tensors filled by copies: nothing here is differentiated, and without autograd DTensor's
    # to_local/from_local skip building graph nodes (a measurable share of a restore's CPU time).
    with torch.no_grad():
        for k, rec in meta.tensors.items():
            state[k] = _plan_rebuild(files.where, name, k, rec, t.likes[k], reads, exact_dtype=t.exact_dtype)
        # One pass over every chunk of the entry, in file order, each read once and verified.
        files.fill(reads)
    for k, v in meta.values.items():
        state[k] = decode(v, _no_tensor, f"{name}.{k}")
    return ShardedValue(name, meta, state, t.model)


def _check_names(entry: str, saved: set[str], live: set[str]) -> None:
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    if missing or unexpected:
        raise StateMismatchError(
            f"sharded entry '{entry}': the checkpoint's names differ from the model's (missing from the "
            f"checkpoint: {missing[:10]}; not in the model: {unexpected[:10]}). Restore into the model the "
            "checkpoint was saved from."
        )


def _check_optimizer_params(entry: str, meta: ShardingMeta, live: set[str]) -> None:
    saved = {
        k[len("param_groups.") :].rsplit(".", 1)[0] for k in meta.values if k.startswith("param_groups.")
    }
    if saved != live:
        raise StateMismatchError(
            f"sharded optimizer entry '{entry}': the checkpoint holds state for parameters "
            f"{sorted(saved - live)[:10]} the optimizer lacks, and lacks {sorted(live - saved)[:10]}. "
            "Create the optimizer over the same parameters as the run that saved it."
        )


def _plan_rebuild(
    where: str,
    entry: str,
    key: str,
    rec: TensorRecord,
    like: Any,
    reads: list[ChunkRead],
    exact_dtype: bool = True,
) -> torch.Tensor:
    """A fresh tensor laid out like ``like`` (a DTensor, a plain tensor, or None: the whole tensor on
    the CPU) for the saved values of ``key``; appends to ``reads`` the regions of the saved chunks it
    overlaps, which fill it exactly (checked here, before any byte is read)."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    dtype = _dtype(entry, key, rec)
    dt = dtensor_type()
    if like is not None and dt is not None and isinstance(like, dt):
        dlike: Any = like
        local_like = dlike.to_local()
        local = torch.empty(local_like.shape, dtype=dtype, device=local_like.device)
        target: torch.Tensor = dt.from_local(
            local,
            dlike.device_mesh,
            dlike.placements,
            run_check=False,
            shape=dlike.shape,
            stride=dlike.stride(),
        )
    else:
        device = like.device if like is not None else torch.device("cpu")
        local = torch.empty(rec.shape, dtype=dtype, device=device)
        target = local
    if sum(_volume(c.sizes) for c in rec.chunks) != _volume(rec.shape):
        raise CheckpointCorruptError(
            f"{where}: the saved chunks of '{entry}.{key}' do not tile its shape {list(rec.shape)}"
        )
    md = TensorStorageMetadata(
        TensorProperties(dtype=dtype),
        torch.Size(rec.shape),
        [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in rec.chunks],
    )
    if target is local:  # a plain tensor: one box, the whole of it
        boxes: Any = [ChunkStorageMetadata(torch.Size([0] * local.dim()), local.shape)]
    else:
        box = own_box(target)
        boxes = [box] if box is not None else None
    items = (
        create_read_items(key, md, target) if boxes is None else create_read_items_for_chunks(key, md, boxes)
    )
    covered = 0
    for ri in items:
        chunk = rec.chunks[ri.storage_index.index or 0]
        lengths = tuple(int(n) for n in ri.lengths)
        reads.append(
            ChunkRead(
                file=chunk.file,
                name=chunk.name,
                dtype=dtype,
                sizes=tuple(chunk.sizes),
                offsets=tuple(int(o) for o in ri.storage_offsets),
                lengths=lengths,
                dest=narrow(local, ri.dest_offsets, lengths),
            )
        )
        covered += _volume(lengths)
    if covered != local.numel():
        raise CheckpointCorruptError(
            f"{where}: the saved chunks of '{entry}.{key}' leave part of this rank's shard unfilled"
        )
    return target


def _dtype(entry: str, key: str, rec: TensorRecord) -> torch.dtype:
    dtype = ST_TO_DTYPE.get(rec.dtype)
    if dtype is None:
        raise CheckpointCorruptError(
            f"sharded entry '{entry}': tensor '{key}' has unknown dtype {rec.dtype!r}"
        )
    return dtype


def _check_like(entry: str, key: str, rec: TensorRecord, like: Any, exact_dtype: bool) -> Any:
    """``like`` (the live tensor ``key`` is read into, or None), after checking its shape and dtype."""
    dtype = _dtype(entry, key, rec)
    if like is not None and tuple(like.shape) != rec.shape:
        raise StateMismatchError(
            f"sharded entry '{entry}': '{key}' has shape {list(rec.shape)} in the checkpoint but "
            f"{list(like.shape)} in the live object. Restore into a model of the same architecture."
        )
    if like is not None and exact_dtype and like.dtype != dtype:
        raise StateMismatchError(
            f"sharded entry '{entry}': '{key}' is {dtype} in the checkpoint but {like.dtype} in the live "
            "object; a restore is bit-exact only into the saved dtype. Cast the model before restoring."
        )
    return like


def _volume(sizes: Sequence[int]) -> int:
    return math.prod(int(n) for n in sizes)


def _no_tensor(name: str) -> torch.Tensor:
    raise CheckpointCorruptError(f"a non-tensor value of a sharded entry refers to a tensor '{name}'")
