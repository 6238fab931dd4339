"""Save -> load across plain, DataParallel, torch.compile and DDP models, every pair, through the
Checkpointer; and CUDA <-> CPU migration (GPU-only tests are marked ``gpu``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import resumekit as rk
from tests._dist import launch


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 2))


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "dataparallel": nn.DataParallel,
    "compiled": lambda m: torch.compile(m, backend="eager"),
}


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {k: v.clone() for k, v in inner.state_dict().items()}


@pytest.mark.parametrize("saved_as", list(WRAPPERS))
@pytest.mark.parametrize("loaded_as", list(WRAPPERS))
def test_every_pair_in_process(tmp_path: Path, saved_as: str, loaded_as: str) -> None:
    source = WRAPPERS[saved_as](_net(0))
    rk.Checkpointer(tmp_path).save({"model": source}, step=1)
    target = WRAPPERS[loaded_as](_net(1))
    rk.Checkpointer(tmp_path).restore({"model": target})
    expected, actual = _plain_state(source), _plain_state(target)
    assert list(expected) == list(actual)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def _ddp_worker(rank: int, world: int, root: str) -> None:
    results = {}
    for name in WRAPPERS:  # every single-process checkpoint loads into DDP
        ddp = nn.parallel.DistributedDataParallel(_net(1))
        rk.Checkpointer(Path(root, name)).restore({"model": ddp})
        expected = _plain_state(WRAPPERS[name](_net(0)))
        results[name] = all(torch.equal(v, expected[k]) for k, v in _plain_state(ddp).items())
    rk.Checkpointer(Path(root, "ddp")).save({"model": nn.parallel.DistributedDataParallel(_net(0))}, step=1)
    Path(root, f"ddp-result-{rank}.json").write_text(json.dumps(results))


@pytest.mark.distributed
def test_ddp_pairs(tmp_path: Path) -> None:
    for name, wrap in WRAPPERS.items():
        rk.Checkpointer(tmp_path / name).save({"model": wrap(_net(0))}, step=1)
    launch(_ddp_worker, 2, str(tmp_path), deadline=120)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"ddp-result-{rank}.json").read_text()) == dict.fromkeys(WRAPPERS, True)
    expected = _plain_state(_net(0))
    for name, wrap in WRAPPERS.items():  # the DDP checkpoint loads into every single-process form
        target = wrap(_net(1))
        rk.Checkpointer(tmp_path / "ddp").restore({"model": target})
        assert all(torch.equal(v, expected[k]) for k, v in _plain_state(target).items()), name


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_saved_on_cuda_restores_on_cpu_and_back(tmp_path: Path) -> None:
    model = _net(0).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 5, device="cuda")).sum().backward()
    opt.step()
    rk.Checkpointer(tmp_path / "from-cuda").save({"model": model, "optimizer": opt}, step=1)
    cpu_model = _net(1)
    cpu_opt = torch.optim.AdamW(cpu_model.parameters())
    rk.Checkpointer(tmp_path / "from-cuda").restore({"model": cpu_model, "optimizer": cpu_opt})
    for a, b in zip(model.state_dict().values(), cpu_model.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b)
    assert all(
        t.device.type == "cpu" for s in cpu_opt.state.values() for t in s.values() if torch.is_tensor(t)
    )
    rk.Checkpointer(tmp_path / "from-cpu").save({"model": cpu_model, "optimizer": cpu_opt}, step=1)
    back = _net(2).cuda()
    back_opt = torch.optim.AdamW(back.parameters())
    rk.Checkpointer(tmp_path / "from-cpu").restore({"model": back, "optimizer": back_opt})
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert b.device.type == "cuda" and torch.equal(a, b)
