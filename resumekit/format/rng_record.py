"""How each kind of random generator's state is written into an RNG record, and checked before restore.

Pure data conversion: a generator's state becomes plain data (tensors, ints, strings, lists); a saved
part is validated into exactly what its setter takes, or refused naming the part. Nothing here changes a
generator: :class:`resumekit.rng.RNGState` applies what these functions return.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from typing import Any, Callable, Union

import numpy as np
import torch

from resumekit.data.loaderwatch import note_restored_cpu_state
from resumekit.errors import StateMismatchError

Generator = Union[torch.Generator, np.random.Generator, np.random.RandomState, random.Random]

_MT_WORDS = 624  # Mersenne Twister key length, shared by Python's random and NumPy's RandomState.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def kind_of(gen: object) -> str | None:
    if isinstance(gen, torch.Generator):
        return "torch.Generator"
    if isinstance(gen, np.random.Generator):
        return "numpy.random.Generator"
    if isinstance(gen, np.random.RandomState):
        return "numpy.random.RandomState"
    if isinstance(gen, random.Random):
        return "random.Random"
    return None


def capture(gen: Generator) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch.Generator", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy.random.Generator", "state": encode_ints(gen.bit_generator.state)}
    if isinstance(gen, np.random.RandomState):
        return {"kind": "numpy.random.RandomState", "state": numpy_legacy_state(gen.get_state(legacy=False))}
    return {"kind": "random.Random", "state": python_state(gen.getstate())}


def plan_restore(part: str, gen: Generator, saved: Any) -> Callable[[], None]:
    if not isinstance(saved, Mapping) or "kind" not in saved or "state" not in saved:
        raise StateMismatchError(
            f"RNGState part {part} must be a dict with 'kind' and 'state'; corrupt record"
        )
    kind = kind_of(gen)
    if saved["kind"] != kind:
        raise StateMismatchError(
            f"RNGState part {part} was saved from a {saved['kind']} but a {kind} is registered under that "
            "name; register the same kind of generator the checkpoint was written with"
        )
    state = saved["state"]
    if isinstance(gen, torch.Generator):
        tensor = check_torch_bytes(part, state, gen.get_state().numel())
        return functools.partial(set_torch_state, gen, tensor)
    if isinstance(gen, np.random.Generator):
        decoded = check_bit_generator(part, gen, state)
        return lambda: setattr(gen.bit_generator, "state", decoded)
    if isinstance(gen, np.random.RandomState):
        legacy = check_numpy_legacy(part, state)
        return lambda: gen.set_state(legacy)
    if isinstance(gen, random.Random):
        py = check_python(part, state)
        return lambda: gen.setstate(py)
    raise StateMismatchError(f"RNGState part {part}: unsupported generator {type(gen).__name__}")


def set_cpu_state(state: torch.Tensor) -> None:
    torch.set_rng_state(state)
    # A bare DataLoader's sampler gives back the base seed its resumed iterator draws from this state.
    note_restored_cpu_state(state)


def set_torch_state(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state)


def python_state(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": int(version), "mt": np.asarray(internal, dtype=np.uint32), "gauss_next": gauss_next}


def check_python(part: str, saved: Any) -> tuple[Any, ...]:
    if not isinstance(saved, Mapping) or not {"version", "mt", "gauss_next"} <= set(saved):
        raise StateMismatchError(
            f"RNGState part {part!r} must be a dict with 'version', 'mt' and 'gauss_next'; corrupt record"
        )
    mt = as_array(part, saved["mt"])
    if mt.shape != (_MT_WORDS + 1,):
        raise StateMismatchError(
            f"RNGState part {part!r}: Mersenne Twister state has shape {tuple(mt.shape)}, expected "
            f"({_MT_WORDS + 1},); corrupt record"
        )
    if int(mt[-1]) > _MT_WORDS or np.any(mt < 0) or np.any(mt >= 2**32):
        raise StateMismatchError(
            f"RNGState part {part!r}: Mersenne Twister words out of range; corrupt record"
        )
    gauss = saved["gauss_next"]
    if gauss is not None and not isinstance(gauss, (int, float, np.floating)):
        raise StateMismatchError(f"RNGState part {part!r}: gauss_next must be a float or None")
    return (int(saved["version"]), tuple(int(w) for w in mt), None if gauss is None else float(gauss))


def numpy_legacy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "bit_generator": str(state["bit_generator"]),
        "key": np.asarray(state["state"]["key"], dtype=np.uint32).copy(),
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def check_numpy_legacy(part: str, saved: Any) -> dict[str, Any]:
    needed = {"bit_generator", "key", "pos", "has_gauss", "gauss"}
    if not isinstance(saved, Mapping) or not needed <= set(saved):
        raise StateMismatchError(
            f"RNGState part {part!r} must be a dict with keys {sorted(needed)}; corrupt record"
        )
    if saved["bit_generator"] != "MT19937":
        raise StateMismatchError(
            f"RNGState part {part!r}: bit generator {saved['bit_generator']!r}, expected 'MT19937'"
        )
    key = as_array(part, saved["key"])
    if key.shape != (_MT_WORDS,):
        raise StateMismatchError(
            f"RNGState part {part!r}: MT19937 key has shape {tuple(key.shape)}, expected ({_MT_WORDS},); "
            "corrupt record"
        )
    if np.any(key < 0) or np.any(key >= 2**32):
        raise StateMismatchError(f"RNGState part {part!r}: MT19937 key words out of range; corrupt record")
    pos = int(saved["pos"])
    if not 0 <= pos <= _MT_WORDS:
        raise StateMismatchError(f"RNGState part {part!r}: position {pos} outside 0..{_MT_WORDS}")
    return {
        "bit_generator": "MT19937",
        "state": {"key": key.astype(np.uint32), "pos": pos},
        "has_gauss": int(saved["has_gauss"]),
        "gauss": float(saved["gauss"]),
    }


def check_bit_generator(part: str, gen: np.random.Generator, saved: Any) -> dict[str, Any]:
    current = gen.bit_generator.state
    if not isinstance(saved, Mapping) or saved.get("bit_generator") != current["bit_generator"]:
        got = saved.get("bit_generator") if isinstance(saved, Mapping) else type(saved).__name__
        raise StateMismatchError(
            f"RNGState part {part}: saved bit generator {got!r}, but the registered numpy Generator uses "
            f"{current['bit_generator']!r}; create it with the same bit generator"
        )
    decoded = decode_ints(saved)
    # Validate by applying to a scratch bit generator: numpy checks structure and value ranges itself.
    scratch = type(gen.bit_generator)()
    try:
        scratch.state = decoded
    except (TypeError, ValueError, KeyError) as exc:
        raise StateMismatchError(
            f"RNGState part {part}: numpy rejects the saved state ({exc}); corrupt record"
        ) from exc
    return decoded


def check_torch_bytes(part: str, saved: Any, expected_numel: int | None) -> torch.Tensor:
    if isinstance(saved, np.ndarray):
        saved = torch.from_numpy(saved.copy())
    if not isinstance(saved, torch.Tensor):
        raise StateMismatchError(
            f"RNGState part {part!r} must be a uint8 tensor, got {type(saved).__name__}; corrupt record"
        )
    if saved.dtype != torch.uint8 or saved.dim() != 1:
        raise StateMismatchError(
            f"RNGState part {part!r} must be a 1-D uint8 tensor, got dtype {saved.dtype} with shape "
            f"{tuple(saved.shape)}; corrupt record"
        )
    if expected_numel is not None and saved.numel() != expected_numel:
        raise StateMismatchError(
            f"RNGState part {part!r} holds {saved.numel()} bytes but this torch's generator state has "
            f"{expected_numel}; the record is corrupt or from an incompatible torch build"
        )
    return saved.detach().cpu().contiguous().clone()


def as_array(part: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise StateMismatchError(f"RNGState part {part!r}: not an array ({exc}); corrupt record") from exc
    if arr.dtype.kind not in "iu":
        raise StateMismatchError(f"RNGState part {part!r}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


# Bit-generator states (PCG64, Philox, ...) hold 128-bit ints, which storage formats keyed on int64 cannot
# hold; they are written as decimal strings. No numpy bit-generator state holds a digit-only string.
def encode_ints(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: encode_ints(v) for k, v in value.items()}
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and not _INT64_MIN <= int(value) <= _INT64_MAX:
        return str(int(value))
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def decode_ints(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: decode_ints(v) for k, v in value.items()}
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, list):
        return np.asarray(value)
    return value
