"""resumekit's JSON collectives on real gloo ranks: one round when every payload fits the first
buffer, a second round for what does not, and the same values either way (no pickle involved)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from resumekit.engine.collectives import World, current_world
from tests._dist import launch

pytestmark = pytest.mark.distributed


def _payload(rank: int, nbytes: int) -> dict[str, Any]:
    return {"rank": rank, "text": "é" * (nbytes // 2), "list": list(range(rank + 3))}


def _exchange(rank: int, world: int, out: str) -> None:
    w = current_world()
    cap = w._capacity()
    rounds: list[int] = []
    real = dist.all_gather, dist.broadcast

    def counted(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            rounds[-1] += 1
            return fn(*args, **kwargs)

        return call

    dist.all_gather, dist.broadcast = counted(real[0]), counted(real[1])  # type: ignore[assignment]
    results: dict[str, Any] = {}
    try:
        # (name, size of each rank's payload in bytes): all small, one rank large, all large, empty.
        for name, sizes in (("small", [10, 20]), ("mixed", [10, 3 * cap]), ("large", [2 * cap, 5 * cap])):
            rounds.append(0)
            got = w.all_gather_json(_payload(rank, sizes[rank]))
            results[f"gather-{name}"] = {"ok": got == [_payload(r, sizes[r]) for r in range(world)]}
            results[f"gather-{name}"]["rounds"] = rounds[-1]
        for name, size in (("small", 10), ("large", 3 * cap)):
            rounds.append(0)
            got = w.broadcast_json(_payload(0, size) if rank == 0 else None)
            results[f"bcast-{name}"] = {"ok": got == _payload(0, size), "rounds": rounds[-1]}
        rounds.append(0)
        results["bcast-none"] = {"ok": w.broadcast_json(None) is None, "rounds": rounds[-1]}
    finally:
        dist.all_gather, dist.broadcast = real  # type: ignore[assignment]
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_json_exchanges_take_one_round_when_they_fit_and_two_when_not(tmp_path: Path) -> None:
    launch(_exchange, 2, str(tmp_path), deadline=120)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(r["ok"] for r in res.values()), res
        assert {k: r["rounds"] for k, r in res.items()} == {
            "gather-small": 1,
            "gather-mixed": 2,
            "gather-large": 2,
            "bcast-small": 1,
            "bcast-large": 2,
            "bcast-none": 1,
        }


def test_one_process_needs_no_exchange() -> None:
    assert World().all_gather_json({"a": 1}) == [{"a": 1}]
    assert World().broadcast_json([1, 2]) == [1, 2]


def test_the_first_round_stays_small_at_scale() -> None:
    assert World(0, 4)._capacity() == 64 << 10
    assert World(0, 4096)._capacity() * 4096 <= 4 << 20
