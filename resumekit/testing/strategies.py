"""Hypothesis strategies for training state, and an exact comparison of two states.

These generate the values a ``state_dict()`` may hold, including the awkward ones: floats with every bit
pattern (``inf``, ``-inf``, NaN payloads, ``-0.0``), integers beyond 64 bits, dict keys of several types,
``OrderedDict`` with ``_metadata`` (as ``nn.Module.state_dict()`` returns), NumPy scalars and arrays,
and tensors of every dtype resumekit stores (bf16, fp16, fp8, bool, unsigned), 0-dim, empty,
non-contiguous, ``nn.Parameter``, and one tensor reached from several places (tied weights).

Use them to check that your own state round-trips through resumekit::

    from hypothesis import given
    from resumekit.testing.strategies import assert_identical, nested_states

    @given(nested_states())
    def test_my_format(state): ...

:func:`assert_identical` compares two states exactly: same types, key types and order, float bits,
tensor dtypes, shapes and bytes, and the same aliasing (two places hold one object in one state iff
they do in the other).
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
from hypothesis import strategies as st

from resumekit.format.tensorfile import DTYPE_TO_ST

__all__ = [
    "TENSOR_DTYPES",
    "assert_identical",
    "bitwise_floats",
    "dict_keys",
    "nested_states",
    "numpy_values",
    "scalars",
    "tensors",
]

#: Every torch dtype resumekit stores, in a stable order.
TENSOR_DTYPES: tuple[torch.dtype, ...] = tuple(sorted(DTYPE_TO_ST, key=str))

_FLOAT_SPECIALS = (math.inf, -math.inf, math.nan, -0.0, 0.0, 5e-324, -1.7976931348623157e308)


def bitwise_floats() -> st.SearchStrategy[float]:
    """Python floats of any bit pattern: inf, -inf, NaNs with sign and payload, -0.0, subnormals."""
    from_bits = st.integers(0, 2**64 - 1).map(lambda b: struct.unpack(">d", b.to_bytes(8, "big"))[0])
    return st.one_of(st.sampled_from(_FLOAT_SPECIALS), st.floats(allow_nan=True), from_bits)


def scalars() -> st.SearchStrategy[Any]:
    """Plain Python leaves: None, bool, int (also beyond 64 bits), float (any bits), str, bytes."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.integers().map(lambda i: i * 2**70),
        bitwise_floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    )


def dict_keys() -> st.SearchStrategy[Any]:
    """Keys resumekit accepts: None, bool, int, float (any bits), str, and tuples of those."""
    atom = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), bitwise_floats(), st.text(max_size=6)
    )
    return st.one_of(atom, st.tuples(atom, atom), st.tuples(atom, st.tuples(atom)))


# NumPy dtypes that torch can view (resumekit moves arrays through its tensor file).
_NP_DTYPES = (
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
)


def _np_from_bytes(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)  # any other byte is not a valid NumPy bool
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def _np_array(draw: st.DrawFn, *, allow_0d: bool) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(st.sampled_from(_NP_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0 if allow_0d else 1, max_size=3)))
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    arr = _np_from_bytes(draw(st.binary(min_size=n, max_size=n)), dtype, shape)
    if arr.ndim == 2 and draw(st.booleans()):
        arr = arr.T  # non-contiguous
    return arr


@st.composite
def _np_scalar(draw: st.DrawFn) -> np.generic:
    dtype = np.dtype(draw(st.sampled_from((*_NP_DTYPES, "complex128", "longlong", "ulonglong"))))
    raw = draw(st.binary(min_size=dtype.itemsize, max_size=dtype.itemsize))
    out: np.generic = _np_from_bytes(raw, dtype, (1,))[0]
    return out


def numpy_values(*, allow_0d_arrays: bool = True) -> st.SearchStrategy[Any]:
    """NumPy scalars of any bit pattern and numeric/bool arrays (0-dim, empty, non-contiguous).

    Args:
        allow_0d_arrays: also generate 0-dim arrays (``np.array(5.0)``).
    """
    return st.one_of(_np_scalar(), _np_array(allow_0d=allow_0d_arrays))


def _valid_bytes(dtype: torch.dtype, raw: bytes) -> bytes:
    # A bool tensor holding a byte other than 0/1 is undefined behaviour in torch; every other dtype
    # accepts any bit pattern (NaN payloads, fp8 specials, ...).
    return bytes(b & 1 for b in raw) if dtype == torch.bool else raw


