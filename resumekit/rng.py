"""Capture and restore every random stream a training process draws from.

:class:`RNGState` records Python's ``random``, NumPy's global state, the torch CPU generator, every CUDA
device's generator (when CUDA is initialised) and any generator the user registers. The record is plain
data (tensors, arrays, ints, strings): nothing is pickled.

Invariants:

* Capture only reads: no stream advances because it was saved.
* Restore validates every part before applying any, so a malformed record leaves all streams untouched.
* A part that cannot be applied is never skipped silently: a part that does not fit this process (more
  CUDA devices saved than present, a registered generator missing on one side) draws a warning naming it;
  a malformed part raises :class:`~resumekit.errors.StateMismatchError` naming it.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from resumekit.errors import StateMismatchError
from resumekit.format.rng_record import (
    Generator,
    capture,
    check_numpy_legacy,
    check_python,
    check_torch_bytes,
    kind_of,
    numpy_legacy_state,
    plan_restore,
    python_state,
    set_cpu_state,
)

__all__ = ["RNGState"]

_FORMAT = 1


class _CudaBackend:
    """The few CUDA RNG calls :class:`RNGState` needs, behind a seam so tests can substitute a fake.

    ``set_state`` goes through torch's lazy-call path: it does not initialise CUDA (which would create a
    context on the wrong device before a DDP rank has called ``torch.cuda.set_device``).
    """

    def initialized(self) -> bool:
        return torch.cuda.is_initialized()

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def get_all(self) -> list[torch.Tensor]:
        return list(torch.cuda.get_rng_state_all())

    def state_numel(self, device: int) -> int | None:
        """Length of a device's state tensor, or ``None`` when unknown without initialising CUDA."""
        if not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.get_rng_state(device).numel())

    def set_state(self, device: int, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, device)


