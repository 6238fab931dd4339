"""Encode a nested ``state_dict()`` into a JSON skeleton plus a flat table of tensors, and back.

Pure logic: no I/O. The skeleton is plain JSON; every value that JSON cannot represent exactly is a
tagged object ``{"$t": <tag>, ...}``. Nothing here can construct an arbitrary Python object: decoding
knows a closed set of tags, so a hostile skeleton can at worst fail to decode.

Invariants:
- a round trip is exact: same types (dict vs OrderedDict, list vs tuple, Parameter vs Tensor), same key
  types (optimizer state uses ``int`` keys), same float bits (inf, nan payloads, -0.0), same tensor
  dtypes, shapes and values;
- a tensor reached twice (tied weights) is stored once and restored as one tensor object.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckpointCorruptError, UnsupportedValueError

__all__ = ["TensorTable", "decode", "encode"]

_TAG = "$t"
#: Decoding refuses skeletons nested deeper than this (a hostile file cannot exhaust the stack).
MAX_DEPTH = 256


@dataclass
class TensorTable:
    """Tensors collected while encoding, keyed by a readable, unique name (their path in the state)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _by_identity: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def add(self, tensor: torch.Tensor, path: str) -> str:
        """Register ``tensor`` found at ``path``; return its name (an existing one if it is shared)."""
        ident = _identity(tensor)
        if ident is not None and ident in self._by_identity:
            return self._by_identity[ident]
        name = path or "tensor"
        if name in self.tensors:
            n = 2
            while f"{name}#{n}" in self.tensors:
                n += 1
            name = f"{name}#{n}"
        self.tensors[name] = tensor
        if ident is not None:
            self._by_identity[ident] = name
        return name


