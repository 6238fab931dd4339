"""A save writes a checkpoint's large files side by side, and a failure in one still leaves nothing visible."""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import torch

import resumekit as rk
from resumekit.errors import StorageError
from resumekit.storage import local as _storage

BIG = 3 << 20  # float32 elements: 12 MiB per tensor file, above the threshold for a thread of its own


def _state(n: int) -> dict[str, dict[str, torch.Tensor]]:
    return {f"part{i}": {"w": torch.full((BIG,), float(i))} for i in range(n)}


def _wrap_open_write(monkeypatch: pytest.MonkeyPatch, before_body: object) -> None:
    original = _storage._LocalStage.open_write

    @contextlib.contextmanager
    def open_write(self: _storage._LocalStage, relpath: str) -> Iterator[IO[bytes]]:
        with original(self, relpath) as f:
            if relpath.endswith(".safetensors"):
                before_body(relpath)  # type: ignore[operator]
            yield f

    monkeypatch.setattr(_storage._LocalStage, "open_write", open_write)


def test_tensor_files_are_written_at_the_same_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two writes must be inside open_write together to pass the barrier; one after the other, it breaks.
    barrier = threading.Barrier(2, timeout=20)
    _wrap_open_write(monkeypatch, lambda relpath: barrier.wait())
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save(_state(2), step=1)
    target: dict[str, dict[str, torch.Tensor]] = {"part0": {}, "part1": {}}
    ckpt.restore(target)
    assert torch.equal(target["part1"]["w"], torch.full((BIG,), 1.0))


def test_a_failing_file_among_parallel_writes_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save(_state(3), step=1)
    finished: list[str] = []
    lock = threading.Lock()

    def before_body(relpath: str) -> None:
        if relpath.startswith("part1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        with lock:
            finished.append(relpath)

    _wrap_open_write(monkeypatch, before_body)
    with pytest.raises(StorageError) as info:
        ckpt.save(_state(3), step=2)
    assert info.value.errno == errno.ENOSPC
    assert sorted(finished) == ["part0.safetensors", "part2.safetensors"]  # the others ran to the end
    assert ckpt.steps() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000001"]  # the staging folder is gone
