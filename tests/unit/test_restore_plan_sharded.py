"""A sharded entry in the restore plans, pure: planned from the committed format-2 fixture's manifest,
its metadata checked against live objects before any shard is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from resumekit.drift import DriftReport
from resumekit.engine.entries import items_of
from resumekit.engine.live import live_entries
from resumekit.engine.plan import Facts, RestoreOptions, plan_load, plan_step
from resumekit.errors import CheckpointCorruptError, StateMismatchError
from resumekit.sharding.reshard import read_meta
from resumekit.storage.verify import step_manifest

STEP = Path(__file__).resolve().parents[1] / "fixtures" / "sharded-v2" / "root" / "step-000000000002"


def _state(hidden: int = 5) -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.01)}


def _plans(state: dict[str, Any]) -> tuple[Any, Any, Any]:
    m = step_manifest((STEP / "manifest.json").read_bytes(), 2, str(STEP))
    entries = live_entries(items_of(state, frozenset()))
    options = RestoreOptions.of(state, None, in_place=True)
    step = plan_step(m, entries, options, 0, DriftReport())
    sharded = {
        r.name: read_meta((STEP / r.skeleton.relpath).read_bytes(), r.skeleton.relpath, m) for r in step.reads
    }
    return step, Facts({}, {}, {}, sharded), (entries, options)


def test_plan_step_emits_a_sharded_read_with_the_metadata_and_every_shard() -> None:
    step, facts, (entries, options) = _plans(_state())
    reads = {r.name: r for r in step.reads}
    assert sorted(reads) == ["model", "optimizer"]
    model = reads["model"]
    assert model.sharded and not model.eager and model.tensors is None
    assert model.skeleton.relpath == "model.sharding.json"
    assert [f.relpath for f in model.shards] == [
        "rank-00000/model.shard.safetensors",
        "rank-00000/model.chunks.json",
        "rank-00001/model.shard.safetensors",
        "rank-00001/model.chunks.json",
    ]
    load = plan_load(step, facts, entries, options)
    assert load.loads == ("model", "optimizer") and load.in_place == frozenset()  # shards: new memory


def test_a_shape_change_is_refused_from_the_metadata_before_any_shard_is_read() -> None:
    state = _state(hidden=6)
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    step, facts, (entries, options) = _plans(state)
    with pytest.raises(StateMismatchError, match=r"sharded entry 'model': '0\.(weight|bias)' has shape \[5"):
        plan_load(step, facts, entries, options)
    assert all(torch.equal(before[k], v) for k, v in state["model"].state_dict().items())


def test_a_manifest_without_the_sharding_metadata_makes_the_step_corrupt() -> None:
    m = step_manifest((STEP / "manifest.json").read_bytes(), 2, str(STEP))
    m = dataclasses.replace(m, files={k: v for k, v in m.files.items() if k != "model.sharding.json"})
    state = _state()
    entries = live_entries(items_of(state, frozenset()))
    with pytest.raises(CheckpointCorruptError, match=r"model\.sharding\.json"):
        plan_step(m, entries, RestoreOptions.of(state, None), 0, DriftReport())
