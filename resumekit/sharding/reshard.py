"""Sharded entries on the restore path: reassemble each rank's target shards from the saved chunks.

The target layout is the live object's own: its DTensors (FSDP2, tensor parallel, any mesh, any world
size) or plain tensors (a model in one process, with no process group). DCP's planner helper computes
which region of which saved chunk lands where in each target shard (the resharding arithmetic); the
bytes come from resumekit's own files, each verified against the manifest's crc32c before use. Nothing
here is collective: each rank reads what its shards overlap, and the caller gathers every rank's
outcome so all ranks accept or reject a step together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from resumekit._messages import CORRUPTED_AFTER_WRITE, not_listed
from resumekit.engine.entries import Item
from resumekit.errors import CheckpointCorruptError, StateMismatchError
from resumekit.format.codec import decode
from resumekit.format.manifest import Manifest
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import ST_TO_DTYPE, tensors_from_buffer
from resumekit.sharding.metadata import ShardingMeta, TensorRecord, index_file
from resumekit.sharding.shards import dtensor_type, owning_module, param_fqns
from resumekit.storage.base import Buffer, PositionalReads, Storage, positional
from resumekit.storage.verify import crc_hex, verify_file

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


@dataclass
class ShardFiles:
    """The shard files of one step as this rank reads them.

    Where the storage offers positional reads, only the chunks this rank needs are read, each (and
    the file's header) checked against the crc32c in the file's chunk index, itself checked against
    the manifest; a rank thus reads what its own shards overlap, not every rank's files. Elsewhere
    (object stores) a whole file is fetched once and checked against the manifest. Used as a context
    manager: open files are closed on exit.
    """

    storage: Storage
    step: int
    m: Manifest
    where: str
    whole: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)
    readers: dict[str, Any] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    ranged: PositionalReads | None = field(init=False)

    def __post_init__(self) -> None:
        self.ranged = positional(self.storage)

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def chunk(
        self, relfile: str, name: str, dtype: torch.dtype, sizes: tuple[int, ...]
    ) -> torch.Tensor | None:
        """Chunk ``name`` of shard file ``relfile`` (relative to the data prefix), verified; None when
        the file does not hold it."""
        rel = self.m.data_prefix + relfile
        idx_rel = self.m.data_prefix + index_file(relfile)
        ranged = self.ranged
        if ranged is None or idx_rel not in self.m.files:
            if rel not in self.whole:
                buf = verified(self.storage, self.step, self.m, rel, self.where)
                self.whole[rel] = tensors_from_buffer(buf, f"{self.where}/{rel}")
            return self.whole[rel].get(name)
        index = self._index(ranged, rel, idx_rel)
        span = index["chunks"].get(name)
        if span is None:
            return None
        numel = 1
        for s in sizes:
            numel *= s
        if span[1] - span[0] != numel * dtype.itemsize:
            raise CheckpointCorruptError(
                f"{self.where}/{idx_rel}: chunk '{name}' spans {span[1] - span[0]} bytes; "
                f"{list(sizes)} of {dtype} needs {numel * dtype.itemsize}"
            )
        buf = self._read(ranged, rel, span)
        if numel == 0:
            return torch.empty(sizes, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(sizes)

    def _index(self, ranged: PositionalReads, rel: str, idx_rel: str) -> dict[str, Any]:
        if idx_rel not in self.indexes:
            where = f"{self.where}/{idx_rel}"
            try:
                raw = bytes(verified(self.storage, self.step, self.m, idx_rel, self.where))
                index = parse_strict(raw, where, "chunk index")
                spans = [index["header"], *index["chunks"].values()]
                size = self.m.files[rel].size if rel in self.m.files else -1
                ok = index.get("format") == "resumekit.chunks" and all(
                    isinstance(s, list)
                    and len(s) == 3
                    and type(s[0]) is int
                    and type(s[1]) is int
                    and 0 <= s[0] <= s[1] <= size
                    and isinstance(s[2], str)
                    for s in spans
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise CheckpointCorruptError(f"{where} is not a valid chunk index ({exc!r})") from exc
            if not ok:
                raise CheckpointCorruptError(f"{where}: malformed chunk index, or spans outside '{rel}'")
            self.indexes[idx_rel] = index
            self._read(ranged, rel, index["header"])  # every byte of a file a rank reads from is verified
        return self.indexes[idx_rel]

    def _read(self, ranged: PositionalReads, rel: str, span: list[Any]) -> bytearray:
        reader = self.readers.get(rel)
        if reader is None:
            reader = self.stack.enter_context(ranged.open_reader(self.step, rel, self.m.files[rel].size))
            self.readers[rel] = reader
        begin, end, crc = span
        buf = bytearray(end - begin)
        if buf:
            reader.read_at(memoryview(buf), begin)
        actual = crc_hex(crc32c.crc32c(buf))
        if actual != crc:
            raise CheckpointCorruptError(
                f"{self.where}/{rel}: bytes [{begin}, {end}) have crc32c {actual}, the chunk index says {crc}; "
                + CORRUPTED_AFTER_WRITE
            )
        return buf


def verified(storage: Storage, step: int, m: Manifest, relpath: str, where: str) -> Buffer:
    """A whole file's bytes, checked against the manifest's size and crc32c."""
    rec = m.files.get(relpath)
    if rec is None:
        raise CheckpointCorruptError(not_listed(where, relpath))
    buf = storage.read_file(step, relpath, rec.size)
    verify_file(f"{where}/{relpath}", rec, len(buf), crc32c.crc32c(buf))
    return buf


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
    state: dict[str, Any] = {
        k: _rebuild(files, name, k, rec, t.likes[k], exact_dtype=t.exact_dtype)
        for k, rec in meta.tensors.items()
    }
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


def _rebuild(
    files: ShardFiles, entry: str, key: str, rec: TensorRecord, like: Any, exact_dtype: bool = True
) -> torch.Tensor:
    """A fresh tensor laid out like ``like`` (a DTensor, a plain tensor, or None: the whole tensor on
    the CPU) holding the saved values of ``key``, assembled from the chunks it overlaps."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.planner_helpers import _create_read_items

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
    numel = 1
    for s in rec.shape:
        numel *= s
    if sum(_volume(c.sizes) for c in rec.chunks) != numel:
        raise CheckpointCorruptError(
            f"{files.where}: the saved chunks of '{entry}.{key}' do not tile its shape {list(rec.shape)}"
        )
    md = TensorStorageMetadata(
        TensorProperties(dtype=dtype),
        torch.Size(rec.shape),
        [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in rec.chunks],
    )
    covered = 0
    for ri in _create_read_items(key, md, target):
        chunk = rec.chunks[ri.storage_index.index or 0]
        stored = files.chunk(chunk.file, chunk.name, dtype, chunk.sizes)
        if stored is None or tuple(stored.shape) != chunk.sizes or stored.dtype != dtype:
            raise CheckpointCorruptError(
                f"{files.where}/{chunk.file}: chunk '{chunk.name}' is missing or has the wrong shape/dtype"
            )
        _narrow(local, ri.dest_offsets, ri.lengths).copy_(_narrow(stored, ri.storage_offsets, ri.lengths))
        covered += _volume(ri.lengths)
    if covered != local.numel():
        raise CheckpointCorruptError(
            f"{files.where}: the saved chunks of '{entry}.{key}' leave part of this rank's shard unfilled"
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


def _narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, int(o), int(n))
    return t


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= int(s)
    return n


def _no_tensor(name: str) -> torch.Tensor:
    raise CheckpointCorruptError(f"a non-tensor value of a sharded entry refers to a tensor '{name}'")
