"""What the run prints: a tqdm bar on a terminal, plain periodic log lines otherwise.

Logging goes to stderr. While a bar is shown, log records are written through ``tqdm.write`` so they do
not tear the bar. Only rank 0 prints progress; other ranks print warnings and errors, prefixed.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Optional

__all__ = ["Progress", "configure_logging", "reset_logging"]

log = logging.getLogger("reference_trainer")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """A stderr handler that routes through ``tqdm.write`` on a terminal."""

    def __init__(self, use_tqdm: bool) -> None:
        super().__init__(sys.stderr)
        self.use_tqdm = use_tqdm

    def emit(self, record: logging.LogRecord) -> None:
        if not self.use_tqdm:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


_saved_levels: dict[str, int] = {}


def configure_logging(rank: int = 0) -> None:
    """Send the pretrainer's and resumekit's log records, and Python warnings, to stderr.

    Calling it again (once the rank is known) reconfigures the same handler. Drift warnings reach the
    log once, through resumekit's logger; their duplicate as a Python warning is silenced.
    :func:`reset_logging` undoes all of it (for in-process callers such as tests).
    """
    from resumekit.drift import DriftWarning

    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler(use_tqdm=sys.stderr.isatty())
        root.addHandler(handler)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("reference_trainer", "resumekit"):
        logger = logging.getLogger(name)
        _saved_levels.setdefault(name, logger.level)
        logger.setLevel(level)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=DriftWarning)


def reset_logging() -> None:
    """Remove what :func:`configure_logging` installed (handler, levels, warning capture)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    for name, level in _saved_levels.items():
        logging.getLogger(name).setLevel(level)
    _saved_levels.clear()
    logging.captureWarnings(False)


class Progress:
    """Reports training progress in micro-batches, with loss, learning rate and throughput.

    Args:
        total: Micro-batches of the whole training run.
        initial: Micro-batches already trained (after a resume).
        enabled: Whether this process reports (rank 0).
        log_every: Optimizer steps between plain log lines.
        bar: Show a tqdm bar; ``None`` decides by whether stderr is a terminal.
    """

    def __init__(
        self, *, total: int, initial: int, enabled: bool, log_every: int, bar: Optional[bool] = None
    ) -> None:
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self._bar: Any = None
        self._t0 = time.perf_counter()
        self._samples = 0
        self._last_logged_step = -1
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="batch", dynamic_ncols=True, file=sys.stderr)

    def update(
        self, *, micro: int, opt_steps: int, epoch: float, loss: float, lr: float, samples: int
    ) -> None:
        """Report one trained micro-batch of ``samples`` global samples."""
        if not self.enabled:
            return
        self._samples += samples
        rate = self._samples / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                epoch=f"{epoch:.2f}", step=opt_steps, loss=f"{loss:.4g}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}",
                refresh=False,
            )  # fmt: skip
            return
        if opt_steps % self.log_every == 0 and opt_steps != self._last_logged_step:
            self._last_logged_step = opt_steps
            log.info(
                "epoch %.2f  step %d  micro-batch %d  loss %.5g  lr %.3g  %.0f samples/s",
                epoch, opt_steps, micro, loss, lr, rate,
            )  # fmt: skip

    def close(self) -> None:
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
