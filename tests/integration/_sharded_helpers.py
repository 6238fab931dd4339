"""Helpers of the sharded-checkpoint tests: process launch with a deadline, models, gathered state."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests._dist import _entry
from tests._dist import free_port as free_port  # re-exported: the sharded tests import them from here
from tests._dist import launch as launch

DIMS = (4, 5, 3)  # 5 and 3 are not divisible by 2 or 4: every world size here shards unevenly


#: One job of :func:`fork_worlds`: ``fn(rank, world, *args)`` on a world of ``world`` processes.
Job = tuple[Callable[..., None], int, tuple[Any, ...]]


def fork_worlds(batches: list[list[Job]], *, deadline: float, pg_timeout: float) -> list[list[int | None]]:
    """Run every job on its own gloo world of processes forked from one spawned parent: the jobs of a
    batch at once, the batches one after the other. Each job's exit codes in rank order, jobs in
    order (``-9``: SIGKILL; None: still running ``deadline`` s after its batch started, then killed:
    a hang). ``pg_timeout`` (s) bounds every collective.

    The parent imports torch's FSDP and DTensor modules once, so a job costs its own work, not a torch
    import per process; a process may die (by design) without taking its peers with it.
    """
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "codes.json"
        proc = multiprocessing.get_context("spawn").Process(
            target=_zygote, args=(batches, deadline, pg_timeout, str(out))
        )
        proc.start()
        proc.join(timeout=deadline * len(batches) + 60)
        if proc.is_alive():
            proc.kill()
            raise TimeoutError(f"the forking parent of {len(batches)} batches did not finish (a hang)")
        if proc.exitcode != 0 or not out.exists():
            raise RuntimeError(f"the forking parent failed (exit code {proc.exitcode}); see its stderr")
        codes: list[list[int | None]] = json.loads(out.read_text())
        return codes


def _zygote(batches: list[list[Job]], deadline: float, pg_timeout: float, out: str) -> None:
    torch.set_num_threads(1)  # before any fork: no intra-op thread pool exists to be forked
    for name in (
        "torch.distributed.fsdp",
        "torch.distributed.tensor",
        "torch.distributed.checkpoint.state_dict",
    ):
        importlib.import_module(name)  # every job needs them: imported once, here

    codes: list[list[int | None]] = []
    for batch in batches:
        running = [_fork_world(fn, world, args, pg_timeout) for fn, world, args in batch]
        end = time.monotonic() + deadline
        codes.extend([_wait_pid(pid, end) for pid in pids] for pids in running)
    Path(out).write_text(json.dumps(codes))


def _fork_world(fn: Callable[..., None], world: int, args: tuple[Any, ...], pg_timeout: float) -> list[int]:
    port = free_port()
    pids = []
    for rank in range(world):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _entry(rank, fn, world, port, args, pg_timeout, meet=False)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def _wait_pid(pid: int, end: float) -> int | None:
    """The exit code of ``pid`` (``-signal`` if killed); None if it was still running at ``end``."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def make_model(dims: tuple[int, int, int] = DIMS) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(dims[0], dims[1]), torch.nn.ReLU(), torch.nn.Linear(dims[1], dims[2])
    )


#: Tensor parallel needs the hidden size divisible by tp=2 (DTensor matmuls refuse uneven shards);
#: FSDP2 over dp then splits each tp half of 3 rows unevenly (2 + 1).
TP_DIMS = (4, 6, 4)


def fsdp(model: torch.nn.Module, mesh: Any = None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def two_d(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter a DTensor on a 2x2 (dp, tp) mesh: weights sharded on both dims, biases on dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            w = distribute_tensor(layer.weight.detach(), mesh, [Shard(0), Shard(1)])
            b = distribute_tensor(layer.bias.detach(), mesh, [Shard(0), Replicate()])
            layer.weight = torch.nn.Parameter(w)
            layer.bias = torch.nn.Parameter(b)
    return model


def tp_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """The torchtitan recipe on a 2x2 (dp, tp) mesh: tensor parallel, then FSDP2 over dp (strided
    shards on the column-parallel layer's dimension 0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return fsdp(model, mesh["dp"])


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(3, DIMS[0], generator=g)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> float:
    opt.zero_grad()
    loss = model(batch(step, rank)).square().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_2d(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """A step of the 2-D model: one batch for all ranks, replicated over the mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = model[0].weight.device_mesh
    x = DTensor.from_local(batch(step, 0), mesh, [Replicate(), Replicate()])
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return float(loss.full_tensor())


def gathered(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The full (unsharded) model and optimizer state, flattened: key -> CPU tensor or JSON value."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    full = dist.is_initialized()
    opts = StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=True)
    out: dict[str, Any] = {}
    for prefix, sd in (
        ("model.", get_model_state_dict(model, options=opts)),
        ("optimizer.", get_optimizer_state_dict(model, opt, options=opts)),
    ):
        for k, v in sd.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            out[prefix + k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    return out


def save_gathered(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(path) + ".safetensors")
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    Path(str(path) + ".json").write_text(json.dumps(values, sort_keys=True))


def load_gathered(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = dict(load_file(str(path) + ".safetensors"))
    out.update(json.loads(Path(str(path) + ".json").read_text()))
    return out


def bitwise_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (tensors compared byte for byte, dtypes and shapes included)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = (
                x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            )
        else:
            same = json.dumps(x) == json.dumps(y)
        if not same:
            bad.append(k)
    return bad


@contextlib.contextmanager
def no_pickle() -> Iterator[None]:
    """Every unpickling entry point raises while active."""
    import torch.distributed.distributed_c10d as c10d

    def banned(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    saved = (pickle.loads, pickle.load, pickle.Unpickler, c10d._unpickler)
    pickle.loads, pickle.load = banned, banned  # type: ignore[assignment]
    pickle.Unpickler = banned  # type: ignore[assignment,misc]
    c10d._unpickler = banned  # type: ignore[assignment]
    try:
        yield
    finally:
        pickle.loads, pickle.load, pickle.Unpickler, c10d._unpickler = saved  # type: ignore[misc]


def write_result(root: Path, name: str, rank: int, value: Any) -> None:
    (root / f"{name}-{rank}.json").write_text(json.dumps(value))


def read_results(root: Path, name: str, world: int) -> list[Any]:
    return [json.loads((root / f"{name}-{r}.json").read_text()) for r in range(world)]
