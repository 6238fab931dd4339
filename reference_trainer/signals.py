"""Turn SIGTERM, SIGUSR1 and Ctrl-C into a request to checkpoint at the next step boundary.

The handlers only set a flag: the training loop looks at it between micro-batches, where the state is
consistent, saves a checkpoint and exits 75. Nothing is written from inside a signal handler.
A second Ctrl-C raises ``KeyboardInterrupt`` at once, for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Optional

__all__ = ["STOP_SIGNALS", "StopSignals"]

#: SIGTERM: scheduler or ``kill``; SIGUSR1: SLURM's warning before the time limit (``--signal=USR1@120``);
#: SIGINT: Ctrl-C.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s
)


class StopSignals:
    """A context manager that records the first stop signal received while it is active.

    Handlers are installed only in the main thread (Python allows nothing else) and the previous
    handlers are restored on exit.

    Attributes:
        received: The name of the first signal received (``"SIGTERM"``), or ``None``.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        if self.received is None:
            self.received = name

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.received is not None
