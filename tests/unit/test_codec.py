"""Round trips through the pickle-free format: generated nested state and real training state."""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import resumekit as rk
from resumekit.errors import UnsupportedValueError
from resumekit.format.codec import TensorTable, decode, encode
from resumekit.format.tensorfile import DTYPE_TO_ST, tensors_from_buffer, write_tensors
from resumekit.testing.strategies import TENSOR_DTYPES, assert_identical, nested_states, tensors


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny models: torch's thread pool only adds contention on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def roundtrip(obj: Any) -> tuple[Any, TensorTable, bytes]:
    """encode -> JSON text -> decode, with tensors through a real safetensors file in memory."""
    table = TensorTable()
    text = json.dumps(encode(obj, table), allow_nan=False)
    buf = io.BytesIO()
    size, _crc = write_tensors(buf, table.tensors)
    raw = buf.getvalue()
    assert size == len(raw)
    loaded = tensors_from_buffer(bytearray(raw), "mem")

    def lookup(name: str) -> torch.Tensor:
        return loaded[name]

    return decode(json.loads(text), lookup), table, raw


# -- generated state --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_states())
def test_generated_state_round_trips_bitwise(state: dict[str, Any]) -> None:
    out, table, _ = roundtrip(state)
    assert_identical(state, out)
    # Tied tensors: the tensor reached from several places is stored once.
    tied = state["tied"][0]
    assert sum(1 for t in table.tensors.values() if t is tied) == 1
    assert out["tied"][0] is out["tied"][1]["again"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_states(max_leaves=12))
def test_generated_state_round_trips_through_checkpointer(state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        ckpt = rk.Checkpointer(root)
        ckpt.save({"blob": state}, step=7)
        target: dict[str, Any] = {"stale": 1}
        result = rk.Checkpointer(root).restore({"blob": target})
        assert result is not None and result.step == 7
        assert_identical(state, target)


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_dtype_shape_and_layout(dtype: torch.dtype, data: st.DataObject) -> None:
    t = data.draw(tensors((dtype,)))
    out, _, _ = roundtrip({"t": t})
    assert_identical({"t": t}, out)


def test_strategy_covers_every_stored_dtype() -> None:
    assert set(TENSOR_DTYPES) == set(DTYPE_TO_ST)
    for name in ("bfloat16", "float16", "bool", "uint8", "uint16", "uint32", "uint64", "float8_e4m3fn"):
        assert getattr(torch, name) in TENSOR_DTYPES


def test_float_specials_and_key_types_exactly() -> None:
    nan_payload = struct.unpack(">d", bytes.fromhex("7ff0000000000123"))[0]
    neg_nan = -float("nan")
    state = {
        "floats": [math.inf, -math.inf, nan_payload, neg_nan, -0.0, 0.0, 5e-324, 1e308],
        "ints": [2**64, -(2**100), 0, True, False],
        "keys": {
            1: "int",
            1.5: "float",
            None: "none",
            False: "bool",
            ("a", 2): "tuple",
            math.inf: "inf",
            "s": "str",
        },
        "negzero_key": {-0.0: "negzero"},
        "dollar": {"$t": "tensor", "key": "not really"},
        "od": OrderedDict(b=1, a=2),
        "nested_tuple": ((1, (2.5, None)), []),
        "bytes": b"\x00\xff",
        "np": [np.float32(1.5), np.int64(-3), np.bool_(True), np.arange(6, dtype=np.uint16).reshape(2, 3)],
        "torch": [torch.float8_e5m2, torch.device("cpu"), torch.Size([2, 0, 3])],
    }
    state["od"]._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    out, _, _ = roundtrip(state)
    assert_identical(state, out)
    assert type(next(iter(out["keys"]))) is int
    assert out["od"]._metadata == {"": {"version": 2}}


def test_tied_tensors_are_not_doubled_on_disk() -> None:
    w = torch.randn(64, 64)
    _, _, once = roundtrip({"a": w})
    out, _, twice = roundtrip({"a": w, "b": w, "c": [w]})
    assert len(twice) < len(once) + 256  # only the skeleton grows, never another 16 KiB copy
    assert out["a"] is out["b"] is out["c"][0]


def test_views_of_one_tensor_keep_their_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "base": base}
    out, _, _ = roundtrip(state)
    assert_identical(state, out)


def test_zero_dim_numpy_array_keeps_its_shape() -> None:
    state = {"a": np.array(5.0), "b": np.array(7, dtype=np.int32)}
    out, _, _ = roundtrip(state)
    assert_identical(state, out)


def test_empty_tensor_with_leading_dims_restores(tmp_path: Any) -> None:
    state = {"empty": torch.zeros(3, 0), "tiny": torch.zeros(1, dtype=torch.uint8)}
    out, _, _ = roundtrip(state)
    assert_identical(state, out)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4)[::4],
        lambda: torch.tensor(1.0).expand(1),
        lambda: torch.zeros(2, dtype=torch.bfloat16)[::2],
    ],
    ids=["step-slice", "expand", "bf16-slice"],
)
def test_size_one_view_with_odd_stride_saves(make: Any) -> None:
    t = make()
    out, _, _ = roundtrip({"t": t})
    assert_identical({"t": t}, out)


