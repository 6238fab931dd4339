"""Drift of the device mesh (``env.mesh``): recorded by sharded checkpoints, a warning by default."""

from __future__ import annotations

from typing import Any

import pytest

from resumekit.drift import DriftPolicy, compare

TWO_D = {"shape": [2, 2], "dim_names": ["dp", "tp"]}
FSDP4 = {"shape": [4], "dim_names": []}


def _env(mesh: Any = None, world: int = 4) -> dict[str, Any]:
    env: dict[str, Any] = {"world_size": world}
    if mesh is not None:
        env["mesh"] = mesh
    return env


def test_a_changed_mesh_is_a_warning_naming_both_meshes() -> None:
    saved = _env({"model": TWO_D, "optimizer": TWO_D})
    current = _env({"model": FSDP4, "optimizer": FSDP4})
    report = compare(saved, None, current, None)
    (item,) = report.items
    assert item.key == "env.mesh" and item.severity == "warn"
    assert item.saved == saved["mesh"] and item.current == current["mesh"]
    assert "dp=2 x tp=2 (model, optimizer) at save" in item.message
    assert "4 (model, optimizer) now" in item.message
    assert "DriftPolicy({'env.mesh': 'ignore'})" in item.message


def test_the_same_mesh_or_an_entry_left_out_is_no_drift() -> None:
    saved = _env({"model": TWO_D, "optimizer": TWO_D})
    assert not compare(saved, None, _env({"model": TWO_D, "optimizer": TWO_D}), None).items
    # Restoring only the model (the optimizer not in the state): the entries in common decide.
    assert not compare(saved, None, _env({"model": TWO_D}), None).items


def test_a_plain_restore_reports_the_mesh_as_gone() -> None:
    (item,) = compare(_env({"model": TWO_D}), None, _env({}), None).items
    assert item.key == "env.mesh" and "none (unsharded) now" in item.message


def test_checkpoints_without_the_key_are_not_compared() -> None:
    # Older sharded checkpoints and every unsharded one have no "mesh" in their environment.
    assert not compare(_env(), None, _env({"model": FSDP4}), None).items


@pytest.mark.parametrize("severity", ["error", "ignore"])
def test_the_policy_decides(severity: Any) -> None:
    report = compare(
        _env({"model": TWO_D}), None, _env({"model": FSDP4}), None, DriftPolicy({"env.mesh": severity})
    )
    assert [i.severity for i in report.items] == [severity]


def test_different_meshes_per_entry_are_named_per_entry() -> None:
    saved = _env({"gen": TWO_D, "critic": FSDP4})
    (item,) = compare(saved, None, _env({"gen": FSDP4, "critic": FSDP4}), None).items
    assert "gen: dp=2 x tp=2; critic: 4 at save" in item.message
