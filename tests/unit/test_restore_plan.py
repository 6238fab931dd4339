"""Restore plans are pure data, built and inspected without storage: a manifest made in memory, the
live state, the options, and (for the load plan) the facts a read would give."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from resumekit.drift import DriftItem, DriftReport
from resumekit.engine.entries import items_of
from resumekit.engine.live import live_entries
from resumekit.engine.partial import Reset, module_state
from resumekit.engine.plan import (
    LOAD,
    POSITION,
    Facts,
    RestoreOptions,
    plan_load,
    plan_step,
)
from resumekit.errors import CheckpointCorruptError, DriftError, StateMismatchError
from resumekit.format.codec import TensorTable, encode
from resumekit.format.manifest import SCOPE_RANK, SCOPE_REPLICATED, Entry, FileRecord, Manifest
from resumekit.format.tensorfile import TensorSpec

NO_DRIFT = DriftReport()


def _state(plateau: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched: Any = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        if plateau
        else torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    )
    return {"model": model, "optimizer": opt, "scheduler": sched, "progress": {"epoch": 0}}


def _manifest(
    state: dict[str, Any], *, per_rank: tuple[str, ...] = (), ranks: tuple[int, ...] = (0,)
) -> Manifest:
    entries, files = {}, {}
    for name, obj in state.items():
        scope = SCOPE_RANK if name in per_rank else SCOPE_REPLICATED
        entries[name] = Entry(
            scope, "mapping" if isinstance(obj, dict) else "state", ranks if name in per_rank else (0,)
        )
        prefix = "rank-00000/" if name in per_rank else ""
        files[f"{prefix}{name}.json"] = FileRecord(10, "00000000")
        if not isinstance(obj, dict):
            files[f"{prefix}{name}.safetensors"] = FileRecord(100, "00000000")
    return Manifest(step=8, writer_id="w", world_size=1, entries=entries, files=files)


def _plan(state: dict[str, Any], only: list[str] | None = None, **kw: Any) -> Any:
    options = RestoreOptions.of(state, only, in_place=True, **kw)
    entries = live_entries(items_of(state, frozenset()))
    return plan_step(_manifest(state), entries, options, 0, NO_DRIFT), entries, options


def _facts_of(live: dict[str, Any], step: Any, shapes: dict[str, tuple[int, ...]] | None = None) -> Facts:
    """What reading a checkpoint of ``live`` itself would give (``shapes`` overrides a module tensor's)."""
    skeletons, specs, values = {}, {}, {}
    for r in step.reads:
        obj = live[r.name]
        table = TensorTable()
        raw = (
            module_state(obj)
            if isinstance(obj, nn.Module)
            else dict(obj)
            if isinstance(obj, dict)
            else obj.state_dict()
        )
        skeletons[r.name] = json.loads(json.dumps(encode(raw, table)))  # as the JSON file holds it
        if r.eager:
            values[r.name] = raw
        else:
            specs[r.name] = {
                n: TensorSpec(t.dtype, (shapes or {}).get(n, tuple(t.shape)), 0, 0)
                for n, t in table.tensors.items()
            }
    return Facts(skeletons, specs, values)


def test_a_full_restore_reads_every_entry_and_only_modules_and_optimizers_lazily() -> None:
    step, _, _ = _plan(_state())
    assert [(r.name, r.purpose, r.eager) for r in step.reads] == [
        ("model", LOAD, False),
        ("optimizer", LOAD, False),
        ("scheduler", LOAD, True),
        ("progress", LOAD, True),
    ]
    assert step.reset == () and step.reads[0].tensors is not None
    assert step.reads[0].tensors.relpath == "model.safetensors"


def test_weights_only_reads_the_model_and_the_reset_schedulers_position_only() -> None:
    step, _, _ = _plan(_state(), only=["model"])
    assert [(r.name, r.purpose) for r in step.reads] == [("model", LOAD), ("scheduler", POSITION)]
    assert step.reset == ("optimizer", "scheduler")


def test_no_in_place_read_without_positional_reads() -> None:
    state = _state()
    options = RestoreOptions.of(state, None, in_place=False)
    step = plan_step(_manifest(state), live_entries(items_of(state, frozenset())), options, 0, NO_DRIFT)
    assert all(r.eager for r in step.reads)


def test_drift_errors_and_missing_entries_are_refused_from_the_manifest_alone() -> None:
    state = _state()
    entries = live_entries(items_of(state, frozenset()))
    options = RestoreOptions.of(state, None)
    drift = DriftReport((DriftItem("config.lr", 0.1, 0.2, "error", "config.lr changed"),))
    with pytest.raises(DriftError, match=r"config\.lr"):
        plan_step(_manifest(state), entries, options, 0, drift)
    with pytest.raises(StateMismatchError, match=r"no entries \['progress'\]"):
        plan_step(
            _manifest({k: v for k, v in state.items() if k != "progress"}), entries, options, 0, NO_DRIFT
        )
    lenient = RestoreOptions.of(state, None, strict=False)
    step = plan_step(
        _manifest({k: v for k, v in state.items() if k != "progress"}), entries, lenient, 0, NO_DRIFT
    )
    assert step.not_restored == ("progress",) and "progress" not in [r.name for r in step.reads]


def test_a_rank_without_its_own_record_leaves_the_entry_alone() -> None:
    state = {"model": nn.Linear(2, 2), "local": {"n": 1}}
    entries = live_entries(items_of(state, frozenset({"local"})))
    manifest = _manifest(state, per_rank=("local",), ranks=(0,))
    step = plan_step(manifest, entries, RestoreOptions.of(state, None), 1, NO_DRIFT)
    assert step.absent_rank == ("local",) and [r.name for r in step.reads] == ["model"]


def test_an_unlisted_skeleton_makes_the_step_corrupt() -> None:
    state = _state()
    m = _manifest(state)
    del m.files["progress.json"]
    with pytest.raises(CheckpointCorruptError, match=r"does not list .progress\.json."):
        plan_step(m, live_entries(items_of(state, frozenset())), RestoreOptions.of(state, None), 0, NO_DRIFT)


def test_matching_files_are_read_in_place_and_a_shape_change_is_refused_from_the_header() -> None:
    live = _state()
    step, entries, options = _plan(live)
    load = plan_load(step, _facts_of(live, step), entries, options)
    assert load.in_place == {"model", "optimizer"} and load.resets == ()
    # A checkpoint whose optimizer has momentum buffers the live (fresh) one lacks: its tensors go
    # into new memory, the model's still in place.
    trained = _state()
    trained["model"](torch.randn(4, 3)).sum().backward()
    trained["optimizer"].step()
    facts = _facts_of(trained, step)
    assert plan_load(step, facts, entries, options).in_place == {"model"}
    with pytest.raises(StateMismatchError, match=r"weight: checkpoint \[5, 3\], model \[2, 3\]"):
        plan_load(step, _facts_of(live, step, {"weight": (5, 3)}), entries, options)


def test_a_reset_plateau_scheduler_is_kept_with_a_warning_and_others_are_moved() -> None:
    live = _state(plateau=True)
    step, entries, options = _plan(live, only=["model"])
    load = plan_load(step, _facts_of(live, step), entries, options)
    assert load.resets == (Reset("optimizer", "clear"), Reset("scheduler", "keep"))
    assert len(load.warnings) == 1 and "ReduceLROnPlateau" in load.warnings[0]

    stepped = _state()
    step, entries, options = _plan(stepped, only=["model"])
    facts = _facts_of(stepped, step)
    facts.values["scheduler"]["last_epoch"] = 6  # type: ignore[index]  # the checkpoint's position
    load = plan_load(step, facts, entries, options)
    assert load.resets == (Reset("optimizer", "clear"), Reset("scheduler", "step", 6))
