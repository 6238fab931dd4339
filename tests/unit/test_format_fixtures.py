"""Checkpoints written by earlier resumekit releases keep restoring, bit for bit.

Each ``tests/fixtures/format-v<N>[-world2]/`` holds a checkpoint root written by the resumekit of that
format version (``tests/fixtures/make_format_fixtures.py``) and ``expected-rank<R>.json``, computed
from the live objects at save time without resumekit. A change to the on-storage format, or to how an
entry is decoded, that breaks a checkpoint users already have fails here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import resumekit as rk

# The format written for unsharded state; sharded checkpoints (format 2) have tests/fixtures/sharded-v2/.
from resumekit.format.manifest import UNSHARDED_FORMAT_VERSION as FORMAT_VERSION
from tests._dist import launch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SINGLE = sorted(p for p in FIXTURES.glob("format-v*") if not p.name.endswith("-world2"))
WORLD2 = sorted(FIXTURES.glob("format-v*-world2"))


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_format_fixtures", FIXTURES / "make_format_fixtures.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tests/fixtures/make_format_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _restore_and_compare(folder: Path, root: Path) -> list[str]:
    """Restore ``root`` into fresh objects on this rank; the differences from expected, by name."""
    maker = _maker()
    rank = dist.get_rank() if dist.is_initialized() else 0
    expected = json.loads((folder / f"expected-rank{rank}.json").read_text())
    # The model is a replicated entry, written by rank 0. Under DDP its BatchNorm running statistics
    # differ between ranks after the last forward (DDP broadcasts rank 0's at the next forward), so
    # every rank restores rank 0's: that is what the uninterrupted run would use next.
    expected["model"] = json.loads((folder / "expected-rank0.json").read_text())["model"]
    built = maker.build()
    state = built["state"]
    # Disturb every stream so that only the restore can put it back.
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drift between the writer's environment and this one
        result = rk.Checkpointer(root).restore(state)
    if result is None or result.step != expected["step"]:
        return [f"restored step {None if result is None else result.step}, expected {expected['step']}"]
    got = maker.digests(state)
    keys = ("model", "optimizer_state", "optimizer_groups", "scheduler", "grads", "progress")
    bad = [key for key in keys if got[key] != expected[key]]
    if maker.next_draws(built) != expected["next"]:
        bad.append("next draws (RNG streams or sample order)")
    return bad


def _copy(folder: Path, tmp_path: Path) -> Path:
    root = tmp_path / folder.name
    shutil.copytree(folder / "root", root)  # the committed fixture stays pristine
    return root


def test_fixtures_exist_for_the_current_format() -> None:
    names = {p.name for p in SINGLE + WORLD2}
    for name in (f"format-v{FORMAT_VERSION}", f"format-v{FORMAT_VERSION}-world2"):
        assert name in names, f"no committed {name}: run tests/fixtures/make_format_fixtures.py"


@pytest.mark.parametrize("folder", SINGLE, ids=[p.name for p in SINGLE])
def test_old_format_restores_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    root = _copy(folder, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert _restore_and_compare(folder, root) == []
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "restore changed the root"


def _rank(rank: int, world: int, folder: str, root: str, out: str) -> None:
    bad = _restore_and_compare(Path(folder), Path(root))
    Path(out, f"rank{rank}.json").write_text(json.dumps(bad))


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("folder", WORLD2, ids=[p.name for p in WORLD2])
def test_old_format_two_ranks_restore_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    root = _copy(folder, tmp_path)
    launch(_rank, 2, str(folder), str(root), str(tmp_path), deadline=150)
    for rank in range(2):
        bad = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert bad == [], f"rank {rank} differs: {bad}"
