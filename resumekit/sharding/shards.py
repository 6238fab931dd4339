"""Sharded entries on the save path: detect them, capture each rank's own chunks, agree on a plan.

A sharded entry is a Module holding DTensor parameters or buffers (FSDP2's ``fully_shard``, tensor
parallel, 2-D meshes) or an Optimizer over such parameters. Its state is flattened with DCP's public
state-dict helpers, and each DTensor's local chunk (offsets and sizes in the global tensor) comes from
DCP's own planner helpers, so the chunk arithmetic is torch's. What DCP would exchange with pickle
(plans, de-duplication) is exchanged here as JSON through :class:`~resumekit.engine.collectives.World`, and nothing
is gathered to one rank: each rank writes only the chunks it owns.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Callable

import crc32c
import torch

from resumekit.engine.collectives import World
from resumekit.engine.entries import Item
from resumekit.errors import StorageError, UnsupportedValueError
from resumekit.format.codec import TensorTable, encode
from resumekit.format.tensorfile import DTYPE_TO_ST, _host_bytes, _layout, write_bytes, write_tensors
from resumekit.sharding.boxes import own_box
from resumekit.sharding.dcp_private import get_fqns
from resumekit.sharding.metadata import (
    ChunkRecord,
    ShardingMeta,
    TensorRecord,
    assign_owners,
    check_ranks_agree,
    chunk_name,
    index_file,
    meta_file,
    shard_file,
)
from resumekit.staging.buffers import OverlapStager
from resumekit.storage.verify import crc_hex

__all__ = [
    "LocalShards",
    "agree",
    "capture",
    "flat_state",
    "forget_unowned",
    "holds_dtensors",
    "owning_module",
    "write_jobs",
]

#: One file to write: (entry, bytes, path inside the step, writes it and returns (size, crc32c),
#: whether it is written after every other file of the save).
Job = tuple[str, int, str, Callable[[IO[bytes]], "tuple[int, int]"], bool]


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor``, or None where torch.distributed is unavailable."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def holds_dtensors(obj: Any) -> bool:
    """Whether ``obj`` is a Module with a DTensor parameter or buffer, or an Optimizer over one."""
    dt = dtensor_type()
    if dt is None:
        return False
    if isinstance(obj, torch.nn.Module):
        return any(isinstance(t, dt) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, torch.optim.Optimizer):
        return any(isinstance(p, dt) for g in obj.param_groups for p in g["params"])
    return False


def owning_module(opt: torch.optim.Optimizer, name: str, items: Sequence[Item]) -> torch.nn.Module:
    """The Module entry whose parameters include every parameter of ``opt`` (DCP keys optimizer state
    by the model's parameter names, so the two travel together).

    Raises:
        UnsupportedValueError: no entry of the state holds those parameters.
    """
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    for it in items:
        if isinstance(it.obj, torch.nn.Module) and mine <= {id(p) for p in it.obj.parameters()}:
            return it.obj
    raise UnsupportedValueError(
        f"sharded optimizer entry '{name}': no Module in the state holds its parameters. A sharded "
        "optimizer's state is keyed by its model's parameter names: pass the model in the same state, "
        "e.g. {'model': model, 'optimizer': opt}."
    )


def param_fqns(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its canonical name, as DCP's state-dict helpers spell it."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        fqns = get_fqns(model, name)
        out[id(p)] = next(iter(fqns))
    return out


def flat_state(it: Item, items: Sequence[Item]) -> dict[str, Any]:
    """The entry's flattened state: parameter name -> DTensor for a Module; ``state.<fqn>.<name>``
    and ``param_groups.<fqn>.<option>`` for an Optimizer (DCP's flattened optimizer layout)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    obj = it.obj
    if isinstance(obj, torch.nn.Module):
        return dict(get_model_state_dict(obj))
    if isinstance(obj, torch.optim.Optimizer):
        model = owning_module(obj, it.name, items)
        if obj.state:
            opts = StateDictOptions(flatten_optimizer_state_dict=True)
            return dict(get_optimizer_state_dict(model, obj, options=opts))
        # DCP initialises an optimizer without state by stepping it (a first Adam step would then be
        # its second): an optimizer that has not stepped yet is flattened here, untouched.
        return param_group_values(obj, model)
    raise UnsupportedValueError(
        f"sharded entry '{it.name}' is a {type(obj).__name__}; expected a Module or Optimizer"
    )


def param_group_values(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """``param_groups.<fqn>.<option>`` for every parameter of ``opt`` (DCP's flattened spelling)."""
    fqns = param_fqns(model)
    out: dict[str, Any] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in g.items():
                if k != "params":
                    out[f"param_groups.{fqns[id(p)]}.{k}"] = v
    return out


@dataclass
class LocalShards:
    """One sharded entry as captured on this rank, and (after :func:`agree`) what this rank writes."""

    name: str
    plan: dict[str, Any]  # this rank's JSON plan: chunks, tensor shapes, values, plain-tensor crcs
    chunks: dict[tuple[str, tuple[int, ...]], torch.Tensor]  # (key, offsets) -> local data
    own: dict[str, torch.Tensor] = field(default_factory=dict)  # chunk name -> data this rank writes
    meta: ShardingMeta | None = None
    staged: frozenset[str] = frozenset()  # async: the chunk names registered with the stager


def capture(it: Item, items: Sequence[Item], stager: OverlapStager | None) -> LocalShards:
    """This rank's chunks of a sharded entry, and its plan to exchange (JSON, no tensor data).

    Without ``stager`` (sync) the chunks are views of the live local shards, streamed by the write.
    With one (async) they are registered with it as unsharded entries are: the local shards of the
    Module's parameters and of the Optimizer's moments are copied in the background, each before the
    first write that could change it (the guard); the rest at once. The chunks another rank writes
    are dropped from it once the ranks agreed (:func:`forget_unowned`). A rank never holds more than
    its own.
    """
    dt = dtensor_type()
    flat = flat_state(it, items)
    chunks: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    plan: dict[str, Any] = {
        "entry": it.name,
        "chunks": [],
        "tensors": {},
        "values": {},
        "plain": {},
        "mesh": {},
    }
    for key, v in flat.items():
        if not isinstance(v, torch.Tensor):
            table = TensorTable()
            plan["values"][key] = encode(v, table, f"{it.name}.{key}")
            if table.tensors:
                raise UnsupportedValueError(
                    f"sharded entry '{it.name}': the value at '{key}' nests tensors inside a container; "
                    "only top-level tensors of a flattened state dict can be sharded."
                )
            continue
        if v.dtype not in DTYPE_TO_ST:
            raise UnsupportedValueError(
                f"sharded entry '{it.name}': tensor '{key}' has dtype {v.dtype}, which safetensors cannot store."
            )
        if dt is not None and isinstance(v, dt):
            dv: Any = v
            _check_placements(it.name, key, dv.placements)
            chunk = own_box(dv)
            local = dv.to_local().detach()
            if chunk is None or tuple(local.shape) != tuple(chunk.sizes):
                raise UnsupportedValueError(
                    f"sharded entry '{it.name}': the local shard of '{key}' has shape {list(local.shape)}, "
                    f"which its placements {dv.placements} do not describe as one chunk; this layout "
                    "(e.g. a strided shard) is not supported yet."
                )
            offsets = tuple(int(o) for o in chunk.offsets)
            if not plan["mesh"]:
                mesh = dv.device_mesh
                plan["mesh"] = {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or ())}
        else:
            offsets = (0,) * v.dim()
            local = v.detach()
            raw: Any = _host_bytes(local).numpy()
            plan["plain"][key] = crc_hex(crc32c.crc32c(raw))
        plan["tensors"][key] = [DTYPE_TO_ST[v.dtype], list(v.shape)]
        plan["chunks"].append([key, list(offsets), list(local.shape), local.numel() * local.element_size()])
        chunks[(key, offsets)] = local
    if stager is not None:
        names = {cid: chunk_name(cid[0], list(cid[1])) for cid in chunks}
        staged = stager.add(it.name, it.obj, {names[cid]: t for cid, t in chunks.items()})
        chunks = {cid: staged[names[cid]] for cid in chunks}
    return LocalShards(it.name, plan, chunks, staged=frozenset(staged) if stager is not None else frozenset())


def forget_unowned(shards: list[LocalShards], stager: OverlapStager) -> None:
    """Drop from ``stager`` the chunks that :func:`agree` gave to another rank (never copied)."""
    for s in shards:
        stager.forget(s.name, s.staged - s.own.keys())


def _check_placements(entry: str, key: str, placements: Sequence[Any]) -> None:
    """Shard placements (FSDP2 over tensor parallel's strided shards included: nested splits of one
    dimension leave each rank one box, whose offsets torch computes) and Replicate are saved; a pending
    partial sum is not a value yet, so it is refused."""
    from torch.distributed.tensor import Replicate, Shard

    kinds: tuple[type, ...] = (Shard, Replicate)
    try:
        from torch.distributed.tensor.placement_types import _StridedShard

        kinds += (_StridedShard,)
    except ImportError:  # a torch without strided shards
        pass
    odd = [p for p in placements if not isinstance(p, kinds)]
    if odd:
        raise UnsupportedValueError(
            f"sharded entry '{entry}': '{key}' has placements {tuple(placements)}; resumekit saves Shard and "
            f"Replicate placements, not {odd[0]!r} (a pending partial sum). Redistribute the tensor "
            "(e.g. to Replicate) before saving."
        )


def agree(shards: list[LocalShards], world: World, gathered: list[Any] | None = None) -> None:
    """Exchange every rank's plans (JSON), refuse disagreeing values, decide who writes each chunk.

    Every decision is a pure function of the gathered plans, so every rank reaches the same one: all
    ranks raise together or none does.

    Args:
        shards: this rank's captured sharded entries.
        world: the ranks saving together.
        gathered: every rank's ``[s.plan for s in shards]``, in rank order, when the caller already
            exchanged them; None: exchanged here.

    Raises:
        UnsupportedValueError: a value saved once for all ranks differs between ranks, or the ranks
            do not hold the same sharded entries.
    """
    if gathered is None:
        gathered = world.all_gather_json([s.plan for s in shards])
    names = [[p["entry"] for p in plans] for plans in gathered]
    if any(n != names[0] for n in names):
        desc = "; ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        raise UnsupportedValueError(
            f"the ranks hold different sharded entries ({desc}); every rank must save the same state."
        )
    for i, s in enumerate(shards):
        plans = [g[i] for g in gathered]
        check_ranks_agree(s.name, plans)
        owners = assign_owners(plans)
        tensors: dict[str, TensorRecord] = {}
        recs: dict[str, list[ChunkRecord]] = {k: [] for k in plans[0]["tensors"]}
        sizes = {(k, tuple(o)): tuple(sz) for p in plans for k, o, sz, _ in p["chunks"]}
        for (key, offsets), owner in sorted(owners.items()):
            name = chunk_name(key, list(offsets))
            recs[key].append(ChunkRecord(offsets, sizes[(key, offsets)], shard_file(s.name, owner), name))
            if owner == world.rank:
                s.own[name] = s.chunks[(key, offsets)]
        for key, (dtype, shape) in plans[0]["tensors"].items():
            tensors[key] = TensorRecord(dtype, tuple(shape), tuple(recs[key]))
        files = tuple(sorted({shard_file(s.name, r) for r in owners.values()}))
        s.meta = ShardingMeta(
            world_size=world.size,
            mesh=plans[0]["mesh"],
            tensors=tensors,
            values=plans[0]["values"],
            files=files,
        )
        s.chunks = {}  # what this rank does not own is not kept alive by the snapshot


def write_jobs(shards: list[LocalShards], rank: int, stager: OverlapStager | None = None) -> list[Job]:
    """The files this rank writes for its sharded entries: its own chunks, and (rank 0) the metadata.

    With ``stager`` (async), each chunk's bytes come from its staged copy. The chunk index is made from
    the crc32c of each chunk's bytes as the shard file is written (one read of each chunk, so a copy
    released after it was written is never read again): its job is marked to run after every other.
    """
    jobs: list[Job] = []
    for s in shards:
        if s.own:
            nbytes = sum(t.numel() * t.element_size() for t in s.own.values())
            index = _ChunkIndex()
            source = functools.partial(stager.source, s.name) if stager is not None else None
            fill = functools.partial(index.write_shard, tensors=s.own, source=source)
            jobs.append((s.name, nbytes, shard_file(s.name, rank), fill, False))
            # Written after every other file: its bytes come from the shard file's write.
            jobs.append((s.name, 0, index_file(shard_file(s.name, rank)), index.write, True))
        if rank == 0 and s.meta is not None:
            raw = s.meta.to_json()
            jobs.append((s.name, len(raw), meta_file(s.name), functools.partial(write_bytes, raw), False))
    return jobs


class _ChunkIndex:
    """The chunk index of one shard file, filled in while that file is written."""

    def __init__(self) -> None:
        self._ranges: dict[str, list[int]] = {}
        self._header: list[Any] = []
        self._written = False

    def write_shard(self, f: IO[bytes], tensors: dict[str, torch.Tensor], source: Any) -> tuple[int, int]:
        """Write the shard file (a fill of :func:`write_tensors`), noting every chunk's range and crc32c."""
        prefix, _ = _layout(tensors, None)
        self._header = [0, len(prefix), crc_hex(crc32c.crc32c(prefix))]

        def note(name: str, begin: int, end: int, crc: int) -> None:
            self._ranges[name] = [begin, end, crc]

        result = write_tensors(f, tensors, source=source, on_tensor=note)
        self._written = True
        return result

    def write(self, f: IO[bytes]) -> tuple[int, int]:
        """Write the index (a fill, planned to run after every other file of the save)."""
        if not self._written:
            raise StorageError(
                "a chunk index was due before its shard file was written (a bug in the save plan)"
            )
        out = {
            "format": "resumekit.chunks",
            "version": 1,
            "header": self._header,
            "chunks": {n: [b, e, crc_hex(c)] for n, (b, e, c) in self._ranges.items()},
        }
        return write_bytes(json.dumps(out, sort_keys=True).encode("utf-8"), f)


def describe_mesh(meta: ShardingMeta) -> str:
    """``"2x2 (dp, tp)"``, for messages and the CLI."""
    shape = meta.mesh.get("shape") or []
    names = meta.mesh.get("dim_names") or []
    text = "x".join(str(s) for s in shape) or "none"
    return f"{text} ({', '.join(names)})" if names else text