@st.composite
def tensors(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = TENSOR_DTYPES,
    *,
    min_side: int = 0,
    max_side: int = 4,
    max_dims: int = 3,
    allow_parameters: bool = True,
    degenerate_strides: bool = True,
) -> torch.Tensor:
    """CPU tensors filled with arbitrary bits: any of ``dtypes``, 0-dim, empty, non-contiguous, Parameters.

    Args:
        dtypes: the dtypes to draw from (default: every dtype resumekit stores).
        min_side: the smallest size of one dimension (1 or more: never empty).
        max_side: the largest size of one dimension.
        max_dims: the largest number of dimensions.
        allow_parameters: also return ``nn.Parameter`` objects (``requires_grad`` where the dtype allows).
        degenerate_strides: also return views whose last dimension has size 0 or 1 but a stride other
            than 1 (``torch.randn(2)[::2]``): torch calls them contiguous, yet their stride is not 1.
    """
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(min_side, max_side), max_size=max_dims)))
    layout = draw(st.sampled_from(("contiguous", "transposed", "strided")))
    if layout == "strided" and not degenerate_strides and (not shape or shape[-1] <= 1):
        layout = "contiguous"
    # Build a larger buffer, then take a view of it, so non-contiguous tensors are real views.
    base_shape = shape
    if layout == "transposed" and len(shape) >= 2:
        base_shape = (*shape[:-2], shape[-1], shape[-2])
    elif layout == "strided" and len(shape) >= 1:
        base_shape = (*shape[:-1], shape[-1] * 2)
    numel = math.prod(base_shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = _valid_bytes(dtype, draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize)))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    t = t.view(dtype).reshape(base_shape)
    if layout == "transposed" and len(shape) >= 2:
        t = t.transpose(-1, -2)
    elif layout == "strided" and len(shape) >= 1:
        t = t[..., ::2]
    if allow_parameters and draw(st.booleans()):
        grad = (dtype.is_floating_point or dtype.is_complex) and draw(st.booleans())
        return torch.nn.Parameter(t, requires_grad=grad)
    return t


def _metadata_for(draw: st.DrawFn) -> OrderedDict[str, dict[str, int]]:
    names = draw(st.lists(st.text(alphabet="abc.", max_size=4), max_size=3, unique=True))
    return OrderedDict((n, {"version": draw(st.integers(0, 5))}) for n in names)


@st.composite
def _odict(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> OrderedDict[Any, Any]:
    items = draw(st.lists(st.tuples(dict_keys(), children), max_size=4))
    out: OrderedDict[Any, Any] = OrderedDict(items)
    if draw(st.booleans()):
        out._metadata = _metadata_for(draw)  # type: ignore[attr-defined]
    return out


@st.composite
def nested_states(
    draw: st.DrawFn,
    *,
    max_leaves: int = 24,
    tied: bool = True,
    tied_parameters: bool = True,
    allow_0d_arrays: bool = True,
    degenerate_strides: bool = True,
) -> dict[str, Any]:
    """A top-level state dict with str keys holding arbitrarily nested containers and leaves.

    Containers: dict (str keys, or keys of any :func:`dict_keys` type, including ``"$"``-prefixed str),
    ``OrderedDict`` (optionally with ``_metadata``), list, tuple. Leaves: :func:`scalars`,
    :func:`numpy_values`, :func:`tensors`, ``torch.dtype``, ``torch.device`` and ``torch.Size``.

    Args:
        max_leaves: bound on the number of leaves (keeps examples small).
        tied: reuse some tensor objects in several places (tied weights).
        tied_parameters: allow a reused tensor to be an ``nn.Parameter``.
        allow_0d_arrays: generate 0-dim NumPy arrays.
        degenerate_strides: passed to :func:`tensors`.
    """
    pool: list[torch.Tensor] = []
    if tied:
        # Tied tensors have memory to share: an empty tensor has no storage identity.
        pool = draw(
            st.lists(
                tensors(min_side=1, allow_parameters=tied_parameters, degenerate_strides=degenerate_strides),
                min_size=1,
                max_size=3,
            )
        )
    leaf_options = [
        scalars(),
        numpy_values(allow_0d_arrays=allow_0d_arrays),
        tensors(degenerate_strides=degenerate_strides),
        st.sampled_from(TENSOR_DTYPES),
        st.sampled_from((torch.device("cpu"), torch.device("cuda", 1), torch.device("meta"))),
        st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
    ]
    if pool:
        leaf_options.append(st.sampled_from(pool))
    leaves = st.one_of(*leaf_options)

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(st.text(max_size=6), children, max_size=4),
            st.dictionaries(dict_keys(), children, max_size=4),
            _odict(children),
        )

    tree = st.recursive(leaves, extend, max_leaves=max_leaves)
    state: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), tree, max_size=5))
    if pool:
        # Guarantee the tied tensors are reached from at least two places.
        state["tied"] = [pool[0], {"again": pool[0]}, *pool[1:]]
    return state


