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
import json
import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from resumekit.errors import CheckpointCorruptError, UnsupportedValueError
from resumekit.format.strict_json import expect_list as _list
from resumekit.format.strict_json import expect_str as _str
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import DTYPE_TO_ST, METADATA_KEY

__all__ = ["TensorTable", "decode", "encode", "encode_entry"]

_TAG = "$t"
#: Decoding refuses skeletons nested deeper than this (a hostile file cannot exhaust the stack).
MAX_DEPTH = 256
#: Ints wider than this are written as hex (``{"$t": "int"}``): their decimal form would pass Python's
#: 4300-digit int/str limit (14000 bits is at most 4215 digits).
_JSON_INT_BITS = 14_000
#: A hex integer in a skeleton longer than this is refused unread (8 MiB of digits: 32 Mbit).
_MAX_HEX_DIGITS = 8 << 20
#: Complex dtypes safetensors has no code for, stored as a real view (``torch.view_as_real``): the
#: real dtype of the view for each.
_COMPLEX_AS_REAL: dict[torch.dtype, torch.dtype] = {
    torch.complex128: torch.float64,
    torch.complex32: torch.float16,
}
_COMPLEX_NAMES = {str(dt).removeprefix("torch."): dt for dt in _COMPLEX_AS_REAL}


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
        # METADATA_KEY is the safetensors header's own record: a tensor under that name would
        # overwrite it and make the file unreadable, so it is escaped like a duplicate name (the
        # skeleton records the name used, so the value round-trips).
        if name in self.tensors or name == METADATA_KEY:
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
        # A lazy conjugate or negation shares its base's memory but not its values.
        t.is_conj(),
        t.is_neg(),
    )


def _join(path: str, key: Any) -> str:
    try:
        part = str(key)
    except ValueError:  # an int (or a tuple holding one) past Python's 4300-digit str limit
        part = f"<{type(key).__name__} too long to print>"
    return f"{path}.{part}" if path else part


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
    if t is int and obj.bit_length() > _JSON_INT_BITS:
        return {_TAG: "int", "hex": format(obj, "x")}
    if obj is None or t is bool or t is int or t is str:
        return obj
    if t is float:
        if math.isfinite(obj):
            return obj
        return {_TAG: "float", "bits": _float_bits(obj)}
    if isinstance(obj, torch.Tensor):
        _check_tensor(obj, path)
        if obj.dtype in _COMPLEX_AS_REAL:
            # A distinct tag, not a flag on "tensor": a reader that predates it refuses the value
            # instead of returning the real view as if it were the tensor.
            out: dict[str, Any] = {
                _TAG: "complex",
                "dtype": str(obj.dtype).removeprefix("torch."),
                "key": table.add(torch.view_as_real(obj.resolve_conj().resolve_neg()), path),
            }
        else:
            out = {_TAG: "tensor", "key": table.add(obj, path)}
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
        return _encode_ndarray(obj, table, path)
    if isinstance(obj, np.generic):
        if obj.dtype.hasobject or obj.dtype.kind in "USVO":
            raise UnsupportedValueError(
                f"state value at '{path}' is a NumPy {obj.dtype} scalar; not storable."
            )
        # dtype.char keeps C-level distinctions (np.longlong vs np.int64) that dtype.str loses; a
        # datetime's char ('M') drops its unit, so those keep the full string ('<M8[s]').
        dtype = obj.dtype.str if obj.dtype.kind in "mM" else obj.dtype.char
        return {_TAG: "npscalar", "dtype": dtype, "hex": obj.tobytes().hex()}
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


def _check_tensor(obj: torch.Tensor, path: str) -> None:
    """Refuse, naming ``path``, a tensor no safetensors file can hold (before anything is written)."""
    where = path or "<root>"
    if _is_dtensor(obj):
        raise UnsupportedValueError(
            f"state value at '{where}' is a DTensor (a shard of a tensor spread over ranks). resumekit "
            "saves DTensors only as sharded entries: pass the FSDP2/tensor-parallel Module or its "
            "Optimizer itself as a top-level state entry (not inside a dict or a per-rank entry)."
        )
    if obj.is_sparse or obj.layout != torch.strided:
        raise UnsupportedValueError(
            f"state value at '{where}' is a {obj.layout} tensor; resumekit stores strided tensors only. "
            "Convert it with .to_dense() in state_dict() and back in load_state_dict()."
        )
    if obj.is_quantized:
        raise UnsupportedValueError(
            f"state value at '{where}' is a quantized tensor ({obj.dtype}); safetensors has no quantized "
            "dtypes. Store its int_repr(), q_scale() and q_zero_point() in state_dict() instead (or "
            "dequantize() it) and rebuild it in load_state_dict()."
        )
    if obj.device.type == "meta":
        raise UnsupportedValueError(
            f"state value at '{where}' is a meta tensor (shape {tuple(obj.shape)}, no data); there is "
            "nothing to save. Materialise the module (to_empty() and initialise) before saving."
        )
    if obj.dtype not in DTYPE_TO_ST and obj.dtype not in _COMPLEX_AS_REAL:
        raise UnsupportedValueError(
            f"state value at '{where}' is a tensor of dtype {obj.dtype}, which safetensors cannot store. "
            "Convert it in state_dict() (e.g. .view() as an integer dtype of the same size) and back in "
            "load_state_dict()."
        )


