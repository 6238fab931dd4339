"""Disk-full tests: ENOSPC at any write, fsync, rename or mkdir of a save leaves no visible step, keeps
every earlier checkpoint, and raises a StorageError that keeps the errno and names the path; plus a real
ENOSPC on a tiny tmpfs where the machine allows mounting one."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import StorageError
from resumekit.storage import local as _storage
from resumekit.testing.strategies import assert_identical

OPS = ("mkdir", "open-w", "write", "flush", "fsync", "rename")


def _state(step: int, width: int = 32) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": nn.Linear(width, width), "meta": {"step": step, "t": torch.arange(5) * step}}


def _target() -> dict[str, Any]:
    return {"model": nn.Linear(32, 32), "meta": {}}


class DiskFull:
    """Fails the n-th operation of one kind with ENOSPC, the way a full disk does; counts all of them.

    Installed on the storage module's view of the OS (``open`` and ``os``), so only checkpoint I/O sees
    it; records every operation in order so a test can tell where the commit point (the rename) lies.
    """

    def __init__(self, op: str | None = None, n: int = 0) -> None:
        self.op, self.n = op, n
        self.counts = dict.fromkeys(OPS, 0)
        self.log: list[str] = []

    def hit(self, op: str, path: str = "") -> None:
        self.counts[op] += 1
        self.log.append(op)
        if op == self.op and self.counts[op] == self.n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fsync, real_rename, real_mkdir = builtins.open, os.fsync, os.rename, os.mkdir
        faults = self

        class File:
            def __init__(self, f: Any, path: str) -> None:
                self._f, self._path = f, path

            def write(self, data: Any) -> int:
                faults.hit("write", self._path)
                n: int = self._f.write(data)
                return n

            def flush(self) -> None:
                faults.hit("flush", self._path)
                self._f.flush()

            def __enter__(self) -> File:
                return self

            def __exit__(self, *exc: Any) -> None:
                self._f.__exit__(*exc)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if set(mode) & set("wax+"):
                faults.hit("open-w", str(file))
                return File(real_open(file, mode, *args, **kwargs), str(file))
            return real_open(file, mode, *args, **kwargs)

        def fsync(fd: Any) -> None:
            faults.hit("fsync")
            real_fsync(fd)

        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            faults.hit("rename", str(dst))
            real_rename(src, dst, *args, **kwargs)

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if not os.path.exists(path):  # makedirs(exist_ok=True) probes existing folders: no space needed
                faults.hit("mkdir", str(path))
            real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(_storage, "open", open_, raising=False)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    rk.Checkpointer(root).save(_state(1), step=1)
    return root


def _fresh_root(pristine: Path, where: Path) -> Path:
    shutil.copytree(pristine, where)
    return where


def _sequence(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    root = _fresh_root(pristine, tmp_path / "count")
    counter = DiskFull()
    counter.install(monkeypatch)
    rk.Checkpointer(root).save(_state(2), step=2)
    monkeypatch.undo()
    return counter.log


def _points(log: list[str], *, after_commit: bool) -> list[tuple[str, int]]:
    """(op, n) for every operation before (or after) the commit rename."""
    commit = max(i for i, op in enumerate(log) if op == "rename")
    seen = dict.fromkeys(OPS, 0)
    points = []
    for i, op in enumerate(log):
        seen[op] += 1
        if (i > commit) == after_commit and not (i == commit and after_commit):
            points.append((op, seen[op]))
    return points


def _check_failed_save(root: Path, pristine_files: set[str], exc: StorageError, label: str) -> None:
    assert exc.errno == errno.ENOSPC, f"{label}: errno {exc.errno}"
    assert isinstance(exc, OSError) and isinstance(exc, rk.ResumeKitError)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC
    assert str(root) in str(exc), f"{label}: the error does not name the path: {exc}"
    assert "disk is full" in str(exc).lower(), f"{label}: no hint in {exc}"
    ckpt = rk.Checkpointer(root)
    assert ckpt.steps() == [1], f"{label}: a step became visible"
    assert {str(p.relative_to(root)) for p in root.rglob("*")} == pristine_files, f"{label}: debris left"
    target = _target()
    result = ckpt.restore(target)
    assert result is not None and result.step == 1
    assert_identical(_state(1)["model"].state_dict(), target["model"].state_dict())
    # Space is back: the same step saves and restores.
    ckpt.save(_state(2), step=2)
    target = _target()
    assert ckpt.restore(target) is not None
    assert_identical(_state(2)["meta"], target["meta"])


def test_enospc_at_every_operation_before_the_commit(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _sequence(pristine, tmp_path, monkeypatch)
    points = _points(log, after_commit=False)
    assert {op for op, _ in points} == set(OPS), f"the save never did some operations: {log}"
    pristine_files = {str(p.relative_to(pristine)) for p in pristine.rglob("*")}
    for i, (op, n) in enumerate(points):
        root = _fresh_root(pristine, tmp_path / f"r{i}")
        fault = DiskFull(op, n)
        fault.install(monkeypatch)
        with pytest.raises(StorageError) as info:
            rk.Checkpointer(root).save(_state(2), step=2)
        monkeypatch.undo()
        assert fault.counts[op] == n
        _check_failed_save(root, pristine_files, info.value, f"ENOSPC at {op} #{n}")


def test_enospc_after_the_rename_leaves_no_visible_step(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _sequence(pristine, tmp_path, monkeypatch)
    points = _points(log, after_commit=True)
    assert points == [("fsync", log.count("fsync"))], points  # only the parent's fsync follows the rename
    root = _fresh_root(pristine, tmp_path / "after")
    DiskFull(*points[0]).install(monkeypatch)
    with pytest.raises(StorageError) as info:
        rk.Checkpointer(root).save(_state(2), step=2)
    monkeypatch.undo()
    _check_failed_save(root, {str(p.relative_to(pristine)) for p in pristine.rglob("*")}, info.value, "after")


def test_enospc_during_retention_keeps_the_new_checkpoint(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deleting needs no space, but a failing delete must not undo a committed save.
    root = _fresh_root(pristine, tmp_path / "ret")
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("manifest.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(UserWarning, match="retention"):
        info = rk.Checkpointer(root, keep_last=1).save(_state(2), step=2)
    monkeypatch.undo()
    assert info.step == 2
    ckpt = rk.Checkpointer(root, keep_last=1)
    assert ckpt.steps() == [1, 2]
    ckpt.save(_state(3), step=3)  # retention retried after the next save
    assert ckpt.steps() == [3]


# -- a real full disk -------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted in teardown; skipped where mounting is not allowed."""
    mnt = Path(tempfile.mkdtemp(prefix="resumekit-tmpfs-"))
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        os.rmdir(mnt)
        pytest.skip("mounting a tmpfs needs root; this test runs as an ordinary user")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs here (container without CAP_SYS_ADMIN?): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        os.rmdir(mnt)


def test_real_enospc_on_a_full_tmpfs(tiny_tmpfs: Path) -> None:
    root = tiny_tmpfs / "run"
    ckpt = rk.Checkpointer(root)
    ckpt.save(_state(1), step=1)  # ~5 KiB: fits
    files_before = {str(p.relative_to(root)) for p in root.rglob("*")}
    big = {"model": nn.Linear(1024, 512), "meta": {"step": 2}}  # ~2 MiB of weights: does not fit
    with pytest.raises(StorageError) as info:
        ckpt.save(big, step=2)
    assert info.value.errno == errno.ENOSPC
    assert str(root) in str(info.value)
    assert ckpt.steps() == [1]
    assert {str(p.relative_to(root)) for p in root.rglob("*")} == files_before  # the partial save is gone
    target = _target()
    result = ckpt.restore(target)
    assert result is not None and result.step == 1
    assert_identical(_state(1)["model"].state_dict(), target["model"].state_dict())
    ckpt.save(_state(2), step=2)  # a save that fits still works after the failure
    assert ckpt.steps() == [1, 2]
