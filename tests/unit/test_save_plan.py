"""The save side as a plan: which files a rank writes, built without storage and inspected as data."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

import resumekit as rk
from resumekit.engine.collectives import World
from resumekit.engine.save import plan_writes, take_snapshot


class _NoStorage:
    """Just enough storage for planning: no checkpoint exists yet. Any other call is a bug."""

    def read_manifest(self, step: int) -> bytes | None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"planning a save touched storage.{name}")


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return {"model": model, "progress": {"epoch": 2}, "rng": rk.RNGState()}


def test_a_rank_plans_every_file_of_its_entries_and_nothing_else() -> None:
    state = _state()
    snap = take_snapshot(_NoStorage(), "mem", state, 5, World(), None, frozenset())  # type: ignore[arg-type]
    plan = plan_writes(snap, 0, "w-0123456789abcdef/", parallel_files=4)
    paths = {f.relpath: f.entry for f in plan.files}
    assert paths == {
        "w-0123456789abcdef/model.json": "model",
        "w-0123456789abcdef/model.safetensors": "model",
        "w-0123456789abcdef/progress.json": "progress",
        "w-0123456789abcdef/rank-00000/rng.json": "rng",
        "w-0123456789abcdef/rank-00000/rng.safetensors": "rng",
    }
    tensor_bytes = sum(p.numel() * p.element_size() for p in state["model"].parameters())
    assert next(f.nbytes for f in plan.files if f.relpath.endswith("model.safetensors")) == tensor_bytes
    assert plan.workers == 1  # no file is big enough for a thread of its own


def test_executing_a_planned_file_writes_exactly_its_planned_bytes() -> None:
    snap = take_snapshot(_NoStorage(), "mem", _state(), 5, World(), None, frozenset())  # type: ignore[arg-type]
    for f in plan_writes(snap, 0, "", parallel_files=4).files:
        buf = io.BytesIO()
        size, _crc = f.fill(buf)
        assert size == len(buf.getvalue())
        if f.relpath.endswith(".json"):
            assert size == f.nbytes


def test_big_files_get_threads_up_to_what_the_storage_takes() -> None:
    state = {f"part{i}": {"w": torch.zeros(3 << 20)} for i in range(3)}  # 12 MiB each
    snap = take_snapshot(_NoStorage(), "mem", state, 1, World(), None, frozenset())  # type: ignore[arg-type]
    assert plan_writes(snap, 0, "", parallel_files=4).workers == 3
    assert plan_writes(snap, 0, "", parallel_files=2).workers == 2
