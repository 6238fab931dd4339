"""The CUDA staging path on a real GPU: pinned buffers reused across saves, side-stream copies that hold
the values of the call while the next step runs, and reads from storage straight into device memory."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import resumekit as rk
from resumekit.staging import cuda as _cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODES = [("copy", None), ("overlap", None), ("overlap", 8 << 20), ("overlap", 0)]


def _objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048)
    ).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(64, 2048, device="cuda")).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("staging", "budget"), MODES)
def test_cuda_checkpoint_holds_the_values_of_the_call(
    tmp_path: Path, staging: str, budget: int | None
) -> None:
    model, opt = _objects(0)
    _step(model, opt)
    expected = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async({"model": model, "optimizer": opt}, step=1, staging=staging, staging_budget=budget)
        for _ in range(3):  # kernels enqueued right after the call, on the same stream
            _step(model, opt)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(2.0)
        ckpt.wait()
    model2, opt2 = _objects(1)
    _step(model2, opt2)
    rk.Checkpointer(tmp_path).restore({"model": model2, "optimizer": opt2})
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected["model"][k]), k
    got = opt2.state_dict()["state"]
    for pid, s in expected["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(got[pid][name].to(v.device), v), (pid, name)


@pytest.mark.timeout(60)
def test_pinned_buffers_are_reused_across_saves(tmp_path: Path) -> None:
    model, _ = _objects(0)
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async({"model": model}, step=1)
        ckpt.wait()
        first = {k: (b.data_ptr(), b.is_pinned()) for k, b in ckpt._async.buffers._own.items()}
        ckpt.save_async({"model": model}, step=2)
        ckpt.wait()
        again = {k: (b.data_ptr(), b.is_pinned()) for k, b in ckpt._async.buffers._own.items()}
    assert first and again == first and all(pinned for _, pinned in first.values())


@pytest.mark.timeout(60)
def test_read_into_device_uses_pinned_chunks_and_checksums_in_order(tmp_path: Path) -> None:
    src = torch.randn(3 << 20, device="cuda")  # 12 MiB: several 4 MiB chunks
    raw = src.cpu().numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100 + raw)
    fd = os.open(path, os.O_RDONLY)
    seen: list[bytes] = []
    try:

        def read_at(buf: memoryview, offset: int) -> None:
            n = os.preadv(fd, [buf], offset)
            assert n == len(buf)

        dest = torch.empty_like(src)
        _cuda.read_into_device(
            read_at, 100, dest, _cuda.PinnedChunks(4 << 20), lambda mv: seen.append(bytes(mv))
        )
    finally:
        os.close(fd)
    torch.cuda.synchronize()
    assert torch.equal(dest, src)
    assert b"".join(seen) == raw
