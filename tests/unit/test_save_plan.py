"""The save side as a plan: which files a rank writes, built without storage and inspected as data."""

from __future__ import annotations

import io
from typing import Any

import pytest
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


class _TwoRanks(World):
    """Rank ``rank`` of two, with the other rank's reports scripted; every exchange is recorded."""

    def broadcast_json(self, value: Any, src: int = 0) -> Any:
        raise AssertionError("a snapshot exchanges once, through the outcome gather")

    def all_gather_json(self, value: Any) -> list[Any]:
        _EXCHANGES.append(value)
        other = _OTHER[0]
        return [value, other] if self.rank == 0 else [other, value]


_EXCHANGES: list[Any] = []
_OTHER: list[Any] = []


class _NoManifestRead(_NoStorage):
    def read_manifest(self, step: int) -> bytes | None:
        raise AssertionError("only rank 0 asks storage whether the step exists")


def test_a_snapshot_is_one_exchange_and_every_rank_takes_rank_0s_writer_id() -> None:
    _EXCHANGES.clear()
    _OTHER[:] = [{"kind": "", "error": None, "payload": {"plans": []}}]
    snap = take_snapshot(_NoStorage(), "mem", _state(), 5, _TwoRanks(0, 2), None, frozenset())  # type: ignore[arg-type]
    (sent,) = _EXCHANGES  # one exchange, no broadcast before it
    assert sent["payload"]["exists"] is False and snap.writer == sent["payload"]["writer"]
    assert len(snap.writer) == 16

    _EXCHANGES.clear()
    _OTHER[:] = [{"kind": "", "error": None, "payload": {"plans": [], "exists": False, "writer": "0" * 16}}]
    snap = take_snapshot(_NoManifestRead(), "mem", _state(), 5, _TwoRanks(1, 2), None, frozenset())  # type: ignore[arg-type]
    assert len(_EXCHANGES) == 1 and snap.writer == "0" * 16


def test_a_step_rank_0_finds_existing_is_refused_on_every_rank() -> None:
    _OTHER[:] = [{"kind": "", "error": None, "payload": {"plans": [], "exists": True, "writer": "0" * 16}}]
    with pytest.raises(rk.errors.StepExistsError, match="step 5 already exists in 'mem'"):
        take_snapshot(_NoManifestRead(), "mem", _state(), 5, _TwoRanks(1, 2), None, frozenset())  # type: ignore[arg-type]
