"""RNGState: every stream round-trips, capture disturbs nothing, and no failed part goes unnoticed."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resumekit.errors import StateMismatchError
from resumekit.rng import RNGState, _CudaBackend

ALLOWED_LEAVES = (type(None), bool, int, float, str, bytes, torch.Tensor, np.ndarray, np.generic)


def assert_storable(value: Any, path: str = "state") -> None:
    """The value holds only types the Checkpointer stores without pickle."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int, float, bool, type(None))), f"{path}: key {k!r}"
            assert_storable(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_storable(v, f"{path}[{i}]")
    else:
        assert isinstance(value, ALLOWED_LEAVES), f"{path}: {type(value).__name__} is not storable"


def through_storage(value: Any) -> Any:
    """What a JSON + safetensors round trip may do: tuples become lists, numpy scalars Python scalars."""
    if isinstance(value, dict):
        return {k: through_storage(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [through_storage(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.copy() if isinstance(value, np.ndarray) else value.clone()
    return value


def make_generators(seed: int) -> dict[str, Any]:
    return {
        "torch": torch.Generator().manual_seed(seed),
        "pcg64": np.random.default_rng(seed),
        "philox": np.random.Generator(np.random.Philox(seed)),
        "sfc64": np.random.Generator(np.random.SFC64(seed)),
        "mt": np.random.Generator(np.random.MT19937(seed)),
        "legacy": np.random.RandomState(seed),
        "py": random.Random(seed),
    }


def draw_all(gens: dict[str, Any], n: int) -> list[Any]:
    """Draw from every global and registered stream; gaussians exercise the cached-gaussian state."""
    out: list[Any] = [
        [random.random() for _ in range(n)],
        random.gauss(0, 1),
        np.random.rand(n).tolist(),
        float(np.random.standard_normal()),
        torch.rand(n).tolist(),
        torch.randn(1).tolist(),
    ]
    for name, g in gens.items():
        if isinstance(g, torch.Generator):
            out.append((name, torch.rand(n, generator=g).tolist()))
        elif isinstance(g, np.random.Generator):
            out.append((name, g.random(n).tolist(), float(g.standard_normal())))
        elif isinstance(g, np.random.RandomState):
            out.append((name, g.rand(n).tolist(), float(g.standard_normal())))
        else:
            out.append((name, [g.random() for _ in range(n)], g.gauss(0, 1)))
    return out


@pytest.fixture(autouse=True)
def _isolate_global_streams() -> Iterator[None]:
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), warmup=st.integers(0, 5), n=st.integers(1, 20))
def test_restore_replays_every_stream(seed: int, warmup: int, n: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gens = make_generators(seed)
    draw_all(gens, warmup)  # leave gaussian caches and buffers in arbitrary states
    rng = RNGState(gens)
    saved = through_storage(copy.deepcopy(rng.state_dict()))
    first = draw_all(gens, n)
    rng.load_state_dict(saved)
    assert draw_all(gens, n) == first


def reseed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_capture_does_not_advance_any_stream() -> None:
    reseed_globals(7)
    expected = draw_all(make_generators(7), 3)
    reseed_globals(7)
    gens = make_generators(7)
    RNGState(gens).state_dict()
    assert draw_all(gens, 3) == expected


def test_state_dict_is_pickle_free_plain_data() -> None:
    assert_storable(RNGState(make_generators(1)).state_dict())


def test_checkpointer_hints_per_rank_and_restore_last() -> None:
    assert RNGState.resumekit_scope == "rank"
    assert RNGState.resumekit_restore_last is True


def test_register_rejects_unsupported_types_and_name_clashes() -> None:
    rng = RNGState()
    with pytest.raises(TypeError, match="unsupported generator type"):
        rng.register("bad", object())  # type: ignore[arg-type]
    g = torch.Generator()
    rng.register("g", g)
    rng.register("g", g)  # re-registering the same object is harmless
    with pytest.raises(ValueError, match="already registered"):
        rng.register("g", torch.Generator())
    assert rng.generators == {"g": g}


# ------------------------------------------------------------------------------- malformed records


def _corrupt(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    bad = copy.deepcopy(state)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return bad


CORRUPTIONS = [
    (("torch_cpu",), torch.zeros(5056, dtype=torch.float32), "torch_cpu"),
    (("torch_cpu",), torch.zeros(100, dtype=torch.uint8), "torch_cpu"),
    (("torch_cpu",), [1, 2, 3], "torch_cpu"),
    (("numpy", "key"), np.zeros(623, dtype=np.uint32), "numpy"),
    (("numpy", "key"), np.zeros((2, 624), dtype=np.uint32), "numpy"),
    (("numpy", "bit_generator"), "PCG64", "numpy"),
    (("python", "mt"), np.zeros(10, dtype=np.uint32), "python"),
    (("python", "mt"), np.full(625, 2**33, dtype=np.int64), "python"),
    (("generators", "torch", "state"), torch.zeros(16, dtype=torch.uint8), "generators['torch']"),
    (("generators", "legacy", "state", "key"), np.zeros(3, dtype=np.uint32), "generators['legacy']"),
    (("generators", "pcg64", "state", "bit_generator"), "Philox", "generators['pcg64']"),
    (("generators", "pcg64", "kind"), "random.Random", "generators['pcg64']"),
    (("generators", "philox", "state", "state"), {"counter": "x"}, "generators['philox']"),
    (("cuda",), [torch.zeros(16, dtype=torch.float64)], "cuda[0]"),
]


@pytest.mark.parametrize(
    ("path", "value", "part"), CORRUPTIONS, ids=[c[2] + str(i) for i, c in enumerate(CORRUPTIONS)]
)
def test_malformed_part_is_an_error_naming_it_and_changes_nothing(
    path: tuple[Any, ...], value: Any, part: str
) -> None:
    gens = make_generators(3)
    rng = RNGState(gens)
    bad = _corrupt(rng.state_dict(), path, value)
    draw_all(gens, 2)
    reference = RNGState(gens).state_dict()
    with pytest.raises(StateMismatchError) as info:
        rng.load_state_dict(bad)
    assert part in str(info.value)
    # Validation precedes application: every stream is where it was before the failed restore.
    now = RNGState(gens).state_dict()
    assert torch.equal(now["torch_cpu"], reference["torch_cpu"])
    assert np.array_equal(now["numpy"]["key"], reference["numpy"]["key"])
    assert np.array_equal(now["python"]["mt"], reference["python"]["mt"])
    assert torch.equal(now["generators"]["torch"]["state"], reference["generators"]["torch"]["state"])
    assert now["generators"]["pcg64"]["state"] == reference["generators"]["pcg64"]["state"]


@pytest.mark.parametrize("missing", ["python", "numpy", "torch_cpu", "generators"])
def test_missing_part_is_an_error(missing: str) -> None:
    state = RNGState().state_dict()
    del state[missing]
    with pytest.raises(StateMismatchError, match=missing):
        RNGState().load_state_dict(state)


def test_not_a_dict_is_an_error() -> None:
    with pytest.raises(StateMismatchError, match="expected a dict"):
        RNGState().load_state_dict([1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------ generators on one side only


def test_generator_missing_from_checkpoint_warns_by_name_and_restores_the_rest() -> None:
    old = torch.Generator().manual_seed(1)
    saved = RNGState({"old": old}).state_dict()
    expected_old = torch.rand(3, generator=old)
    late = torch.Generator().manual_seed(2)
    late_state = late.get_state()
    rng = RNGState({"old": old, "late": late})
    with pytest.warns(RuntimeWarning, match="'late' is registered but the checkpoint has no state"):
        rng.load_state_dict(saved)
    assert torch.equal(torch.rand(3, generator=old), expected_old)
    assert torch.equal(late.get_state(), late_state)


def test_unknown_generator_in_checkpoint_warns_by_name_and_restores_the_rest() -> None:
    torch.manual_seed(99)
    saved = RNGState({"gone": random.Random(1)}).state_dict()
    reference = torch.rand(2)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match=r"generator 'gone', which is not registered here"):
        RNGState().load_state_dict(saved)
    assert torch.equal(torch.rand(2), reference)


# ---------------------------------------------------------------------------------- CUDA (via a fake)


class FakeCuda(_CudaBackend):
    """Devices whose RNG state is a 16-byte tensor, like torch's Philox CUDA generators."""

    def __init__(self, devices: int, initialized: bool = True, numel: int = 16) -> None:
        self.states = [torch.full((numel,), i, dtype=torch.uint8) for i in range(devices)]
        self._initialized = initialized
        self.numel = numel

    def initialized(self) -> bool:
        return self._initialized

    def device_count(self) -> int:
        return len(self.states)

    def get_all(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]

    def state_numel(self, device: int) -> int | None:
        return self.numel if self._initialized else None

    def set_state(self, device: int, state: torch.Tensor) -> None:
        self.states[device] = state.clone()


def rng_on(cuda: FakeCuda) -> RNGState:
    cls = type("RNGStateOnFake", (RNGState,), {"_cuda": cuda})
    return cls()


def test_cuda_states_round_trip_on_the_same_device_count() -> None:
    src = FakeCuda(2)
    saved = copy.deepcopy(rng_on(src).state_dict())
    assert [s.tolist() for s in saved["cuda"]] == [[0] * 16, [1] * 16]
    dst = FakeCuda(2)
    dst.states = [torch.full((16,), 9, dtype=torch.uint8)] * 2
    rng_on(dst).load_state_dict(saved)
    assert [s.tolist() for s in dst.states] == [[0] * 16, [1] * 16]


def test_eight_devices_onto_one_restores_device_0_and_warns_about_the_rest() -> None:
    saved = rng_on(FakeCuda(8)).state_dict()
    dst = FakeCuda(1)
    dst.states = [torch.full((16,), 42, dtype=torch.uint8)]
    with pytest.warns(RuntimeWarning, match=r"8 device\(s\) but this process sees 1.*devices 1\.\.7"):
        rng_on(dst).load_state_dict(saved)
    assert dst.states[0].tolist() == [0] * 16


def test_cuda_record_onto_cpu_warns_and_still_restores_cpu_streams() -> None:
    saved = rng_on(FakeCuda(8)).state_dict()
    expected = torch.rand(4)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        rng_on(FakeCuda(0, initialized=False)).load_state_dict(saved)
    assert torch.equal(torch.rand(4), expected)


def test_fewer_saved_devices_than_present_warns() -> None:
    saved = rng_on(FakeCuda(1)).state_dict()
    dst = FakeCuda(4)
    with pytest.warns(RuntimeWarning, match=r"devices 1\.\.3 keep their current state"):
        rng_on(dst).load_state_dict(saved)
    assert dst.states[0].tolist() == [0] * 16 and dst.states[3].tolist() == [3] * 16


def test_cpu_record_restored_with_cuda_in_use_warns() -> None:
    saved = rng_on(FakeCuda(0, initialized=False)).state_dict()
    assert saved["cuda"] == []
    with pytest.warns(RuntimeWarning, match="holds no CUDA RNG state"):
        rng_on(FakeCuda(2)).load_state_dict(saved)


def test_cuda_not_initialised_means_no_cuda_capture() -> None:
    assert rng_on(FakeCuda(4, initialized=False)).state_dict()["cuda"] == []


def test_cuda_state_of_wrong_length_is_an_error() -> None:
    saved = rng_on(FakeCuda(2, numel=24)).state_dict()
    dst = FakeCuda(2)
    with pytest.raises(StateMismatchError, match=r"cuda\[0\].*24 bytes.*16"):
        rng_on(dst).load_state_dict(saved)
    assert dst.states[1].tolist() == [1] * 16


def test_cuda_states_of_inconsistent_lengths_are_an_error_even_if_cuda_is_not_initialised() -> None:
    saved = rng_on(FakeCuda(2)).state_dict()
    saved["cuda"][1] = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(StateMismatchError, match="different lengths"):
        rng_on(FakeCuda(2, initialized=False)).load_state_dict(saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_streams_round_trip() -> None:
    torch.cuda.init()
    rng = RNGState({"cuda_gen": torch.Generator(device="cuda").manual_seed(3)})
    saved = copy.deepcopy(rng.state_dict())
    assert len(saved["cuda"]) == torch.cuda.device_count()
    gen = rng.generators["cuda_gen"]
    assert isinstance(gen, torch.Generator)
    first = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    first_gen = torch.rand(4, device="cuda", generator=gen).cpu()
    rng.load_state_dict(saved)
    again = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.rand(4, device="cuda", generator=gen).cpu(), first_gen)
