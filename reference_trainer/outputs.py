"""Writing the run's outputs (history, plot, final weights) to any fsspec URL.

Each file appears whole or not at all where the store allows it: on local disk it is written under a
temporary name and renamed into place; on object stores a single PUT is already atomic.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import uuid
from typing import Any, Mapping

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

__all__ = ["OutputDir", "final_model_bytes", "json_safe"]


class OutputDir:
    """A run's output folder, local or remote.

    Args:
        url: A local path or an fsspec URL.
        storage_options: Passed to fsspec.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") if "://" in url else os.path.abspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")

    def join(self, relpath: str) -> str:
        """The URL of ``relpath`` inside the folder (what users are told to open)."""
        return f"{self.url}/{relpath}"

    def _path(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write ``data`` to ``relpath``, replacing any previous file whole.

        Returns:
            The file's URL.
        """
        path = self._path(relpath)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return self.join(relpath)

    def remove(self, relpath: str) -> None:
        """Delete ``relpath`` if it exists."""
        try:
            self.fs.rm(self._path(relpath))
        except FileNotFoundError:
            pass

    def read_bytes(self, relpath: str) -> bytes | None:
        """The content of ``relpath``, or ``None`` when it does not exist."""
        try:
            data: bytes = self.fs.cat_file(self._path(relpath))
            return data
        except FileNotFoundError:
            return None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``, so strict JSON readers accept it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """Pretty, strict JSON (non-finite floats as ``null``)."""
    return (json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n").encode("utf-8")


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def final_model_bytes(
    model: torch.nn.Module | Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> bytes:
    """The model's weights as a plain safetensors file, loadable without resumekit.

    Written here rather than by ``safetensors.torch.save`` because that one orders the metadata of the
    header arbitrarily, so two identical models could give different bytes. Here tensors and metadata
    keys are sorted: identical weights and metadata give identical bytes, which is what a bitwise
    comparison of two runs needs.

    Args:
        model: The bare model (not wrapped by DDP or DataParallel, so keys have no ``module.`` prefix),
            or its full state dict (under FSDP2, the gathered unsharded weights).
        metadata: Written into the safetensors header; values are converted to strings (sorted, compact
            JSON for non-strings), as the format requires.

    Returns:
        The file's bytes.

    Raises:
        TypeError: A tensor's dtype has no safetensors name.
    """
    if sys.byteorder != "little":
        raise RuntimeError(
            "safetensors stores little-endian data; this writer runs on little-endian hosts only"
        )
    header: dict[str, Any] = {
        "__metadata__": {
            str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
            for k, v in sorted(metadata.items())
        }
    }
    chunks: list[bytes] = []
    offset = 0
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    for name, value in sorted(weights.items()):
        t = value.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot store")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)
