"""The run's history: per-epoch metrics, a finer train-loss curve, resume points and completion status.

The history is a plain dict that travels **inside every checkpoint** (a mapping entry of the state), so
after a kill it is exactly what it was at the checkpoint the run resumes from: no epoch is lost or
counted twice, and nothing from the lost stretch after the checkpoint survives. ``history.json`` is an
export of it, rewritten at every epoch end, stop and failure.

Invariant: ``status == "complete"`` (and ``complete: true``) is written only after
``final/model.safetensors`` exists; a partial run is never reported complete.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "FORMAT",
    "epoch_position",
    "new_history",
    "record_curve_point",
    "record_epoch",
    "record_resume",
    "set_status",
]

FORMAT = 1


def new_history(epochs_planned: int) -> dict[str, Any]:
    """An empty history of a fresh run.

    Keys: ``format``; ``status`` (``"running"``, ``"incomplete"``, ``"complete"`` or ``"failed"``);
    ``complete``; ``stop_reason``; ``epochs_planned``; ``last_completed_epoch`` (1-based count of
    epochs trained and validated; 0 before the first); ``early_stopped``; ``epochs`` (one record each);
    ``train_curve`` (``[epoch position, mean train loss]`` pairs, about ten an epoch);
    ``resume_points`` (where each resumed invocation started); ``last_error``.
    """
    return {
        "format": FORMAT,
        "status": "running",
        "complete": False,
        "stop_reason": None,
        "epochs_planned": int(epochs_planned),
        "last_completed_epoch": 0,
        "early_stopped": False,
        "epochs": [],
        "train_curve": [],
        "resume_points": [],
        "last_error": None,
    }


def epoch_position(epochs_done: int, micro_in_epoch: int, micro_per_epoch: int) -> float:
    """Training progress in epochs (``2.5`` is half-way through the third epoch)."""
    return epochs_done + (micro_in_epoch / micro_per_epoch if micro_per_epoch else 0.0)


def record_epoch(history: dict[str, Any], record: dict[str, Any]) -> None:
    """Add the metrics of one finished epoch (``record["epoch"]`` is 1-based).

    An epoch already present (re-trained after a resume from an earlier checkpoint) is replaced, so each
    epoch appears once.
    """
    epochs = [r for r in history["epochs"] if r["epoch"] != record["epoch"]]
    epochs.append(dict(record))
    epochs.sort(key=lambda r: r["epoch"])
    history["epochs"] = epochs
    history["last_completed_epoch"] = max(int(r["epoch"]) for r in epochs)


def record_curve_point(history: dict[str, Any], position: float, mean_loss: float) -> None:
    """Add one point of the fine train-loss curve."""
    history["train_curve"].append([float(position), float(mean_loss)])


def record_resume(
    history: dict[str, Any], *, step: int, position: float, optimizer_steps: int, source: str
) -> None:
    """Note that this invocation resumed from checkpoint ``step`` at ``position`` (in epochs)."""
    history["resume_points"].append(
        {"step": int(step), "epoch": float(position), "optimizer_steps": int(optimizer_steps), "from": source}
    )


def set_status(
    history: dict[str, Any],
    status: str,
    *,
    reason: Optional[str] = None,
    error: Optional[str] = None,
) -> None:
    """Set the completion status.

    Args:
        history: The history to update.
        status: ``"running"``, ``"incomplete"`` (stopped early; resubmit), ``"complete"`` or ``"failed"``.
        reason: Why the run stopped (``"max-epochs-per-run"``, ``"signal SIGTERM"``, ...).
        error: The error of a failed run.

    Raises:
        ValueError: An unknown status.
    """
    if status not in ("running", "incomplete", "complete", "failed"):
        raise ValueError(f"unknown history status {status!r}")
    history["status"] = status
    history["complete"] = status == "complete"
    if reason is not None:
        history["stop_reason"] = reason
    if error is not None:
        history["last_error"] = error
