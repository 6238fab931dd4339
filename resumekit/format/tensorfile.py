"""Stream tensors into a safetensors file, and read one back with strict validation.

The writer streams each tensor's bytes straight from its memory to the file object, computing the
crc32c in the same pass, so a save never holds a second full copy of the state (``safetensors.torch``'s
``save_file`` builds the whole file in memory first). Files are standard safetensors: the
``safetensors`` library and any other reader load them.

Tensors are laid out by descending element size, so every tensor starts at an offset aligned to its
element size and can be viewed in place (``torch.frombuffer``) without a copy.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import IO, Any, Protocol

import crc32c
import torch

from resumekit.errors import CheckpointCorruptError, UnsafeCheckpointError, UnsupportedValueError
from resumekit.format.strict_json import parse_strict

__all__ = [
    "METADATA_KEY",
    "RangeReader",
    "header_length",
    "parse_head",
    "matches_exactly",
    "read_raw_header",
    "TensorSpec",
    "parse_header",
    "read_tensors",
    "tensors_from_buffer",
    "write_tensors",
]

_CHUNK = 64 << 20
#: The header key safetensors reserves for its string-to-string metadata record.
METADATA_KEY = "__metadata__"
#: A header larger than this is refused before it is parsed (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Larger dimensions are refused as hostile (torch sizes are int64).
_MAX_DIM = 1 << 48

_ST_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}
DTYPE_TO_ST: dict[torch.dtype, str] = {
    getattr(torch, name): st
    for name, st in _ST_NAMES.items()
    if isinstance(getattr(torch, name, None), torch.dtype)
}
ST_TO_DTYPE: dict[str, torch.dtype] = {st: dt for dt, st in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's entry in a safetensors header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``t`` on the CPU (a copy only when ``t`` is on a device or not contiguous)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if flat.stride(0) != 1:
        # A size-1 view may keep an odd stride while counting as contiguous; view(uint8) needs 1.
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return flat.view(torch.uint8)


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    for name, t in tensors.items():
        if name == METADATA_KEY:
            # The header's metadata record lives under this key: a tensor of that name would overwrite
            # it and leave a file no reader accepts. TensorTable never hands out this name.
            raise UnsupportedValueError(
                f"a tensor cannot be named {METADATA_KEY!r} in a safetensors file (the name is reserved "
                "for the header's metadata); rename it."
            )
        if t.dtype not in DTYPE_TO_ST:
            raise UnsupportedValueError(
                f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot store; convert it in state_dict()."
            )
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    header: dict[str, Any] = {METADATA_KEY: dict(metadata or {"format": "pt"})}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_bytes(data: bytes, fileobj: IO[bytes]) -> tuple[int, int]:
    """Write ``data`` to ``fileobj``; return ``(size, crc32c)``, as :func:`write_tensors` does."""
    fileobj.write(data)
    return len(data), crc32c.crc32c(data)


def write_tensors(
    fileobj: IO[bytes],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    source: Callable[[str, torch.Tensor], AbstractContextManager[torch.Tensor]] | None = None,
    on_tensor: Callable[[str, int, int, int], None] | None = None,
) -> tuple[int, int]:
    """Write ``tensors`` to ``fileobj`` as a safetensors file.

    Args:
        fileobj: an open binary file (or any object with ``write``).
        tensors: name -> tensor, on any device; non-contiguous tensors are written contiguously.
        metadata: the ``__metadata__`` string map (default ``{"format": "pt"}``).
        source: ``source(name, tensor)`` gives, for the duration of its context, the tensor whose bytes
            are written in place of ``tensor`` (the async staging copy); same dtype and shape.
        on_tensor: called as ``on_tensor(name, begin, end, crc32c)`` for every tensor, with its byte
            range in the file and the crc32c of those bytes alone, computed from the bytes written.

    Returns:
        ``(size, crc32c)`` of the bytes written.
    """
    prefix, order = _layout(tensors, metadata)
    fileobj.write(prefix)
    crc = crc32c.crc32c(prefix)
    size = len(prefix)
    for name in order:
        with source(name, tensors[name]) if source is not None else nullcontext(tensors[name]) as t:
            flat = _host_bytes(t)
            n = flat.numel()
            own = 0
            arr: Any = flat.numpy()
            for i in range(0, n, _CHUNK):
                chunk = arr[i : i + _CHUNK]
                fileobj.write(memoryview(chunk))
                crc = crc32c.crc32c(chunk, crc)
                if on_tensor is not None:
                    own = crc32c.crc32c(chunk, own)
            if on_tensor is not None:
                on_tensor(name, size, size + n, own)
            size += n
    return size, crc


def parse_header(buf: Any, where: str) -> tuple[dict[str, TensorSpec], int]:
    """Validate a safetensors header and return its specs and the offset where data starts.

    Everything is checked before any tensor is built: known dtypes, non-negative shapes, offsets that
    match each shape exactly, tile the data region without gaps or overlaps, and fit in the file.

    Raises:
        CheckpointCorruptError: the header is malformed or inconsistent with the file size.
        UnsafeCheckpointError: the header declares absurd sizes.
    """
    total = len(buf)
    n = header_length(bytes(buf[:8]), total, where)
    return _parse_header_json(bytes(buf[8 : 8 + n]), total, where)


def header_length(prefix: bytes, total: int, where: str) -> int:
    """The header length a safetensors file of ``total`` bytes declares in its first 8 bytes.

    Raises:
        CheckpointCorruptError: fewer than 8 bytes.
        UnsafeCheckpointError: the declared header is larger than the file or the safetensors limit.
    """
    if total < 8 or len(prefix) < 8:
        raise CheckpointCorruptError(f"{where}: {total} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or n > total - 8:
        raise UnsafeCheckpointError(
            f"{where}: header claims {n} bytes but the file has {total}; the file is truncated or hostile."
        )
    return int(n)


def parse_head(head: bytes, total: int, where: str) -> dict[str, TensorSpec]:
    """Parse a safetensors header from a file's first bytes (``total`` is the whole file's size), so a
    header can be checked without reading the data region.

    Raises:
        CheckpointCorruptError: ``head`` ends before the header does, or the header is malformed.
        UnsafeCheckpointError: the header declares absurd sizes.
    """
    n = header_length(head[:8], total, where)
    if len(head) < 8 + n:
        raise CheckpointCorruptError(f"{where}: the file ends inside its {n}-byte safetensors header")
    return _parse_header_json(head[8 : 8 + n], total, where)[0]


def _parse_header_json(raw: bytes, total: int, where: str) -> tuple[dict[str, TensorSpec], int]:
    n = len(raw)
    header = parse_strict(raw, where, "header")
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"{where}: header is not a JSON object")
    data_start = 8 + n
    data_len = total - data_start
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == METADATA_KEY:
            continue
        specs[name] = _spec(name, info, data_len, where)
    expected = 0
    for name, spec in sorted(specs.items(), key=lambda kv: kv[1].begin):
        if spec.begin != expected:
            raise CheckpointCorruptError(
                f"{where}: tensor '{name}' starts at {spec.begin}, expected {expected}"
            )
        expected = spec.end
    if expected != data_len:
        raise CheckpointCorruptError(
            f"{where}: tensors cover {expected} data bytes but the file has {data_len}"
        )
    return specs, data_start


def _spec(name: str, info: Any, data_len: int, where: str) -> TensorSpec:
    if not isinstance(info, dict):
        raise CheckpointCorruptError(f"{where}: entry for '{name}' is not an object")
    st_dtype = info.get("dtype")
    dtype = ST_TO_DTYPE.get(st_dtype) if isinstance(st_dtype, str) else None  # a list is unhashable
    if dtype is None:
        raise CheckpointCorruptError(f"{where}: tensor '{name}' has unknown dtype {str(st_dtype)[:40]!r}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointCorruptError(f"{where}: tensor '{name}' has invalid shape {str(shape)[:80]}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise CheckpointCorruptError(f"{where}: tensor '{name}' has invalid data_offsets {str(offsets)[:80]}")
    if len(shape) > 64 or any(d > _MAX_DIM for d in shape):
        raise UnsafeCheckpointError(f"{where}: tensor '{name}' declares an absurd shape {str(shape)[:80]}")
    numel = 1
    for d in shape:
        numel *= d  # exact (Python ints); a zero dim anywhere makes it empty
    if numel * dtype.itemsize > data_len:
        raise UnsafeCheckpointError(
            f"{where}: tensor '{name}' declares shape {shape}, larger than the file's {data_len} data bytes"
        )
    begin, end = offsets
    if end - begin != numel * dtype.itemsize or end > data_len:
        raise CheckpointCorruptError(
            f"{where}: tensor '{name}' spans bytes [{begin}, {end}) but shape {shape} of {dtype} needs "
            f"{numel * dtype.itemsize}"
        )
    return TensorSpec(dtype, tuple(shape), begin, end)


def tensors_from_buffer(buf: Any, where: str) -> dict[str, torch.Tensor]:
    """Parse a whole safetensors file held in ``buf`` (any writable bytes-like object: a bytearray, a
    uint8 NumPy array) into tensors that view ``buf`` (no copy)."""
    specs, data_start = parse_header(buf, where)
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        numel = (spec.end - spec.begin) // spec.dtype.itemsize
        if numel == 0:
            out[name] = torch.empty(spec.shape, dtype=spec.dtype)
            continue
        offset = data_start + spec.begin
        if offset % spec.dtype.itemsize:
            # Files from other writers may be unaligned: copy that one tensor rather than misalign it.
            raw = bytearray(buf[offset : offset + spec.end - spec.begin])
            out[name] = torch.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=spec.dtype, count=numel, offset=offset).reshape(
                spec.shape
            )
    return out


#: Bytes a reader thread fills per call; large enough for sequential disk throughput, small enough
#: that the checksum (computed in file order) trails the reads by little.
_READ_CHUNK = 32 << 20
#: Reads in flight ahead of the checksum: one for files below ``_PARALLEL_READ_BYTES``, more above.
#: Measured on this project's virtio disk, cold page cache (model + Adam state, two files): at 0.3 GB
#: one reader 0.145 s, four 0.225 s (requests at several offsets defeat the kernel's read-ahead); at
#: 3.2 GB in the save/restore benchmark four readers 1.63-1.92 s, one 2.11-2.64 s. One reader still
#: overlaps the disk with the checksum of the previous chunk.
_READ_WORKERS = 4
_PARALLEL_READ_BYTES = 512 << 20


class RangeReader(Protocol):
    """Reads exact byte ranges of one file of known size."""

    #: True when :meth:`read_at` may run in several threads at once (positional reads).
    parallel: bool

    def read_at(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the file's bytes from ``offset``; raise CheckpointCorruptError at a premature end."""
        ...