def _identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    """The same view of the same memory; None for tensors without memory (nothing to share)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _float_bits(x: float) -> str:
    return struct.pack(">d", x).hex()


def encode(obj: Any, table: TensorTable, path: str = "") -> Any:
    """Encode ``obj`` into a JSON-compatible skeleton, moving tensors into ``table``.

    Args:
        obj: a value from a ``state_dict()``.
        table: receives every tensor and ndarray.
        path: where ``obj`` sits in the state, used for tensor names and error messages.

    Raises:
        UnsupportedValueError: for a value that cannot be stored without pickle, naming its path.
    """
    t = type(obj)
    if obj is None or t is bool or t is int or t is str:
        return obj
    if t is float:
        if math.isfinite(obj):
            return obj
        return {_TAG: "float", "bits": _float_bits(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise UnsupportedValueError(
                f"state value at '{path}' is a {obj.layout} tensor; resumekit stores strided tensors only. "
                "Convert it with .to_dense() in state_dict() and back in load_state_dict()."
            )
        out: dict[str, Any] = {_TAG: "tensor", "key": table.add(obj, path)}
        if isinstance(obj, torch.nn.Parameter):
            out["param"] = True
            out["requires_grad"] = bool(obj.requires_grad)
        return out
    if t is list:
        return [encode(v, table, _join(path, i)) for i, v in enumerate(obj)]
    if t is tuple:
        return {_TAG: "tuple", "items": [encode(v, table, _join(path, i)) for i, v in enumerate(obj)]}
    if t is dict and all(type(k) is str and not k.startswith("$") for k in obj):
        return {k: encode(v, table, _join(path, k)) for k, v in obj.items()}
    if t is dict or t is OrderedDict:
        items = [[_encode_key(k, path), encode(v, table, _join(path, k))] for k, v in obj.items()]
        out = {_TAG: "odict" if t is OrderedDict else "dict", "items": items}
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            # nn.Module.state_dict() keeps per-submodule versions here; load_state_dict uses them.
            out["metadata"] = encode(dict(meta), table, _join(path, "_metadata"))
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.kind in "USVO":
            raise UnsupportedValueError(
                f"state value at '{path}' is a NumPy array of dtype {obj.dtype}; only numeric and bool "
                "arrays can be stored without pickle. Convert it to a list of str or to a numeric array."
            )
        # np.ascontiguousarray would turn a 0-dim array into shape (1,); copy only when needed.
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
        return {_TAG: "ndarray", "key": table.add(torch.from_numpy(arr), path)}
    if isinstance(obj, np.generic):
        if obj.dtype.hasobject or obj.dtype.kind in "USVO":
            raise UnsupportedValueError(
                f"state value at '{path}' is a NumPy {obj.dtype} scalar; not storable."
            )
        # dtype.char keeps C-level distinctions (np.longlong vs np.int64) that dtype.str loses.
        return {_TAG: "npscalar", "dtype": obj.dtype.char, "hex": obj.tobytes().hex()}
    if t is bytes:
        return {_TAG: "bytes", "b64": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {_TAG: "dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {_TAG: "device", "v": str(obj)}
    if t is torch.Size:
        return {_TAG: "size", "v": list(obj)}
    raise UnsupportedValueError(
        f"state value at '{path or '<root>'}' has type {t.__module__}.{t.__qualname__}, which resumekit "
        "cannot store without pickle. Supported: None, bool, int, float, str, bytes, list, tuple, dict, "
        "OrderedDict, torch.Tensor, numpy arrays and scalars, torch.dtype/device/Size. Convert the value in "
        "your state_dict() (and back in load_state_dict())."
    )


def _encode_key(k: Any, path: str) -> Any:
    t = type(k)
    if k is None or t is bool or t is int or t is str:
        return k
    if t is float:
        return encode(k, TensorTable(), path)
    if t is tuple:
        return {_TAG: "tuple", "items": [_encode_key(v, path) for v in k]}
    raise UnsupportedValueError(
        f"dict key {k!r} at '{path or '<root>'}' has type {t.__qualname__}; keys must be None, bool, int, "
        "float, str or tuples of those. Convert the key in your state_dict()."
    )


_DTYPE_RE = re.compile(r"^[a-z0-9_]{1,32}$")


def decode(
    skel: Any,
    lookup: Callable[[str], torch.Tensor],
    path: str = "",
    depth: int = 0,
    params: dict[str, torch.nn.Parameter] | None = None,
) -> Any:
    """Rebuild the value encoded by :func:`encode`.

    Args:
        skel: the JSON skeleton.
        lookup: returns the stored tensor for a name (raises on an unknown name).
        path: for error messages.
        depth: current nesting depth.
        params: Parameters already rebuilt, by tensor name, so a tied Parameter stays one object.

    Raises:
        CheckpointCorruptError: the skeleton is malformed (unknown tag, wrong field types, too deep).
    """
    if depth > MAX_DEPTH:
        raise CheckpointCorruptError(f"skeleton nested deeper than {MAX_DEPTH} levels at '{path}'")
    if params is None:
        params = {}
    t = type(skel)
    if skel is None or t is bool or t is int or t is str or t is float:
        return skel
    if t is list:
        return [decode(v, lookup, _join(path, i), depth + 1, params) for i, v in enumerate(skel)]
    if t is not dict:
        raise CheckpointCorruptError(f"unexpected JSON value of type {t.__name__} at '{path}'")
    tag = skel.get(_TAG)
    if tag is None:
        return {k: decode(v, lookup, _join(path, k), depth + 1, params) for k, v in skel.items()}
    try:
        return _decode_tagged(tag, skel, lookup, path, depth, params)
    except CheckpointCorruptError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, struct.error) as exc:
        raise CheckpointCorruptError(f"malformed '{tag}' value at '{path}': {exc}") from exc


def _decode_tagged(
    tag: Any,
    skel: dict[str, Any],
    lookup: Callable[[str], torch.Tensor],
    path: str,
    depth: int,
    params: dict[str, torch.nn.Parameter] | None = None,
) -> Any:
    params = {} if params is None else params
    if tag == "tensor":
        key = _str(skel["key"])
        tensor = lookup(key)
        if skel.get("param"):
            if key not in params:
                params[key] = torch.nn.Parameter(tensor, requires_grad=bool(skel.get("requires_grad", True)))
            return params[key]
        return tensor
    if tag == "ndarray":
        return lookup(_str(skel["key"])).numpy()
    if tag == "float":
        bits = _str(skel["bits"])
        return float(struct.unpack(">d", bytes.fromhex(bits))[0])
    if tag == "tuple":
        items = _list(skel["items"])
        return tuple(decode(v, lookup, _join(path, i), depth + 1, params) for i, v in enumerate(items))
    if tag in ("dict", "odict"):
        out: dict[Any, Any] = OrderedDict() if tag == "odict" else {}
        for pair in _list(skel["items"]):
            k, v = _list(pair)
            key = _decode_key(k, path, depth)
            out[key] = decode(v, lookup, _join(path, key), depth + 1, params)
        if "metadata" in skel:
            meta = decode(skel["metadata"], lookup, _join(path, "_metadata"), depth + 1, params)
            if not isinstance(meta, dict):
                raise CheckpointCorruptError(f"'_metadata' at '{path}' is not a dict")
            out._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
        return out
    if tag == "npscalar":
        dt = np.dtype(_str(skel["dtype"]))
        if dt.hasobject or dt.kind in "USVO":
            raise CheckpointCorruptError(f"NumPy scalar of dtype {dt} at '{path}' is not allowed")
        raw = bytes.fromhex(_str(skel["hex"]))
        if len(raw) != dt.itemsize:
            raise CheckpointCorruptError(
                f"NumPy scalar at '{path}' has {len(raw)} bytes, expected {dt.itemsize}"
            )
        return np.frombuffer(raw, dtype=dt)[0]
    if tag == "bytes":
        return base64.b64decode(_str(skel["b64"]), validate=True)
    if tag == "dtype":
        name = _str(skel["v"])
        tdt = getattr(torch, name, None) if _DTYPE_RE.match(name) else None
        if not isinstance(tdt, torch.dtype):
            raise CheckpointCorruptError(f"unknown torch dtype {name!r} at '{path}'")
        return tdt
    if tag == "device":
        return torch.device(_str(skel["v"]))
    if tag == "size":
        return torch.Size([int(x) for x in _list(skel["v"])])
    raise CheckpointCorruptError(f"unknown value tag {tag!r} at '{path}'")


def _decode_key(k: Any, path: str, depth: int) -> Any:
    if isinstance(k, dict):
        v = _decode_tagged(k.get(_TAG), k, _no_tensors, path, depth + 1)
        if type(v) not in (float, tuple):
            raise CheckpointCorruptError(f"dict key at '{path}' decodes to {type(v).__name__}")
        return v
    if isinstance(k, list):
        raise CheckpointCorruptError(f"dict key at '{path}' is a list")
    return k


def _no_tensors(name: str) -> torch.Tensor:
    raise CheckpointCorruptError(f"dict key refers to tensor {name!r}; keys cannot hold tensors")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v