@pytest.mark.parametrize(
    "make",
    [lambda: np.array([], dtype=np.float64), lambda: torch.empty(0, dtype=torch.int16)[::2]],
    ids=["empty-ndarray", "empty-slice"],
)
def test_empty_view_with_odd_stride_saves(make: Any) -> None:
    t = make()
    out, _, _ = roundtrip({"t": t})
    assert_identical({"t": t}, out)


def test_numpy_longlong_scalar_keeps_its_type() -> None:
    state = {"a": np.longlong(3), "b": np.ulonglong(4)}
    out, _, _ = roundtrip(state)
    assert_identical(state, out)


def test_tied_parameter_restored_as_one_object() -> None:
    p = nn.Parameter(torch.randn(3))
    out, _, _ = roundtrip({"a": p, "b": [p]})
    assert out["a"] is out["b"][0]


@pytest.mark.parametrize(
    "value, where",
    [
        ({1, 2}, "x.bad"),
        (object(), "x.bad"),
        (np.array(["a", "b"]), "x.bad"),
        (np.array([1, None], dtype=object), "x.bad"),
        (torch.zeros(2, 2).to_sparse(), "x.bad"),
    ],
    ids=["set", "object", "str-array", "object-array", "sparse"],
)
def test_unsupported_values_name_their_path(value: Any, where: str) -> None:
    with pytest.raises(UnsupportedValueError, match=where.replace(".", r"\.")):
        encode({"x": {"bad": value}}, TensorTable())


def test_unsupported_key_type_is_refused() -> None:
    with pytest.raises(UnsupportedValueError, match="frozenset"):
        encode({frozenset({1}): 1}, TensorTable())


# -- real training state ----------------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _decay(epoch: int) -> float:
    return 0.9**epoch


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, amsgrad=True)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _scheduler(kind: str, opt: torch.optim.Optimizer) -> Any:
    sched = torch.optim.lr_scheduler
    if kind == "step":
        return sched.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "onecycle":
        return sched.OneCycleLR(opt, max_lr=0.1, total_steps=40)
    if kind == "lambda":
        return sched.LambdaLR(opt, _decay)  # a plain function: its state_dict holds None for it
    first = sched.LinearLR(opt, start_factor=0.3, total_iters=3)
    return sched.SequentialLR(opt, [first, sched.ExponentialLR(opt, gamma=0.95)], milestones=[3])


def _scaler() -> Any:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def _train(state: dict[str, Any], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model, opt, sched, scaler = state["model"], state["optimizer"], state["scheduler"], state["scaler"]
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def _fresh(opt_kind: str, sched_kind: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _model()
    opt = _optimizer(opt_kind, model.parameters())
    return {"model": model, "optimizer": opt, "scheduler": _scheduler(sched_kind, opt), "scaler": _scaler()}


@pytest.mark.parametrize("sched_kind", ["step", "onecycle", "lambda", "sequential"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adam", "adamw"])
def test_real_state_restores_exactly_and_training_continues_identically(
    tmp_path: Any, opt_kind: str, sched_kind: str
) -> None:
    original = _fresh(opt_kind, sched_kind, seed=0)
    _train(original, steps=5, seed=1)
    rk.Checkpointer(tmp_path).save(original, step=5)

    restored = _fresh(opt_kind, sched_kind, seed=123)  # different weights: restore must overwrite them
    result = rk.Checkpointer(tmp_path).restore(restored)
    assert result is not None and result.step == 5
    for name in original:
        assert_identical(original[name].state_dict(), restored[name].state_dict(), name)

    # The raw state_dicts survive the format with their types: int keys, step tensors, _metadata.
    for name in original:
        sd = original[name].state_dict()
        out, _, _ = roundtrip(sd)
        assert_identical(sd, out, name)
    opt_sd = original["optimizer"].state_dict()
    assert all(type(k) is int for k in opt_sd["state"])
    if opt_kind == "sgd":
        assert isinstance(opt_sd["state"][0]["momentum_buffer"], torch.Tensor)
    else:
        assert isinstance(opt_sd["state"][0]["step"], torch.Tensor)
    model_sd = original["model"].state_dict()
    assert model_sd["1.num_batches_tracked"].dtype == torch.int64
    assert "1" in model_sd._metadata

    if sched_kind == "lambda":
        # A plain function is not state: LambdaLR saves None in its place and keeps the new object's
        # own function on load, so the restored schedule is the one the code defines.
        assert original["scheduler"].state_dict()["lr_lambdas"] == [None]
        assert restored["scheduler"].lr_lambdas == [_decay]
    scaler_sd = original["scaler"].state_dict()
    assert scaler_sd["scale"] == restored["scaler"].get_scale() and scaler_sd["_growth_tracker"] >= 0

    _train(original, steps=4, seed=2)
    _train(restored, steps=4, seed=2)
    for name in original:
        assert_identical(original[name].state_dict(), restored[name].state_dict(), name)
    for p, q in zip(original["model"].parameters(), restored["model"].parameters()):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32))
