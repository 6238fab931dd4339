"""Render the loss curves of a history as a PNG, with the points where the run resumed marked."""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["render_loss_plot"]


def _finite(points: list[tuple[float, Any]]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, y in points:
        if isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def render_loss_plot(history: dict[str, Any]) -> bytes:
    """Draw train and validation loss against epochs, and the validation distance spread.

    Resume points are vertical dashed lines. Uses matplotlib's Agg backend (no display needed).

    Args:
        history: A history dict (:mod:`reference_trainer.history`).

    Returns:
        PNG bytes.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    loss_ax, spread_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    epochs = history.get("epochs", [])
    cx, cy = _finite([(p[0], p[1]) for p in history.get("train_curve", [])])
    if cx:
        loss_ax.plot(cx, cy, color="tab:blue", alpha=0.35, lw=1, label="train loss (running)")
    tx, ty = _finite([(r["epoch"], r.get("train_loss")) for r in epochs])
    vx, vy = _finite([(r["epoch"], r.get("val_loss")) for r in epochs])
    loss_ax.plot(tx, ty, "o-", color="tab:blue", label="train loss (epoch mean)")
    loss_ax.plot(vx, vy, "s-", color="tab:orange", label="validation loss")
    if all(y > 0 for y in cy + ty + vy) and (cy or ty or vy):
        loss_ax.set_yscale("log")
    sx, sy = _finite([(r["epoch"], r.get("val_spread_ratio")) for r in epochs])
    spread_ax.plot(sx, sy, "s-", color="tab:green", label="predicted / target distance std")
    spread_ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    for i, point in enumerate(history.get("resume_points", [])):
        for ax in (loss_ax, spread_ax):
            ax.axvline(point["epoch"], color="tab:red", ls="--", lw=1, label="resumed" if i == 0 else None)
    status = history.get("status", "?")
    last = history.get("last_completed_epoch", 0)
    planned = history.get("epochs_planned", "?")
    loss_ax.set_title(f"Pretraining: {status}, {last} of {planned} epochs")
    loss_ax.set_ylabel("MSE of pair distances")
    spread_ax.set_ylabel("spread ratio")
    spread_ax.set_xlabel("epoch")
    loss_ax.legend(loc="upper right", fontsize=8)
    spread_ax.legend(loc="lower right", fontsize=8)
    loss_ax.grid(alpha=0.3)
    spread_ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
