"""Save refuses, at save time, any state it could not restore (issue 17, items 2 and 4).

"Committed" must always mean "restorable": a value the format cannot hold is refused before anything
is written, with an :class:`UnsupportedValueError` naming the entry and the path; a value it can hold is
stored so that it round-trips exactly (complex128/complex32 as a real view, huge ints as hex, big-endian
NumPy arrays in native order with the order recorded, a reserved tensor name escaped).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import resumekit as rk
from resumekit.errors import ResumeKitError, UnsupportedValueError
from resumekit.testing.strategies import assert_identical


def _roundtrip(tmp_path: Path, value: dict[str, Any]) -> dict[str, Any]:
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save({"meta": value}, step=1)
    target: dict[str, Any] = {"meta": {}}
    result = ckpt.restore(target)
    assert result is not None and result.step == 1
    return target["meta"]


# -- item 2: the reserved safetensors name --------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        {"__metadata__": torch.arange(3.0)},
        {"__metadata__": torch.arange(3.0), "__metadata__#2": torch.ones(2)},
        {"a": {"b": torch.ones(2)}, "__metadata__": {"x": torch.zeros(1)}, "a.b": 1},
    ],
    ids=["top", "with-the-escape-name-taken", "nested"],
)
def test_a_tensor_named_metadata_round_trips(tmp_path: Path, state: dict[str, Any]) -> None:
    assert_identical(state, _roundtrip(tmp_path, copy.deepcopy(state)))
    # The file is still a standard safetensors file that the reference reader accepts.
    tensors = load_file(tmp_path / "step-000000000001" / "meta.safetensors")
    assert "__metadata__" not in tensors and len(tensors) >= 1


def test_retention_never_deletes_a_good_checkpoint_for_the_reserved_name(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1)
    ckpt.save({"meta": {"w": torch.ones(2)}}, step=1)
    ckpt.save({"meta": {"__metadata__": torch.full((2,), 7.0)}}, step=2)
    assert ckpt.steps() == [2]
    target: dict[str, Any] = {"meta": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step may be skipped as unverifiable
        result = ckpt.restore(target)
    assert result is not None and result.step == 2
    assert torch.equal(target["meta"]["__metadata__"], torch.full((2,), 7.0))


# -- item 4: storable values round-trip exactly ---------------------------------------------------


def _complex(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(*shape, 2, generator=g, dtype=torch.float64)
    real[..., 0].view(-1)[0] = float("nan")  # a NaN and a -0.0 survive bit for bit
    real[..., 1].view(-1)[-1] = -0.0
    return torch.view_as_complex(real).to(dtype)


def _bits(t: torch.Tensor) -> bytes:
    """The bytes of a complex tensor (NaN payloads and -0.0 included; torch.equal says NaN != NaN)."""
    return bytes(torch.view_as_real(t.detach()).contiguous().reshape(-1).view(torch.uint8).tolist())


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.complex32])
def test_complex_tensors_round_trip_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        t = _complex(dtype, 3, 4)
        state = {
            "t": t,
            "tied": [t, t],
            "view": t.t(),  # non-contiguous
            "conj": t.conj(),  # a lazy conjugate: saved resolved
            "p": torch.nn.Parameter(_complex(dtype, 2), requires_grad=False),
            "empty": torch.empty(0, 3, dtype=dtype),
        }
        out = _roundtrip(tmp_path, state)
        expected = dict(state, conj=state["conj"].resolve_conj(), view=state["view"].contiguous())
        assert out["tied"][0] is out["tied"][1]
        for key in ("t", "view", "conj", "p", "empty"):
            assert out[key].dtype == dtype
            assert _bits(out[key]) == _bits(expected[key]), key
        assert type(out["p"]) is torch.nn.Parameter and not out["p"].requires_grad


def test_complex_parameters_of_a_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, dtype=torch.complex128)
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save({"model": model}, step=1)
    fresh = torch.nn.Linear(3, 2, dtype=torch.complex128)
    assert ckpt.restore({"model": fresh}) is not None
    assert _bits(fresh.weight) == _bits(model.weight)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.arange(6, dtype=">i8")[::2],
        np.array(3.5, dtype=">f8"),
        np.arange(4, dtype=np.complex128) * (1 + 2j),
        (np.arange(4, dtype=np.complex128) * 1j).astype(">c16"),
    ],
    ids=["big-endian-f4", "big-endian-strided-i8", "big-endian-0d", "complex128", "big-endian-c16"],
)
def test_numpy_arrays_round_trip_with_their_byte_order(tmp_path: Path, arr: np.ndarray[Any, Any]) -> None:
    out = _roundtrip(tmp_path, {"a": arr})["a"]
    assert out.dtype == arr.dtype and out.dtype.str == arr.dtype.str and out.shape == arr.shape
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()


@pytest.mark.parametrize(
    "value",
    [np.datetime64("2020-01-02T03:04:05", "s"), np.timedelta64(5, "ms"), np.datetime64("NaT", "D")],
    ids=["datetime64[s]", "timedelta64[ms]", "NaT[D]"],
)
def test_datetime_scalars_keep_their_unit(tmp_path: Path, value: np.generic) -> None:
    # Saved by dtype.char ('M'), the unit was lost: restored as a generic datetime, a wrong value.
    out = _roundtrip(tmp_path, {"v": value})["v"]
    assert out.dtype == value.dtype and out.tobytes() == value.tobytes()


@pytest.mark.parametrize(
    "n", [10**5000, -(2**20000), 2**14000, 2**14001], ids=["1e5000", "-2**20000", "2**14000", "2**14001"]
)
def test_integers_past_the_json_digit_limit_round_trip(tmp_path: Path, n: int) -> None:
    state = {"n": n, "keys": {n: "big", 1: "small", (n, 2): "tuple"}, "t": (n, [n])}
    out = _roundtrip(tmp_path, state)
    assert out["n"] == n and type(out["n"]) is int
    assert list(out["keys"]) == [n, 1, (n, 2)] and out["t"] == (n, [n])


# -- item 4: unstorable values are refused at save, naming entry and path, nothing written -------------


def _unstorable() -> list[tuple[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch, still produced
        return _unstorable_cases()


def _unstorable_cases() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [
        ("qint8", torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)),
        ("quint8", torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8)),
        ("meta", torch.empty(3, device="meta")),
        ("longdouble", np.arange(3, dtype=np.longdouble)),
        ("clongdouble", np.arange(3, dtype=np.clongdouble)),
        ("datetime64", np.array(["2020-01-01"], dtype="datetime64[D]")),
        ("timedelta64", np.array([1, 2], dtype="timedelta64[s]")),
    ]
    for name in ("float8_e8m0fnu", "float4_e2m1fn_x2", "uint4", "int4", "bits8"):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            try:
                cases.append((name, torch.zeros(2, dtype=torch.uint8).view(dtype)))
            except (RuntimeError, TypeError):
                pass
    return cases


_UNSTORABLE = _unstorable()


@pytest.mark.parametrize(("kind", "value"), _UNSTORABLE, ids=[k for k, _ in _UNSTORABLE])
def test_unstorable_values_are_refused_at_save_naming_entry_and_path(
    tmp_path: Path, kind: str, value: Any
) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1)
    ckpt.save({"meta": {"ok": 1}}, step=1)
    state = {"meta": {"deep": {"x": [0, value]}}}
    with pytest.raises(UnsupportedValueError) as info:
        ckpt.save(state, step=2)
    message = str(info.value)
    assert "'meta'" in message and "deep.x.1" in message, message
    assert isinstance(info.value, ResumeKitError) and isinstance(info.value, TypeError)
    assert state["meta"]["deep"]["x"][1] is value  # the state is untouched
    assert ckpt.steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000001"]  # nothing written
    target: dict[str, Any] = {"meta": {}}
    assert ckpt.restore(target) is not None and target["meta"] == {"ok": 1}


def test_a_refused_save_leaves_live_tensors_unchanged(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model, "meta": {"bad": np.array(["2020"], dtype="datetime64[Y]")}}
    with pytest.raises(UnsupportedValueError, match="meta"):
        rk.Checkpointer(tmp_path).save(state, step=1)
    assert_identical(before, dict(model.state_dict()))
    assert rk.Checkpointer(tmp_path).steps() == []


def test_a_lazy_conjugate_or_negation_is_not_stored_as_its_base(tmp_path: Path) -> None:
    # They share memory, shape and strides with their base; deduplicated by identity, the restored
    # conjugate was the base itself: a wrong value, silently.
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    state = {"c": c, "conj": c.conj(), "imag": c.imag, "neg_imag": c.conj().imag}
    assert state["neg_imag"].is_neg()
    out = _roundtrip(tmp_path, state)
    assert torch.equal(out["conj"], torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64))
    assert torch.equal(out["neg_imag"], torch.tensor([-2.0, 4.0]))
    assert torch.equal(out["imag"], torch.tensor([2.0, -4.0])) and out["conj"] is not out["c"]
