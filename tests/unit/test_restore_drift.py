"""Drift through the Checkpointer: reported on the result and as warnings; errors load nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import resumekit as rk
from resumekit.drift import DriftWarning
from resumekit.errors import DriftError


def test_amp_dtype_change_is_reported(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    rk.Checkpointer(tmp_path, amp_dtype=torch.bfloat16).save({"model": model}, step=1)
    with pytest.warns(DriftWarning, match="amp_dtype"):
        result = rk.Checkpointer(tmp_path, amp_dtype=torch.float16).restore({"model": torch.nn.Linear(2, 2)})
    assert result is not None
    assert [i.key for i in result.drift.warnings] == ["env.amp_dtype"]


def test_batch_size_change_warns_with_effective_batch(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    rk.Checkpointer(tmp_path, config={"batch_size": 32, "grad_accumulation": 4}).save(
        {"model": model}, step=1
    )
    ckpt = rk.Checkpointer(tmp_path, config={"batch_size": 64, "grad_accumulation": 4})
    with pytest.warns(DriftWarning, match=r"32x4x1=128 -> 64x4x1=256"):
        ckpt.restore({"model": torch.nn.Linear(2, 2)})


def test_error_level_drift_loads_nothing(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    rk.Checkpointer(tmp_path, config={"lr": 0.1}).save({"model": model}, step=1)
    fresh = torch.nn.Linear(2, 2)
    with torch.no_grad():
        fresh.weight.fill_(5.0)
    progress: dict = {"epoch": 9}
    strict = rk.Checkpointer(
        tmp_path, config={"lr": 0.2}, drift_policy=rk.DriftPolicy({"config.lr": "error"})
    )
    with pytest.raises(DriftError, match=r"config\.lr"):
        strict.restore({"model": fresh, "progress": progress}, strict=False)
    assert torch.all(fresh.weight == 5.0) and progress == {"epoch": 9}
