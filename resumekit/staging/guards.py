"""Hold back the first in-place write to a tensor whose staging copy is still pending.

Two interceptors, both installed only while a save has pending copies, on the thread that called
``save_async``:

- a global optimizer step pre-hook: a step writes every parameter and moment of its optimizer, so it
  waits for all pending copies (by then they have usually overlapped the forward and backward);
- a torch function mode at the *bottom* of that thread's mode stack (so a user's ``with`` mode entered
  earlier still pops its own mode on exit): an in-place op (``add_``, ``copy_`` as in
  ``load_state_dict``, ``__setitem__``, ``out=``, ``_foreach_*_``) on a pending tensor's storage waits
  for that tensor's copy only.

What neither sees (another thread, C++ code, a compiled graph) is caught afterwards by version counters
in :mod:`resumekit.staging.buffers`, which fails the save rather than commit a changed value. The mode is
removed by the first optimizer step or module call after the copies finish, or by the next checkpointer
call; until then it only costs a dictionary lookup per op.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from resumekit.staging.buffers import OverlapStager

__all__ = ["Guard"]

_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
        "matmul",
    )
) | {"__setitem__", "set_"}
_is_inplace_cache: dict[Any, bool] = {}


def _is_inplace(func: Any) -> bool:
    try:
        return _is_inplace_cache[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", "") or ""
    verdict = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    try:
        _is_inplace_cache[func] = verdict
    except TypeError:
        pass
    return verdict


class _WriteGuardMode(TorchFunctionMode):
    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        stager = self._guard.stager
        if stager is not None and (_is_inplace(func) or "out" in kwargs):
            if args:
                stager.before_write(args[0])
            if "out" in kwargs:
                stager.before_write(kwargs["out"])
        return func(*args, **kwargs)


class Guard:
    """The interceptors of one checkpointer; armed per save, disarmed once its copies are done."""

    def __init__(self) -> None:
        self.stager: OverlapStager | None = None
        self._mode: _WriteGuardMode | None = None
        self._owner: int | None = None
        self._hooks: list[Any] = []

    def arm(self, stager: OverlapStager) -> None:
        """Watch ``stager``'s pending tensors from the calling thread on."""
        self.disarm()
        if not stager.pending:
            return
        self.stager = stager
        self._owner = threading.get_ident()
        self._hooks = [
            register_optimizer_step_pre_hook(self._before_step),
            register_module_forward_pre_hook(self._tick),
        ]
        if self._mode is None:  # else: the previous mode could not be removed yet and is still in place
            self._mode = _WriteGuardMode(self)
            _push_bottom(self._mode)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        stager = self.stager
        if stager is not None:
            stager.before_write_all()
        self.disarm_if_done()

    def _tick(self, module: Any, args: Any) -> None:
        self.disarm_if_done()

    def wait_all(self) -> None:
        """Wait for every pending copy of the current save (writes may follow at once), then disarm."""
        if self.stager is not None:
            self.stager.before_write_all()
        self.disarm_if_done()

    def disarm_if_done(self) -> None:
        """Remove the interceptors once nothing is pending (only from the owning thread)."""
        if threading.get_ident() != self._owner:
            return
        if self.stager is not None and self.stager.pending:
            return
        self.disarm()

    def disarm(self) -> None:
        """Remove the interceptors now (the mode only from the owning thread, else later)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.stager = None
        owner_here = self._owner is None or threading.get_ident() == self._owner
        if self._mode is not None and owner_here and _remove(self._mode):
            self._mode = None
            self._owner = None


def _push_bottom(mode: TorchFunctionMode) -> None:
    above = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    torch._C._push_on_torch_function_stack(mode)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


def _remove(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` out of this thread's stack, keeping the others in order; False if it is not there
    (e.g. a mode's handler is running and has popped itself: retry later)."""
    n = torch._C._len_torch_function_stack()
    stack = [torch._C._get_function_stack_at(i) for i in range(n)]
    if not any(m is mode for m in stack):
        return False
    above = []
    while True:
        m = torch._C._pop_torch_function_stack()
        if m is mode:
            break
        above.append(m)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)
    return True