# -- exact comparison -------------------------------------------------------------------------------


def _float_bits(x: float) -> bytes:
    return struct.pack(">d", x)


def _tensor_bits(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg()
    if t.numel() == 0:
        return b""
    # A fresh dense copy: a view may count as contiguous yet keep a stride other than 1 on a size-1 dim,
    # which view(uint8) refuses.
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t.cpu()).reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def assert_identical(expected: Any, actual: Any, path: str = "") -> None:
    """Assert that ``actual`` is an exact copy of ``expected``.

    Exact means: the same type at every node (dict vs ``OrderedDict``, list vs tuple, ``Parameter`` vs
    ``Tensor``, ``np.float32`` vs ``float``), the same keys with the same key types in the same order,
    ``_metadata`` on ``OrderedDict``, floats equal bit for bit (NaN payloads, ``-0.0``), tensors and
    arrays with the same dtype, shape and bytes, Parameters with the same ``requires_grad``, and the same
    aliasing: two tensor leaves are one object in ``actual`` exactly when they are in ``expected``.

    Args:
        expected: the original state.
        actual: the state after a round trip.
        path: where the comparison starts (for messages).

    Raises:
        AssertionError: naming the first path that differs and how.
    """
    seen: dict[int, int] = {}
    seen_back: dict[int, int] = {}
    _compare(expected, actual, path or "<root>", seen, seen_back)


def _compare(e: Any, a: Any, path: str, seen: dict[int, int], seen_back: dict[int, int]) -> None:
    def fail(why: str) -> None:
        raise AssertionError(f"at {path}: {why} (expected {e!r:.200}, got {a!r:.200})")

    if type(e) is not type(a):
        fail(f"type {type(a).__name__} != {type(e).__name__}")
    if isinstance(e, torch.Tensor):
        _compare_alias(e, a, fail, seen, seen_back)
        if e.dtype != a.dtype or e.shape != a.shape:
            fail(f"dtype/shape {a.dtype}{tuple(a.shape)} != {e.dtype}{tuple(e.shape)}")
        if isinstance(e, torch.nn.Parameter) and e.requires_grad != a.requires_grad:
            fail("requires_grad differs")
        if _tensor_bits(e) != _tensor_bits(a):
            fail("tensor bytes differ")
        return
    if isinstance(e, np.ndarray):
        _compare_alias(e, a, fail, seen, seen_back)
        if e.dtype != a.dtype or e.shape != a.shape:
            fail(f"dtype/shape {a.dtype}{a.shape} != {e.dtype}{e.shape}")
        if np.ascontiguousarray(e).tobytes() != np.ascontiguousarray(a).tobytes():
            fail("array bytes differ")
        return
    if isinstance(e, np.generic):
        if e.dtype != a.dtype or e.tobytes() != a.tobytes():
            fail("NumPy scalar dtype or bytes differ")
        return
    if isinstance(e, float):
        if _float_bits(e) != _float_bits(a):
            fail("float bits differ")
        return
    if isinstance(e, (dict, OrderedDict)):
        ek, ak = list(e.keys()), list(a.keys())
        if len(ek) != len(ak):
            fail(f"{len(ak)} keys != {len(ek)}")
        for i, (k1, k2) in enumerate(zip(ek, ak)):
            _compare(k1, k2, f"{path}.<key {i}>", {}, {})
            _compare(e[k1], a[k2], f"{path}.{k1!r}", seen, seen_back)
        em, am = getattr(e, "_metadata", None), getattr(a, "_metadata", None)
        if (em is None) != (am is None):
            fail("_metadata present on one side only")
        if em is not None:
            _compare(em, am, f"{path}._metadata", {}, {})
        return
    if isinstance(e, (list, tuple)):
        if len(e) != len(a):
            fail(f"length {len(a)} != {len(e)}")
        for i, (x, y) in enumerate(zip(e, a)):
            _compare(x, y, f"{path}[{i}]", seen, seen_back)
        return
    if e != a:
        fail("values differ")


def _compare_alias(
    e: Any, a: Any, fail: Callable[[str], None], seen: dict[int, int], seen_back: dict[int, int]
) -> None:
    # Invariant: the maps pair each expected object with one actual object, both ways (a bijection).
    if seen.setdefault(id(e), id(a)) != id(a) or seen_back.setdefault(id(a), id(e)) != id(e):
        fail("aliasing differs: one object in one state is several (or several are one) in the other")
