"""Pure arithmetic of the run: learning-rate schedule, accumulation windows, and when to stop.

Field lesson: the schedule's length is counted in **optimizer steps**. With accumulation ``A`` an epoch
of ``M`` micro-batches has ``ceil(M / A)`` optimizer steps (the last window of an epoch may be shorter:
windows never cross an epoch boundary, so validation always sees a freshly stepped model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["StopBudget", "optimizer_steps_per_epoch", "warmup_cosine", "window_size"]


def optimizer_steps_per_epoch(micro_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of ``micro_per_epoch`` micro-batches."""
    return math.ceil(micro_per_epoch / accumulation)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The LR multiplier of optimizer step ``s``: linear warmup, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def window_size(in_window: int, left_in_epoch: int, accumulation: int) -> int:
    """Micro-batches in the accumulation window the next micro-batch belongs to.

    Args:
        in_window: Micro-batches already accumulated in the current window.
        left_in_epoch: Micro-batches left in the epoch, the next one included.
        accumulation: ``--grad-accumulation``.

    Returns:
        The window's size: the loss of each of its micro-batches is divided by it, so a window's
        gradient is the mean over its micro-batches even when the epoch's last window is short.
    """
    return in_window + min(accumulation - in_window, left_in_epoch)


@dataclass
class StopBudget:
    """Decides at each step boundary whether this invocation must stop (checkpoint, exit 75).

    Args:
        max_micro: Micro-batches this invocation may train (from ``--max-epochs-per-run``), or None.
        seconds: ``--time-budget`` in seconds, or None.
        started: ``time.monotonic()`` when the invocation started.

    The time budget stops **before** it runs out: the next piece of work (a micro-batch, plus
    validation if the epoch ends with it) and a checkpoint must still fit. Their durations are
    estimated by the slowest seen so far, with a margin, plus a reserve for writing the history and the
    plot. At least one micro-batch is trained per
    invocation, so resubmissions always make progress.
    """

    max_micro: Optional[int]
    seconds: Optional[float]
    started: float
    trained: int = 0
    slowest_micro: float = 0.0
    slowest_save: float = 0.5
    slowest_validation: float = 0.0
    #: Seconds kept for what follows the last checkpoint: history.json and the plot (matplotlib's import).
    finish_reserve: float = 2.0

    def reason(self, now: float, *, epoch_ends_next: bool) -> Optional[str]:
        """Why to stop now, or None to go on."""
        if self.max_micro is not None and self.trained >= self.max_micro:
            return "max-epochs-per-run"
        if self.seconds is not None and self.trained > 0:
            need = 1.5 * (self.slowest_micro + self.slowest_save) + self.finish_reserve
            if epoch_ends_next:
                need += 1.5 * self.slowest_validation
            if now - self.started + need >= self.seconds:
                return "time-budget"
        return None
