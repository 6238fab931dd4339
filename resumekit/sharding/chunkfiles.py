"""Reading saved chunks of sharded entries: each chunk needed read once, in file order, and verified.

A rank restoring a sharded entry needs some regions of some saved chunks (its target shards overlap
them). :meth:`ShardFiles.fill` reads every chunk of a whole entry in one pass, sorted by file and
offset (sequential reads, so the kernel's read-ahead works), with the next reads running ahead in a
worker thread while this one checks the crc32c of the bytes already read. A chunk that lands whole in
one contiguous region of its target is read straight into that memory (no buffer, no copy); any other
is read into a buffer and the overlapping region copied. The targets are fresh tensors, never live
state, so a checksum failure leaves nothing changed.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from resumekit._messages import CORRUPTED_AFTER_WRITE, not_listed
from resumekit.errors import CheckpointCorruptError
from resumekit.format.layout import index_file
from resumekit.format.manifest import Manifest
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import tensors_from_buffer
from resumekit.storage.base import Buffer, PositionalReads, Storage, positional
from resumekit.storage.verify import crc_hex, verify_file

__all__ = ["ChunkRead", "ShardFiles", "narrow", "verified"]

#: Bytes read ahead of the checksum (bounds the buffers a resharding restore holds at once).
_AHEAD_BYTES = 64 << 20
#: Reads in flight at once (two measured no faster than one here: the kernel reads ahead of a sequential reader).
_READERS = 1


@dataclass(frozen=True)
class ChunkRead:
    """One region of one saved chunk, to copy into ``dest`` (a view of a fresh target tensor).

    Attributes:
        file: the shard file holding the chunk, relative to the step's data prefix.
        name: the chunk's name inside that file.
        dtype: the saved dtype.
        sizes: the saved chunk's shape.
        offsets: where the region starts inside the chunk.
        lengths: the region's shape (``dest``'s shape).
        dest: where the region goes.
    """

    file: str
    name: str
    dtype: torch.dtype
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    dest: torch.Tensor

    def whole(self) -> bool:
        """Whether the region is the whole chunk and ``dest`` can take its bytes as they are."""
        d = self.dest
        return (
            all(o == 0 for o in self.offsets)
            and self.lengths == self.sizes
            and d.device.type == "cpu"
            and d.dtype == self.dtype
            and d.is_contiguous()
            and not d.is_conj()
            and not d.is_neg()
        )


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

    def fill(self, reads: Sequence[ChunkRead]) -> None:
        """Copy every region of ``reads`` into its ``dest``, each chunk read once and verified first.

        Raises:
            CheckpointCorruptError: a file or chunk fails its checksum, a chunk is missing from its
                file, or its stored size does not match its shape.
        """
        by_chunk: dict[tuple[str, str], list[ChunkRead]] = {}
        for r in reads:
            by_chunk.setdefault((r.file, r.name), []).append(r)
        ranged: list[tuple[str, list[Any], list[ChunkRead]]] = []
        for (relfile, name), group in by_chunk.items():
            span = self._span(relfile, name, group[0].dtype, group[0].sizes)
            if span is None:  # no chunk index here: the whole file, verified against the manifest
                stored = self._from_whole(relfile, name, group[0].dtype, group[0].sizes)
                for r in group:
                    r.dest.copy_(narrow(stored, r.offsets, r.lengths))
            else:
                ranged.append((self.m.data_prefix + relfile, span, group))
        ranged.sort(key=lambda job: (job[0], job[1][0]))
        self._read_in_order(ranged)

    # -- positional reads ------------------------------------------------------------------------------

    def _span(self, relfile: str, name: str, dtype: torch.dtype, sizes: tuple[int, ...]) -> list[Any] | None:
        """``[begin, end, crc]`` of chunk ``name`` in its file, from the verified chunk index; None where
        the file is read whole (no positional reads, or no index)."""
        rel = self.m.data_prefix + relfile
        idx_rel = self.m.data_prefix + index_file(relfile)
        if self.ranged is None or idx_rel not in self.m.files:
            return None
        span = self._index(self.ranged, rel, idx_rel)["chunks"].get(name)
        if span is None:
            raise _missing(self.where, relfile, name)
        need = math.prod(int(n) for n in sizes) * dtype.itemsize
        if span[1] - span[0] != need:
            raise CheckpointCorruptError(
                f"{self.where}/{idx_rel}: chunk '{name}' spans {span[1] - span[0]} bytes; "
                f"{list(sizes)} of {dtype} needs {need}"
            )
        return list(span)

    def _read_in_order(self, jobs: list[tuple[str, list[Any], list[ChunkRead]]]) -> None:
        """Read ``jobs`` (sorted by file and offset): reads run ahead in a worker thread, up to
        :data:`_AHEAD_BYTES`; this thread checks each chunk's crc32c, then copies the regions needed."""
        if not jobs:
            return

        def target(span: list[Any], group: list[ChunkRead]) -> tuple[memoryview, bytearray | None]:
            if len(group) == 1 and group[0].whole() and span[1] > span[0]:
                arr: Any = group[0].dest.detach().reshape(-1).view(torch.uint8).numpy()
                return memoryview(arr), None
            buf = bytearray(span[1] - span[0])
            return memoryview(buf), buf

        def finish(
            rel: str, span: list[Any], group: list[ChunkRead], mv: memoryview, buf: bytearray | None
        ) -> None:
            self._check(rel, span, mv)
            if buf is None:
                return  # read straight into its destination
            sizes, dtype = group[0].sizes, group[0].dtype
            stored = (
                torch.frombuffer(buf, dtype=dtype).reshape(sizes) if buf else torch.empty(sizes, dtype=dtype)
            )
            for r in group:
                r.dest.copy_(narrow(stored, r.offsets, r.lengths))

        with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="resumekit-shard-read") as pool:
            pending: deque[tuple[str, list[Any], list[ChunkRead], memoryview, bytearray | None, Future[None]]]
            pending = deque()
            ahead = 0
            try:
                for rel, span, group in jobs:
                    mv, buf = target(span, group)
                    reader = self._reader(rel)
                    if not getattr(reader, "parallel", False):
                        if mv:
                            reader.read_at(mv, span[0])
                        finish(rel, span, group, mv, buf)
                        continue
                    while pending and ahead + len(mv) > _AHEAD_BYTES:
                        p = pending.popleft()
                        ahead -= len(p[3])
                        p[5].result()
                        finish(*p[:5])
                    fut = pool.submit(reader.read_at, mv, span[0]) if mv else _done()
                    pending.append((rel, span, group, mv, buf, fut))
                    ahead += len(mv)
                while pending:
                    p = pending.popleft()
                    p[5].result()
                    finish(*p[:5])
            finally:
                for p in pending:
                    p[5].cancel()

    def _check(self, rel: str, span: list[Any], data: memoryview | bytearray) -> None:
        begin, end, crc = span
        actual = crc_hex(crc32c.crc32c(data))
        if actual != crc:
            raise CheckpointCorruptError(
                f"{self.where}/{rel}: bytes [{begin}, {end}) have crc32c {actual}, the chunk index says {crc}; "
                + CORRUPTED_AFTER_WRITE
            )

    def _reader(self, rel: str) -> Any:
        reader = self.readers.get(rel)
        if reader is None:
            if self.ranged is None:  # _span returns None without positional reads
                raise TypeError(f"{type(self.storage).__name__} offers no positional reads")
            opened = self.ranged.open_reader(self.step, rel, self.m.files[rel].size)
            reader = self.stack.enter_context(opened)
            self.readers[rel] = reader
        return reader

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
            # Every byte of a file a rank reads from is verified, its header included.
            begin, end, _ = index["header"]
            head = bytearray(end - begin)
            if head:
                self._reader(rel).read_at(memoryview(head), begin)
            self._check(rel, index["header"], head)
        return self.indexes[idx_rel]

    # -- whole files -----------------------------------------------------------------------------------

    def _from_whole(
        self, relfile: str, name: str, dtype: torch.dtype, sizes: tuple[int, ...]
    ) -> torch.Tensor:
        rel = self.m.data_prefix + relfile
        if rel not in self.whole:
            buf = verified(self.storage, self.step, self.m, rel, self.where)
            self.whole[rel] = tensors_from_buffer(buf, f"{self.where}/{rel}")
        stored = self.whole[rel].get(name)
        if stored is None or tuple(stored.shape) != sizes or stored.dtype != dtype:
            raise _missing(self.where, relfile, name)
        return stored


def verified(storage: Storage, step: int, m: Manifest, relpath: str, where: str) -> Buffer:
    """A whole file's bytes, checked against the manifest's size and crc32c."""
    rec = m.files.get(relpath)
    if rec is None:
        raise CheckpointCorruptError(not_listed(where, relpath))
    buf = storage.read_file(step, relpath, rec.size)
    verify_file(f"{where}/{relpath}", rec, len(buf), crc32c.crc32c(buf))
    return buf


def _missing(where: str, relfile: str, name: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{where}/{relfile}: chunk '{name}' is missing or has the wrong shape/dtype"
    )


def _done() -> Future[None]:
    fut: Future[None] = Future()
    fut.set_result(None)
    return fut


def narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The region of ``t`` at ``offsets`` with ``lengths`` (a view; one ``narrow`` per dimension)."""
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, int(o), int(n))
    return t