class RNGState:
    """Every random stream of one process, as a :class:`~resumekit.TrainingState`.

    Put one in the state you checkpoint; the Checkpointer stores one record per rank.

    Example:
        >>> import resumekit as rk
        >>> rng = rk.RNGState()
        >>> saved = rng.state_dict()
        >>> rng.load_state_dict(saved)

    Args:
        generators: Extra generators to capture by name (``torch.Generator`` on any device,
            ``numpy.random.Generator``, ``numpy.random.RandomState``, ``random.Random``). More can be
            added with :meth:`register`.

    Raises:
        TypeError: A generator is of an unsupported type.
    """

    #: Read by the Checkpointer: this state differs per rank and is stored once per rank.
    resumekit_scope = "rank"
    #: Read by the Checkpointer: captured before and restored after every other entry, so that their
    #: ``state_dict()``/``load_state_dict()`` side effects cannot shift a stream.
    resumekit_restore_last = True

    _cuda: _CudaBackend = _CudaBackend()

    def __init__(self, generators: Mapping[str, Generator] | None = None) -> None:
        self._generators: dict[str, Generator] = {}
        for name, gen in (generators or {}).items():
            self.register(name, gen)

    def register(self, name: str, gen: Generator) -> None:
        """Capture ``gen`` under ``name`` from now on.

        Args:
            name: Key of the generator in the record; the same name must be registered before restore.
            gen: The generator.

        Raises:
            TypeError: ``name`` is not a string or ``gen`` is of an unsupported type.
            ValueError: ``name`` is already registered with a different generator.
        """
        if not isinstance(name, str):
            raise TypeError(f"RNGState.register: name must be a str, got {type(name).__name__}")
        if kind_of(gen) is None:
            raise TypeError(
                f"RNGState.register({name!r}): unsupported generator type {type(gen).__name__}; "
                "expected torch.Generator, numpy.random.Generator, numpy.random.RandomState or random.Random"
            )
        if name in self._generators and self._generators[name] is not gen:
            raise ValueError(f"RNGState.register: a different generator is already registered as {name!r}")
        self._generators[name] = gen

    @property
    def generators(self) -> dict[str, Generator]:
        """The registered generators by name (a copy)."""
        return dict(self._generators)

    # ----------------------------------------------------------------------------------------- capture

    def state_dict(self) -> dict[str, Any]:
        """Capture every stream without advancing any of them.

        Returns:
            ``{"format", "python", "numpy", "torch_cpu", "cuda", "generators"}``; ``cuda`` is the list of
            per-device states (empty when CUDA is not initialised in this process).
        """
        cuda = [s.detach().cpu().clone() for s in self._cuda.get_all()] if self._cuda.initialized() else []
        return {
            "format": _FORMAT,
            "python": python_state(random.getstate()),
            "numpy": numpy_legacy_state(np.random.get_state(legacy=False)),
            "torch_cpu": torch.get_rng_state(),
            "cuda": cuda,
            "generators": {name: capture(gen) for name, gen in self._generators.items()},
        }

    # ----------------------------------------------------------------------------------------- restore

    def resumekit_validate(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check a saved record against this process without changing any stream.

        The Checkpointer calls this for every entry before it loads any, so a record this process cannot
        restore (a generator registered as another kind, a malformed part) refuses the whole restore
        before the model or optimizer is touched, although RNG itself is applied last.

        Returns:
            The record, unchanged.

        Raises:
            StateMismatchError: as :meth:`load_state_dict`.
        """
        self._plan(state_dict)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every stream the record holds and this process has.

        Validates the whole record first, then applies it: on error nothing has changed.

        Args:
            state_dict: A record from :meth:`state_dict` (possibly after a round trip through storage,
                which may turn tuples into lists and arrays into tensors).

        Raises:
            StateMismatchError: A part is missing or malformed (wrong dtype, length or shape, an unknown
                bit generator, a generator of a different kind under the same name). The message names it.
        """
        apply, notes = self._plan(state_dict)
        for step in apply:
            step()
        for note in notes:
            warnings.warn(note, RuntimeWarning, stacklevel=2)

    def _plan(self, state_dict: Any) -> tuple[list[Callable[[], None]], list[str]]:
        """Every check of a record, and the steps that apply it; changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise StateMismatchError(
                f"RNGState.load_state_dict: expected a dict from RNGState.state_dict(), got "
                f"{type(state_dict).__name__}"
            )
        for key in ("python", "numpy", "torch_cpu", "generators"):
            if key not in state_dict:
                raise StateMismatchError(
                    f"RNGState record has no {key!r} part (keys: {sorted(state_dict)}); it was not written "
                    "by RNGState.state_dict(). Restore from a checkpoint that holds an RNGState entry."
                )
        apply: list[Callable[[], None]] = []
        notes: list[str] = []

        py = check_python("python", state_dict["python"])
        apply.append(lambda: random.setstate(py))
        np_state = check_numpy_legacy("numpy", state_dict["numpy"])
        apply.append(lambda: np.random.set_state(np_state))
        cpu = check_torch_bytes("torch_cpu", state_dict["torch_cpu"], torch.get_rng_state().numel())
        apply.append(functools.partial(set_cpu_state, cpu))
        apply.extend(self._plan_cuda(state_dict.get("cuda") or [], notes))
        apply.extend(self._plan_generators(state_dict["generators"], notes))
        return apply, notes

    def _plan_cuda(self, saved: Any, notes: list[str]) -> list[Callable[[], None]]:
        if not isinstance(saved, (list, tuple)):
            raise StateMismatchError(
                f"RNGState part 'cuda' must be a list of per-device state tensors, got {type(saved).__name__}"
            )
        here = self._cuda.device_count()
        states = []
        for i, s in enumerate(saved):
            expected = self._cuda.state_numel(i) if i < here else None
            states.append(check_torch_bytes(f"cuda[{i}]", s, expected))
        if len({int(s.numel()) for s in states}) > 1:
            raise StateMismatchError(
                f"RNGState part 'cuda' holds device states of different lengths "
                f"{[int(s.numel()) for s in states]}; the record is corrupt"
            )
        if not states:
            if self._cuda.initialized():
                notes.append(
                    "RNGState: the checkpoint holds no CUDA RNG state (CUDA was not initialised when it was "
                    f"saved); the {here} CUDA generator(s) here keep their current state, so CUDA random "
                    "numbers will differ from the original run. Initialise CUDA before saving to capture them."
                )
            return []
        if len(states) > here and here == 0:
            notes.append(
                f"RNGState: the checkpoint holds CUDA RNG state for {len(states)} device(s) but this process "
                "has no CUDA device; those states are ignored, so CUDA random numbers of the original run "
                "are not reproduced here."
            )
        elif len(states) > here:
            notes.append(
                f"RNGState: the checkpoint holds CUDA RNG state for {len(states)} device(s) but this process "
                f"sees {here}; restored devices 0..{here - 1} and ignored the states of devices "
                f"{here}..{len(states) - 1}, so CUDA random numbers on those devices are not reproduced."
            )
        elif len(states) < here:
            notes.append(
                f"RNGState: the checkpoint holds CUDA RNG state for {len(states)} device(s) but this process "
                f"sees {here}; devices {len(states)}..{here - 1} keep their current state."
            )
        return [functools.partial(self._cuda.set_state, i, s) for i, s in enumerate(states[:here])]

    def _plan_generators(self, saved: Any, notes: list[str]) -> list[Callable[[], None]]:
        if not isinstance(saved, Mapping):
            raise StateMismatchError(
                f"RNGState part 'generators' must be a dict by name, got {type(saved).__name__}"
            )
        plan: list[Callable[[], None]] = []
        for name, gen in self._generators.items():
            if name not in saved:
                notes.append(
                    f"RNGState: generator {name!r} is registered but the checkpoint has no state for it; it "
                    "keeps its current state. It was probably registered after the checkpoint was written."
                )
                continue
            plan.append(plan_restore(f"generators[{name!r}]", gen, saved[name]))
        for name in saved:
            if name not in self._generators:
                notes.append(
                    f"RNGState: the checkpoint holds state for generator {name!r}, which is not registered "
                    f"here; it is ignored. Call rng.register({name!r}, gen) before restoring to restore it."
                )
        return plan

    def __repr__(self) -> str:
        return f"RNGState(generators={sorted(self._generators)})"