def _fits(dest: torch.Tensor, spec: TensorSpec) -> bool:
    """Whether the file's bytes for ``spec`` can be read straight into ``dest``'s memory."""
    return (
        dest.device.type == "cpu"
        and dest.dtype == spec.dtype
        and tuple(dest.shape) == spec.shape
        and dest.is_contiguous()
        and not dest.is_conj()
        and not dest.is_neg()
    )


def read_raw_header(reader: RangeReader, size: int, where: str) -> bytes:
    """A safetensors file's first bytes up to the end of its header (length prefix and JSON), as stored."""
    prefix = bytearray(8)
    if size < 8:
        raise CheckpointCorruptError(f"{where}: {size} bytes is too short for a safetensors file")
    reader.read_at(memoryview(prefix), 0)
    raw = bytearray(8 + header_length(bytes(prefix), size, where))
    raw[:8] = prefix
    reader.read_at(memoryview(raw)[8:], 8)
    return bytes(raw)


def matches_exactly(dest: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> bool:
    """Whether the file's tensors can all be read into ``dest``: same names, dtypes and shapes (CPU, contiguous)."""
    return dest.keys() == specs.keys() and all(_fits(dest[n], sp) for n, sp in specs.items())


def read_tensors(
    reader: RangeReader,
    size: int,
    where: str,
    dest: Mapping[str, torch.Tensor] | None = None,
    raw_header: bytes | None = None,
    specs: Mapping[str, TensorSpec] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Read a safetensors file of ``size`` bytes; return its tensors and the crc32c of every byte.

    When ``dest`` matches the file exactly (the same names, and for each a CPU, contiguous tensor of
    the same dtype and shape), every tensor is read straight into the memory of its ``dest`` tensor
    and returned as that tensor: no intermediate copy and no new memory, whose first touch costs as
    much as the read itself on some machines. Otherwise every tensor is read into new, uninitialised
    memory and ``dest`` is untouched, so a caller's shape or key checks on the result still refuse a
    mismatched checkpoint before anything changed. The header is fully validated before any byte is
    read. The checksum covers the bytes as they arrive, in file order, while later chunks are still
    being read.

    Args:
        reader: positional access to the file.
        size: the file's size (from the manifest, already checked against the file).
        where: the file's name for error messages.
        dest: name -> live tensor to read into (names as :class:`~resumekit.format.codec.TensorTable` gives them),
            or None.
        raw_header: the file's header as :func:`read_raw_header` gave it, when the caller already read it.
        specs: what :func:`parse_head` made of ``raw_header``, when the caller already parsed it (the
            header is then not parsed again).

    Returns:
        ``(tensors, crc32c)``. The caller must compare the checksum before trusting the values; on a
        mismatch, tensors of ``dest`` hold unverified bytes.

    Raises:
        CheckpointCorruptError: the header is malformed or the file ends early.
        UnsafeCheckpointError: the header declares absurd sizes.
    """
    raw = raw_header if raw_header is not None else read_raw_header(reader, size, where)
    if specs is None or raw_header is None:
        specs, data_start = _parse_header_json(raw[8:], size, where)
    else:
        data_start = len(raw)
    crc = crc32c.crc32c(raw)
    out: dict[str, torch.Tensor] = {}
    chunks: list[tuple[memoryview, int]] = []
    if dest is not None and not matches_exactly(dest, specs):
        dest = None
    for name, spec in sorted(specs.items(), key=lambda kv: kv[1].begin):
        target = dest[name] if dest is not None else torch.empty(spec.shape, dtype=spec.dtype)
        out[name] = target
        nbytes = spec.end - spec.begin
        if nbytes == 0:
            continue
        arr: Any = target.detach().reshape(-1).view(torch.uint8).numpy()
        mv = memoryview(arr)
        for i in range(0, nbytes, _READ_CHUNK):
            chunks.append((mv[i : i + _READ_CHUNK], data_start + spec.begin + i))
    if not reader.parallel or len(chunks) < 2:
        for mv, offset in chunks:
            reader.read_at(mv, offset)
            crc = crc32c.crc32c(mv, crc)
        return out, crc
    # Reads run ahead in a worker thread; the checksum follows in file order in this thread, so it
    # costs no extra pass and overlaps the disk.
    workers = _READ_WORKERS if size >= _PARALLEL_READ_BYTES else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resumekit-read") as pool:
        futures: deque[tuple[memoryview, Future[None]]] = deque(
            (mv, pool.submit(reader.read_at, mv, offset)) for mv, offset in chunks
        )
        try:
            while futures:
                mv, fut = futures.popleft()
                fut.result()
                crc = crc32c.crc32c(mv, crc)
        finally:
            for _, fut in futures:
                fut.cancel()
    return out, crc
