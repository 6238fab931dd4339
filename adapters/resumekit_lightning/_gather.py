"""Gather one small record from every rank, without pickle.

Lightning asks every rank for a callback's ``state_dict()`` but writes rank 0's checkpoint only, so the
per-rank RNG records must travel to rank 0 first. ``all_gather_object`` would pickle them; here a record
(nested dicts, lists, tuples, scalars, tensors, NumPy arrays) becomes JSON with tensors as base64 bytes,
and back. Records are small (a few KB of RNG state), so the copy costs nothing.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["all_gather_records", "pack", "unpack"]

_TAG = "$rk"


def pack(obj: Any) -> Any:
    """A JSON-compatible form of ``obj`` that :func:`unpack` turns back into an equal value.

    Raises:
        TypeError: ``obj`` holds a value of another type.
    """
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if type(obj) is float:
        return {_TAG: "float", "hex": float.hex(obj)}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {
            _TAG: "tensor",
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "b64": base64.b64encode(raw).decode("ascii"),
        }
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        arr = np.ascontiguousarray(obj)
        return {
            _TAG: "ndarray",
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "b64": base64.b64encode(arr.tobytes()).decode("ascii"),
        }
    if isinstance(obj, np.generic) and not obj.dtype.hasobject:
        return {
            _TAG: "npscalar",
            "dtype": obj.dtype.str,
            "b64": base64.b64encode(obj.tobytes()).decode("ascii"),
        }
    if type(obj) is tuple:
        return {_TAG: "tuple", "items": [pack(v) for v in obj]}
    if type(obj) is list:
        return [pack(v) for v in obj]
    if type(obj) is dict and all(type(k) is str for k in obj):
        return {_TAG: "dict", "items": {k: pack(v) for k, v in obj.items()}}
    raise TypeError(f"cannot send a {type(obj).__qualname__} between ranks without pickle")


def unpack(obj: Any) -> Any:
    """Invert :func:`pack`."""
    if isinstance(obj, list):
        return [unpack(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj[_TAG]
    if tag == "float":
        return float.fromhex(obj["hex"])
    if tag == "tensor":
        dtype = getattr(torch, obj["dtype"])
        raw = bytearray(base64.b64decode(obj["b64"]))
        if not raw:
            return torch.empty(obj["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(obj["shape"]).clone()
    if tag == "ndarray":
        return (
            np.frombuffer(base64.b64decode(obj["b64"]), dtype=np.dtype(obj["dtype"]))
            .reshape(obj["shape"])
            .copy()
        )
    if tag == "npscalar":
        return np.frombuffer(base64.b64decode(obj["b64"]), dtype=np.dtype(obj["dtype"]))[0]
    if tag == "tuple":
        return tuple(unpack(v) for v in obj["items"])
    return {k: unpack(v) for k, v in obj["items"].items()}


def all_gather_records(record: Any, device: torch.device | None = None) -> list[Any]:
    """Every rank's ``record``, in rank order (``[record]`` without torch.distributed).

    Every rank of the default group must call this together.

    Args:
        record: This rank's record (see :func:`pack` for the types allowed).
        device: Where the byte buffers live for the collective (CUDA for NCCL); CPU by default.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [record]
    dev = device or torch.device("cpu")
    raw = json.dumps(pack(record)).encode("utf-8")
    size = torch.tensor([len(raw)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev)
    bufs = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    return [unpack(json.loads(bytes(b[: int(s.item())].cpu().numpy()))) for b, s in zip(bufs, sizes)]
