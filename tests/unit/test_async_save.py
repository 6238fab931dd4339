"""Checkpointer.save_async: blocks only for the host copy, holds the values at call time, never loses
an error, and at most one save is in flight."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import resumekit as rk
from resumekit.errors import StepExistsError
from resumekit.storage import open_storage


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))


def test_checkpoint_holds_values_at_the_call(tmp_path: Path) -> None:
    model = _model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async({"model": model}, step=1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on right after the call
        info = ckpt.wait()
    assert info is not None and info.step == 1
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    rk.Checkpointer(tmp_path).restore({"model": fresh})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k])


class _FullDisk:
    """Storage wrapper whose data writes fail with ENOSPC (the background thread hits it)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.full = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def stage(self, step: int, writer_id: str) -> object:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._inner.stage(step, writer_id)


def test_background_error_surfaces_at_next_call_and_is_not_lost(tmp_path: Path) -> None:
    model = _model()
    disk = _FullDisk(open_storage(tmp_path))
    ckpt = rk.Checkpointer(tmp_path, storage=disk)
    ckpt.save({"model": model}, step=3)
    disk.full = True
    ckpt.save_async({"model": model}, step=4)  # returns: the failure happens in the background
    disk.full = False
    with pytest.raises(OSError) as err:
        ckpt.save_async({"model": model}, step=5)  # the next call raises the earlier failure...
    assert err.value.errno == errno.ENOSPC
    assert ckpt.steps() == [3]  # ...and step 5 was not started
    ckpt.save_async({"model": model}, step=5)
    ckpt.save_async({"model": model}, step=6)  # waits for 5 first: at most one save in flight
    assert ckpt.wait() is not None
    assert ckpt.steps() == [3, 5, 6]
    disk.full = True
    ckpt.save_async({"model": model}, step=7)
    with pytest.raises(OSError):
        ckpt.close()  # close() raises it too
    assert ckpt.steps() == [3, 5, 6]


def test_snapshot_errors_raise_at_the_call(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    with pytest.raises(StepExistsError):
        ckpt.save({"model": _model()}, step=1)
        ckpt.save_async({"model": _model()}, step=1)
    with pytest.raises(TypeError, match="at 'x'"):
        ckpt.save_async({"extra": {"x": object()}}, step=2)
    assert ckpt.wait() is None
    assert ckpt.steps() == [1]


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    model = _model()
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save_async({"model": model}, step=1)
    ckpt.wait()
    first = {k: v.data_ptr() for k, v in ckpt._async.buffers._own.items()}
    assert first  # every tensor of this small model is copied at the call, into an owned buffer
    ckpt.save_async({"model": model}, step=2)
    ckpt.wait()
    assert {k: v.data_ptr() for k, v in ckpt._async.buffers._own.items()} == first
    ckpt.close()


def test_interpreter_exit_finishes_the_inflight_save(tmp_path: Path) -> None:
    code = (
        "import torch, resumekit as rk\n"
        "m = torch.nn.Linear(256, 256)\n"
        f"ck = rk.Checkpointer({str(tmp_path)!r})\n"
        "ck.save_async({'model': m}, step=11)\n"
        "# no wait(): the interpreter exits right away\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert rk.Checkpointer(tmp_path).steps() == [11]
    fresh = torch.nn.Linear(256, 256)
    assert rk.Checkpointer(tmp_path).restore({"model": fresh}) is not None
