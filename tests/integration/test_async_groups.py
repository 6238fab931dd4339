"""save_async under torch.distributed: the background exchange runs over the checkpointer's own
process group (a subgroup saves without the other ranks), and ``async_timeout`` bounds how long a
rank's background save waits for a stuck peer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import resumekit as rk
from resumekit.storage import open_storage
from tests._dist import launch

pytestmark = pytest.mark.distributed


def _state(rank: int) -> dict[str, Any]:
    torch.manual_seed(rank)
    return {"model": torch.nn.Linear(64, 64), "local": {"rank": rank}}


def _subgroup_saves_alone(rank: int, world: int, root: str) -> None:
    pair = dist.new_group(ranks=[0, 1], use_local_synchronization=True) if rank < 2 else None
    out: dict[str, Any] = {}
    if rank < 2:  # ranks 2 and 3 never enter resumekit
        state = _state(0)
        ckpt = rk.Checkpointer(Path(root, "pair"), process_group=pair, per_rank=("local",))
        state["local"] = {"rank": rank}
        ckpt.save_async(state, step=1)
        info = ckpt.wait()
        out["step"] = info.step if info is not None else None
        fresh = {"model": torch.nn.Linear(64, 64), "local": {}}
        rk.Checkpointer(Path(root, "pair"), process_group=pair, per_rank=("local",)).restore(fresh)
        out["equal"] = torch.equal(fresh["model"].weight, state["model"].weight)
        out["local"] = fresh["local"]
    Path(root, f"sub-{rank}.json").write_text(json.dumps(out))


def test_a_subgroup_saves_async_without_the_other_ranks(tmp_path: Path) -> None:
    launch(_subgroup_saves_alone, 4, str(tmp_path), deadline=120)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"sub-{rank}.json").read_text())
        assert res == {"step": 1, "equal": True, "local": {"rank": rank}}, (rank, res)


class _StuckOnRank0:
    """Rank 0's storage stalls its first data write for ``seconds`` (a hung mount, say)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner, self._seconds = inner, seconds

    def stage(self, step: int, writer: str) -> Any:
        stage = self._inner.stage(step, writer)
        real = stage.open_write
        stalls = [self._seconds]

        def slow_open(relpath: str) -> Any:
            if stalls:
                time.sleep(stalls.pop())
            return real(relpath)

        stage.open_write = slow_open
        return stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _stuck_peer(rank: int, world: int, root: str) -> None:
    storage = open_storage(root)
    if rank == 0:
        storage = _StuckOnRank0(storage, 20.0)
    ckpt = rk.Checkpointer(root, storage=storage, async_timeout=3)
    ckpt.save_async(_state(0), step=1)
    t0 = time.monotonic()
    try:
        ckpt.wait()
        raised = None
    except Exception as exc:
        raised = f"{type(exc).__name__}: {exc}"
    Path(root, f"stuck-{rank}.json").write_text(
        json.dumps({"raised": raised, "seconds": time.monotonic() - t0, "steps": ckpt.steps()})
    )


@pytest.mark.timeout(120)
def test_async_timeout_bounds_the_wait_for_a_stuck_peer(tmp_path: Path) -> None:
    launch(_stuck_peer, 2, str(tmp_path), deadline=90)
    waiting = json.loads((tmp_path / "stuck-1.json").read_text())
    assert waiting["raised"] is not None, waiting
    assert waiting["seconds"] < 15, waiting  # the 3 s timeout, not torch's 30 minutes
    stuck = json.loads((tmp_path / "stuck-0.json").read_text())
    assert stuck["raised"] is not None, stuck
    assert waiting["steps"] == stuck["steps"] == []  # nothing committed
