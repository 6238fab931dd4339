"""save_async of FSDP2 state with overlapped staging: the call registers each rank's large chunks
without copying them, and every write right after the call (in-place ops on DTensor parameters,
foreach ops, an optimizer step, load_state_dict) still leaves the committed checkpoint equal to the
state at the call, under every staging mode; the chunk index matches the chunks written."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from _sharded_helpers import bitwise_diff, fsdp, gathered, launch, read_results, write_result

import resumekit as rk
from resumekit import cli
from resumekit.format.layout import shard_file
from resumekit.storage import open_storage

pytestmark = pytest.mark.distributed

# (staging, staging_budget), as tests/unit/test_async_overlap.py: full copy at the call, the default,
# a bounded pool, and no pool (pending chunks streamed by the writer from live memory, writes held).
MODES = [("copy", None), ("overlap", None), ("overlap", 3 << 20), ("overlap", 0)]
WIDTH = 1024  # a 1024x1024 float32 weight is 2 MiB a rank at world 2: above the inline threshold


def _build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = fsdp(torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, 8)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    opt.zero_grad()
    torch.manual_seed(1000 * step + rank)
    model(torch.randn(4, WIDTH)).square().mean().backward()
    opt.step()


def _save_write_restore(rank: int, world: int, root: Path) -> None:
    from resumekit.staging import buffers as staging

    gate = threading.Event()
    original = staging.OverlapStager._copy_all

    def held(self: staging.OverlapStager) -> None:  # the writes below really come before the copies
        gate.wait(timeout=30)
        original(self)

    staging.OverlapStager._copy_all = held  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    for i, (mode, budget) in enumerate(MODES):
        gate.clear()
        model, opt = _build(0)
        _step(model, opt, 1, rank)
        with rk.Checkpointer(root / f"ckpt-{i}") as ckpt:
            ckpt.save_async({"model": model, "optimizer": opt}, step=1, staging=mode, staging_budget=budget)
            stager = ckpt._async.guard.stager
            pending = stager is not None and stager.pending
            at_call = gathered(model, opt)  # a collective; reads only
            releaser = threading.Timer(0.3, gate.set)
            releaser.start()
            other, other_opt = _build(1)
            _step(other, other_opt, 1, rank)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)  # in place on a DTensor parameter
                torch._foreach_add_(list(model.parameters()), 1.0)
            _step(model, opt, 2, rank)  # an optimizer step: every local shard and moment
            model.load_state_dict(other.state_dict())
            releaser.join()
            info = ckpt.wait()
        fresh, fresh_opt = _build(2)
        rk.Checkpointer(root / f"ckpt-{i}").restore({"model": fresh, "optimizer": fresh_opt})
        # `resumekit verify` checks every file against the manifest and every chunk against its index.
        verified = cli.main(["verify", str(root / f"ckpt-{i}")]) if rank == 0 else 0
        out[f"{mode}-{budget}"] = {
            "pending_at_call": pending,
            "step": info.step if info is not None else None,
            "diff": bitwise_diff(gathered(fresh, fresh_opt), at_call),
            "verify_exit": verified,
        }
        _step(fresh, fresh_opt, 3, rank)  # the restored state trains
    write_result(root, "async", rank, out)


@pytest.mark.timeout(300)
def test_writes_after_the_call_never_reach_the_checkpoint(tmp_path: Path) -> None:
    launch(_save_write_restore, 2, tmp_path, deadline=240)
    for rank, res in enumerate(read_results(tmp_path, "async", 2)):
        for mode, got in res.items():
            assert got["step"] == 1, (rank, mode, got)
            assert got["diff"] == [], (rank, mode, got["diff"])
            assert got["verify_exit"] == 0, (rank, mode)
            # Overlapped modes left the large chunks pending at the call (no copy in the call).
            assert got["pending_at_call"] == mode.startswith("overlap"), (rank, mode)


class _ShardOpenFails:
    """Storage whose stage cannot open rank 0's model shard file (a full or read-only disk)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def stage(self, step: int, writer: str) -> Any:
        stage = self._inner.stage(step, writer)
        real = stage.open_write

        def open_write(relpath: str) -> Any:
            if relpath.endswith(shard_file("model", 0)):
                raise OSError(28, "No space left on device")
            return real(relpath)

        stage.open_write = open_write
        return stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _shard_open_fails(rank: int, world: int, root: Path) -> None:
    torch.manual_seed(0)
    # Two files of 8 MiB or more a rank: the writer runs them on parallel threads.
    model = fsdp(torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2048)).square().mean().backward()
    opt.step()  # AdamW moments: the optimizer's shard file is 16 MiB a rank
    storage = open_storage(str(root))
    ckpt = rk.Checkpointer(root, storage=_ShardOpenFails(storage) if rank == 0 else storage)
    try:
        ckpt.save({"model": model, "optimizer": opt}, step=1)
        raised = None
    except Exception as exc:
        raised = type(exc).__name__
    write_result(root, "open-fails", rank, {"raised": raised, "steps": ckpt.steps()})


@pytest.mark.timeout(120)
def test_a_shard_file_that_cannot_be_opened_fails_the_save_without_a_hang(tmp_path: Path) -> None:
    launch(_shard_open_fails, 2, tmp_path, deadline=90)
    for rank, res in enumerate(read_results(tmp_path, "open-fails", 2)):
        assert res["raised"] is not None and res["steps"] == [], (rank, res)