def _encode_ndarray(obj: np.ndarray[Any, Any], table: TensorTable, path: str) -> dict[str, Any]:
    where = path or "<root>"
    dt = obj.dtype
    if dt.hasobject or dt.kind in "USVO":
        raise UnsupportedValueError(
            f"state value at '{where}' is a NumPy array of dtype {dt}; only numeric and bool "
            "arrays can be stored without pickle. Convert it to a list of str or to a numeric array."
        )
    if dt.kind in "mM":
        raise UnsupportedValueError(
            f"state value at '{where}' is a NumPy {dt} array; torch has no datetime dtype. Store "
            f"arr.astype('int64') and its unit ({np.datetime_data(dt)[0]!r}) in state_dict() and "
            "rebuild it in load_state_dict()."
        )
    out: dict[str, Any] = {_TAG: "ndarray"}
    if not dt.isnative:
        # Stored in native order, the order recorded: values and dtype both round-trip. A reader that
        # predates the field returns the same values in native order.
        out["byteorder"] = dt.byteorder
        obj = obj.astype(dt.newbyteorder("="))
    # np.ascontiguousarray would turn a 0-dim array into shape (1,); copy only when needed.
    arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
    try:
        tensor = torch.from_numpy(arr)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(
            f"state value at '{where}' is a NumPy array of dtype {dt}, which torch (and so safetensors) "
            f"cannot hold ({exc}). Convert it (e.g. longdouble to float64) in state_dict()."
        ) from exc
    if tensor.dtype in _COMPLEX_AS_REAL:
        out = {**out, _TAG: "complex", "dtype": str(tensor.dtype).removeprefix("torch."), "ndarray": True}
        tensor = torch.view_as_real(tensor)
    _check_tensor(tensor, path)
    out["key"] = table.add(tensor, path)
    return out


def encode_entry(obj: Any, table: TensorTable, entry: str) -> bytes:
    """Encode one entry's state into its skeleton file's bytes, and prove it decodes.

    The skeleton is decoded again here, against the tensors just collected, so a state this
    resumekit could not restore is refused at save time, naming the entry: "committed" always means
    "restorable" as far as the format goes.

    Args:
        obj: the entry's ``state_dict()`` (or the mapping's content).
        table: receives the entry's tensors.
        entry: the entry name, for messages.

    Raises:
        UnsupportedValueError: a value cannot be stored, or would not read back.
    """
    try:
        raw = json.dumps(encode(obj, table), allow_nan=False).encode("utf-8")
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(f"state entry '{entry}': {exc}") from exc
    except (TypeError, ValueError, RecursionError) as exc:  # a codec gap: refuse rather than commit it
        raise UnsupportedValueError(
            f"state entry '{entry}' cannot be written as JSON ({exc}); convert the value in state_dict()."
        ) from exc

    def lookup(name: str) -> torch.Tensor:
        return table.tensors[name]

    try:
        decode(parse_strict(raw, f"entry '{entry}'", "skeleton"), lookup, entry)
    except (CheckpointCorruptError, KeyError) as exc:
        raise UnsupportedValueError(
            f"state entry '{entry}' would be saved but could not be restored ({exc}); convert the value "
            "in state_dict(). Nothing was written."
        ) from exc
    return raw


def _is_dtensor(t: torch.Tensor) -> bool:
    # Checked by name first: importing torch.distributed.tensor is not free and most tensors are plain.
    if type(t).__name__ != "DTensor":
        return False
    from resumekit.sharding.shards import dtensor_type

    dt = dtensor_type()
    return dt is not None and isinstance(t, dt)


def _encode_key(k: Any, path: str) -> Any:
    t = type(k)
    if k is None or t in (bool, int, str, float):  # encoded as the same values are (big ints, inf, nan)
        return encode(k, TensorTable(), path)
    if t is tuple:
        return {_TAG: "tuple", "items": [_encode_key(v, path) for v in k]}
    raise UnsupportedValueError(
        f"dict key {k!r} at '{path or '<root>'}' has type {t.__qualname__}; keys must be None, bool, int, "
        "float, str or tuples of those. Convert the key in your state_dict()."
    )


