"""``--resume-from {auto,none,PATH}``: which checkpoint a run starts from, read exactly once.

Field lesson: a checkpoint loaded twice on resume (once to peek at its config, once to load) doubles the
time to resume and can load two different checkpoints if one is committed in between. Here the state is
restored by a single ``Checkpointer.restore`` call, which reads every file of one checkpoint once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import resumekit as rk
from reference_trainer.config import UsageError

__all__ = ["restore_state", "split_step_url"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def split_step_url(url: str) -> tuple[str, Optional[int]]:
    """Split ``.../checkpoints/step-000000000120`` into ``(".../checkpoints", 120)``.

    A URL that does not end in a step folder is a checkpoints root: ``(url, None)``.
    """
    trimmed = url.rstrip("/")
    head, _, tail = trimmed.rpartition("/")
    match = _STEP_DIR.match(tail)
    if match and head:
        return head, int(match.group(1))
    return trimmed, None


def restore_state(
    resume_from: str, state: Mapping[str, Any], ckpt: rk.Checkpointer, config: Mapping[str, Any]
) -> Optional[rk.RestoreResult]:
    """Restore ``state`` in place as ``--resume-from`` says.

    Args:
        resume_from: ``"auto"``, ``"none"`` or a checkpoint folder / checkpoints root URL.
        state: The training state.
        ckpt: The run's own checkpointer (in the output dir).
        config: The training config, compared with the checkpoint's for drift.

    Returns:
        What was restored, or None for a fresh start.

    Raises:
        UsageError: ``none`` while the output dir already holds checkpoints, or ``PATH`` holds none.
        ResumeKitError: The checkpoint cannot be restored (corrupt, drift error, state mismatch).
    """
    if resume_from == "auto":
        return ckpt.restore(state)
    if resume_from == "none":
        existing = ckpt.steps()
        if existing:
            raise UsageError(
                f"--resume-from none, but {ckpt.url} already holds checkpoints (steps {existing[0]}..{existing[-1]}); "
                "starting fresh would mix two runs in one folder. Use --resume-from auto to continue that run, "
                "or choose a new --output-dir."
            )
        return None
    root, step = split_step_url(resume_from)
    source = ckpt if root.rstrip("/") == ckpt.url.rstrip("/") else rk.Checkpointer(root, config=dict(config))
    result = source.restore(state, step=step)
    if result is None:
        raise UsageError(
            f"--resume-from {resume_from}: no committed checkpoint there. Pass a checkpoint folder "
            "(.../checkpoints/step-000000000120) or a checkpoints root, or --resume-from auto."
        )
    return result
