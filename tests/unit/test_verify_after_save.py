"""``Checkpointer(..., verify_after_save=True)``: a commit that does not read back is reported before
retention runs, so good checkpoints are never deleted in favour of it (issue 17)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import resumekit as rk
from resumekit.errors import CheckpointCorruptError
from resumekit.format.layout import step_dir
from resumekit.storage.base import Stage
from resumekit.storage.local import LocalStorage


class _LyingStage:
    """Commits for real, then damages one data byte: storage that alters an acknowledged write."""

    def __init__(self, inner: Stage, path: str) -> None:
        self._inner, self._path = inner, path
        self.data_prefix = inner.data_prefix

    def open_write(self, relpath: str) -> Any:
        return self._inner.open_write(relpath)

    def commit(self, manifest: bytes) -> None:
        self._inner.commit(manifest)
        with open(self._path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))

    def abort(self) -> None:
        self._inner.abort()


class _LyingDisk(LocalStorage):
    """A local root whose commits of steps in ``lie_on`` lose a byte of ``meta.safetensors``."""

    def __init__(self, path: str, lie_on: set[int]) -> None:
        super().__init__(path)
        self.lie_on = lie_on

    def stage(self, step: int, writer_id: str) -> Stage:
        inner = super().stage(step, writer_id)
        if step not in self.lie_on:
            return inner
        return _LyingStage(inner, os.path.join(self.root, step_dir(step), "meta.safetensors"))


def _checkpointer(root: Path, verify: bool) -> rk.Checkpointer:
    # The fake stands in for the real disk.
    return rk.Checkpointer(
        root, keep_last=1, verify_after_save=verify, storage=_LyingDisk(str(root), lie_on={2})
    )


def _state(step: int) -> dict[str, Any]:
    return {"meta": {"step": step, "w": torch.full((4,), float(step))}}


def test_verify_after_save_reports_a_lost_write_and_keeps_the_good_step(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, verify=True)
    ckpt.save(_state(1), step=1)
    with pytest.raises(CheckpointCorruptError, match="does not read back") as info:
        ckpt.save(_state(2), step=2)
    assert "crc32c" in str(info.value) and "Retention did not run" in str(info.value)
    assert ckpt.steps() == [1, 2]  # keep_last=1 did not evict step 1
    target: dict[str, Any] = {"meta": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step 2 is skipped with a warning
        result = ckpt.restore(target)
    assert result is not None and result.step == 1 and target["meta"]["step"] == 1


def test_without_verification_the_same_lost_write_costs_the_good_step(tmp_path: Path) -> None:
    # The counterfactual that makes the option worth having: the default trusts the acknowledgement.
    ckpt = _checkpointer(tmp_path, verify=False)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    assert ckpt.steps() == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointCorruptError, match="no checkpoint"):
            ckpt.restore({"meta": {}})


def test_verify_after_save_passes_a_good_commit(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1, verify_after_save=True)
    model = torch.nn.Linear(3, 3)
    for step in (1, 2):
        info = ckpt.save({"model": model, "meta": _state(step)["meta"]}, step=step)
        assert info.step == step
    assert ckpt.steps() == [2]
    ckpt.save_async({"model": model, "meta": _state(3)["meta"]}, step=3)
    assert ckpt.wait() is not None and ckpt.steps() == [3]