_DTYPE_RE = re.compile(r"^[a-z0-9_]{1,32}$")
#: What encode writes for a NumPy scalar's dtype: its one-letter char, or a datetime's full string.
_NPSCALAR_RE = re.compile(r"^(?:[?A-Za-z]|[<>]?[mM]8\[[0-9]{0,6}[A-Za-z]{1,2}\])$")
_INT64 = 1 << 63


def decode(
    skel: Any,
    lookup: Callable[[str], torch.Tensor],
    path: str = "",
    depth: int = 0,
    params: dict[str, torch.Tensor] | None = None,
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
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
        OverflowError,
        IndexError,
        struct.error,
    ) as exc:
        raise CheckpointCorruptError(f"malformed '{str(tag)[:40]}' value at '{path}': {exc}") from exc


def _decode_tagged(
    tag: Any,
    skel: dict[str, Any],
    lookup: Callable[[str], torch.Tensor],
    path: str,
    depth: int,
    params: dict[str, torch.Tensor] | None = None,
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
        arr = lookup(_str(skel["key"])).numpy()
        return _with_byteorder(arr, skel, path)
    if tag == "complex":
        return _decode_complex(skel, lookup, path, params)
    if tag == "int":
        digits = _str(skel["hex"])
        if len(digits) > _MAX_HEX_DIGITS or not re.fullmatch(r"-?[0-9a-f]+", digits):
            raise CheckpointCorruptError(f"malformed hex integer at '{path}' ({len(digits)} characters)")
        return int(digits, 16)
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
        name = _str(skel["dtype"])
        if not _NPSCALAR_RE.match(name):
            raise CheckpointCorruptError(f"NumPy scalar dtype {name[:40]!r} at '{path}' is not allowed")
        dt = np.dtype(name)
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
        dims = _list(skel["v"])
        # Checked before torch converts them: a float (inf) or a huge int would escape as OverflowError.
        if not all(type(x) is int and -_INT64 <= x < _INT64 for x in dims):
            raise CheckpointCorruptError(f"torch.Size at '{path}' holds a value that is not an int64")
        return torch.Size(dims)
    raise CheckpointCorruptError(f"unknown value tag {tag!r} at '{path}'")


def _decode_complex(
    skel: dict[str, Any],
    lookup: Callable[[str], torch.Tensor],
    path: str,
    params: dict[str, torch.Tensor],
) -> Any:
    name, key = _str(skel["dtype"]), _str(skel["key"])
    dtype = _COMPLEX_NAMES.get(name)
    if dtype is None:
        raise CheckpointCorruptError(f"unknown complex dtype {name[:40]!r} at '{path}'")
    memo = f"complex:{key}"  # a tied tensor stays one object (the view is built once)
    if memo not in params:
        real = lookup(key)
        if real.dtype != _COMPLEX_AS_REAL[dtype] or real.dim() == 0 or real.shape[-1] != 2:
            raise CheckpointCorruptError(
                f"{name} tensor at '{path}' is stored as {real.dtype} of shape {tuple(real.shape)}; "
                f"expected {_COMPLEX_AS_REAL[dtype]} with a last dimension of 2"
            )
        if real.numel() and not any(real.stride()):
            # A planner's stand-in (one element broadcast to the shape): stand in for the view too.
            params[memo] = torch.zeros((), dtype=dtype).expand(real.shape[:-1])
        else:
            params[memo] = torch.view_as_complex(real)
    value = params[memo]
    if skel.get("ndarray"):
        return _with_byteorder(value.numpy(), skel, path)
    if skel.get("param"):
        pmemo = f"param:{memo}"
        if pmemo not in params:
            params[pmemo] = torch.nn.Parameter(value, requires_grad=bool(skel.get("requires_grad", True)))
        return params[pmemo]
    return value


def _with_byteorder(arr: np.ndarray[Any, Any], skel: dict[str, Any], path: str) -> np.ndarray[Any, Any]:
    """``arr`` (native order, as stored) in the byte order the skeleton records, if any."""
    order = skel.get("byteorder")
    if order is None:
        return arr
    if order not in ("<", ">"):
        raise CheckpointCorruptError(f"unknown byte order {str(order)[:8]!r} at '{path}'")
    return arr.astype(arr.dtype.newbyteorder(order))


def _decode_key(k: Any, path: str, depth: int) -> Any:
    if isinstance(k, dict):
        v = _decode_tagged(k.get(_TAG), k, _no_tensors, path, depth + 1)
        if type(v) not in (float, tuple, int):
            raise CheckpointCorruptError(f"dict key at '{path}' decodes to {type(v).__name__}")
        return v
    if isinstance(k, list):
        raise CheckpointCorruptError(f"dict key at '{path}' is a list")
    return k


def _no_tensors(name: str) -> torch.Tensor:
    raise CheckpointCorruptError(f"dict key refers to tensor {name!r}; keys cannot hold tensors")
