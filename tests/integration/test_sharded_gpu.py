"""Sharded state on GPUs: FSDP2 over NCCL and a CUDA device mesh, saved and resharded bit for bit.

``min(2, torch.cuda.device_count())`` ranks, one GPU each, train the uneven-dimension model of
``test_sharded.py`` on CUDA and save it (sync, then async while training goes on); the same world
restores the async step into fresh FSDP2 objects on the GPUs, and this process, with no process group
and no GPU involved, restores it into a plain CPU model and optimizer (GPU shards -> one CPU tensor
each). Every restored value is compared byte for byte with the state torch gathered at the save.
Skipped without CUDA or NCCL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _sharded_helpers import batch as cpu_batch
from _sharded_helpers import (
    bitwise_diff,
    fsdp,
    gathered,
    launch,
    load_gathered,
    make_model,
    no_pickle,
    read_results,
    save_gathered,
    write_result,
)

import resumekit as rk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL"),
    pytest.mark.timeout(300),
]


def _world() -> int:
    return min(2, torch.cuda.device_count())


def _new(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    model = fsdp(make_model().cuda(), mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> float:
    opt.zero_grad()
    loss = model(cpu_batch(step, rank).cuda()).square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _save_then_restore(rank: int, world: int, root: Path) -> None:
    model, opt = _new(world)
    out: dict[str, Any] = {"device": str(next(model.parameters()).to_local().device)}
    ckpt = rk.Checkpointer(root / "gpu")
    _train(model, opt, 1, rank)
    with no_pickle():
        ckpt.save({"model": model, "optimizer": opt}, step=1)
    _train(model, opt, 2, rank)
    with no_pickle():
        ckpt.save_async({"model": model, "optimizer": opt}, step=2)
        g = gathered(model, opt)  # collective; the values of the save_async call
        out["losses"] = [_train(model, opt, s, rank) for s in (3, 4)]
        ckpt.wait()
    if rank == 0:
        save_gathered(g, root / "gpu-step2")
    dist.barrier()
    fresh, fresh_opt = _new(world)
    with no_pickle():
        res = rk.Checkpointer(root / "gpu").restore({"model": fresh, "optimizer": fresh_opt})
    out["step"] = res.step if res is not None else None
    out["restored_device"] = str(next(fresh.parameters()).to_local().device)
    out["diff"] = bitwise_diff(gathered(fresh, fresh_opt), load_gathered(root / "gpu-step2"))
    out["continued"] = [_train(fresh, fresh_opt, s, rank) for s in (3, 4)]
    write_result(root, "gpu", rank, out)


def test_fsdp2_on_cuda_over_nccl_saves_and_reshards_bitwise(tmp_path: Path) -> None:
    world = _world()
    launch(_save_then_restore, world, tmp_path, deadline=240, backend="nccl")
    results = read_results(tmp_path, "gpu", world)
    for rank, r in enumerate(results):
        assert r["device"] == f"cuda:{rank}" and r["restored_device"] == f"cuda:{rank}"
        assert r["step"] == 2 and r["diff"] == []
        assert r["continued"] == r["losses"]  # training continues bit for bit after the restore
    manifest = rk.Checkpointer(tmp_path / "gpu").steps()
    assert manifest == [1, 2]

    # GPU shards -> one plain CPU model and optimizer, in a process with no group and no GPU use.
    assert not dist.is_initialized()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with no_pickle():
        res = rk.Checkpointer(tmp_path / "gpu").restore({"model": model, "optimizer": opt})
    assert res is not None and res.step == 2
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert bitwise_diff(gathered(model, opt), load_gathered(tmp_path / "gpu-step2")) == []
