"""Fixtures shared by the fault tests: two committed checkpoints, copied fresh for each test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import resumekit as rk


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Steps 1 and 2 saved from the requesting module's ``_state(step)``; never modified."""
    root = tmp_path_factory.mktemp("pristine")
    ckpt = rk.Checkpointer(root)
    ckpt.save(request.module._state(1), step=1)
    ckpt.save(request.module._state(2), step=2)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of ``pristine`` that the test may damage."""
    dst = tmp_path / "root"
    shutil.copytree(pristine, dst)
    return dst
