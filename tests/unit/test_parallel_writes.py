"""A save writes a checkpoint's large files side by side, and a failure in one still leaves nothing visible."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import resumekit as rk
from resumekit.errors import StorageError
from resumekit.storage.base import Stage
from resumekit.storage.local import LocalStorage

BIG = 3 << 20  # float32 elements: 12 MiB per tensor file, above the threshold for a thread of its own


def _state(n: int) -> dict[str, dict[str, torch.Tensor]]:
    return {f"part{i}": {"w": torch.full((BIG,), float(i))} for i in range(n)}


class _HookedStage:
    """A stage that calls ``before_body(relpath)`` once a tensor file is open, before its bytes."""

    def __init__(self, inner: Stage, before_body: Callable[[str], None]) -> None:
        self._inner, self._before_body = inner, before_body

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # parallel_files, commit, abort

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        with self._inner.open_write(relpath) as f:
            if relpath.endswith(".safetensors"):
                self._before_body(relpath)
            yield f


class _HookedDisk(LocalStorage):
    def __init__(self, path: Path, before_body: Callable[[str], None]) -> None:
        super().__init__(str(path))
        self._before_body = before_body

    def stage(self, step: int, writer_id: str) -> Stage:
        return _HookedStage(super().stage(step, writer_id), self._before_body)  # type: ignore[return-value]


def test_tensor_files_are_written_at_the_same_time(tmp_path: Path) -> None:
    # Two writes must be inside open_write together to pass the barrier; one after the other, it breaks.
    barrier = threading.Barrier(2, timeout=20)
    ckpt = rk.Checkpointer(tmp_path, storage=_HookedDisk(tmp_path, lambda relpath: barrier.wait()))
    ckpt.save(_state(2), step=1)
    target: dict[str, dict[str, torch.Tensor]] = {"part0": {}, "part1": {}}
    ckpt.restore(target)
    assert torch.equal(target["part1"]["w"], torch.full((BIG,), 1.0))


def test_a_failing_file_among_parallel_writes_commits_nothing(tmp_path: Path) -> None:
    rk.Checkpointer(tmp_path).save(_state(3), step=1)
    finished: list[str] = []
    lock = threading.Lock()

    def before_body(relpath: str) -> None:
        if relpath.startswith("part1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        with lock:
            finished.append(relpath)

    ckpt = rk.Checkpointer(tmp_path, storage=_HookedDisk(tmp_path, before_body))
    with pytest.raises(StorageError) as info:
        ckpt.save(_state(3), step=2)
    assert info.value.errno == errno.ENOSPC
    assert sorted(finished) == ["part0.safetensors", "part2.safetensors"]  # the others ran to the end
    assert ckpt.steps() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000001"]  # the staging folder is gone


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_large_files_are_handed_to_the_disk_while_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write-back hint covers each written range once, in order, and never changes the bytes.
    hints: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        hints.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    state = {"big": {"w": torch.arange(BIG * 3, dtype=torch.float32)}}  # 36 MiB of tensor data
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save(state, step=1)
    assert hints and hints[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(hints, hints[1:]))  # contiguous, no gaps or overlaps
    assert sum(n for _, n in hints) >= 32 << 20
    target: dict[str, dict[str, torch.Tensor]] = {"big": {}}
    ckpt.restore(target)
    assert torch.equal(target["big"]["w"], state["big"]["w"])
