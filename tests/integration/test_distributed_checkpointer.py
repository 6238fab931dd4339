"""The Checkpointer under torch.distributed (gloo, 2 processes on CPU).

Replicated entries are written once by rank 0, per-rank entries by every rank, and the manifest only
after every rank's files are durable; a failure on any rank commits nothing and raises on every rank.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import resumekit as rk
from tests._dist import launch

pytestmark = pytest.mark.distributed


class _Boom:
    resumekit_scope = "rank"  # every rank snapshots its own record

    def state_dict(self) -> dict:
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 cannot snapshot")
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


class _PickyOnRank1(dict):  # type: ignore[type-arg]
    """A per-rank dict whose validate hook refuses the checkpoint on rank 1 only."""

    resumekit_scope = "rank"

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, sd: dict) -> None:
        self.clear()
        self.update(sd)

    def resumekit_validate(self, sd: dict) -> dict:
        if dist.get_rank() == 1:
            raise rk.errors.StateMismatchError("rank 1's record does not fit this run")
        return sd


def _worker(rank: int, world: int, root: str, scenario: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    local = {"rank": rank, "values": torch.full((2,), float(rank))}
    ckpt = rk.Checkpointer(root, per_rank=("local",))
    out: dict = {}
    if scenario == "save":
        info = ckpt.save({"model": model, "local": local}, step=5)
        out["nbytes"] = info.nbytes
    elif scenario == "restore":
        fresh = torch.nn.Linear(3, 2)
        mine: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ckpt.restore({"model": fresh, "local": mine})
        out["step"] = result.step if result else None
        out["equal"] = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        )
        out["local_rank"] = mine.get("rank")
        out["local_values"] = mine["values"].tolist() if "values" in mine else None
        out["warnings"] = [str(w.message) for w in caught]
    elif scenario == "refuse":
        fresh = torch.nn.Linear(3, 2)
        before = [t.clone() for t in fresh.state_dict().values()]
        picky = _PickyOnRank1(untouched=True)
        try:
            ckpt.restore({"model": fresh, "local": picky})
            out["raised"] = None
        except Exception as exc:
            out["raised"] = type(exc).__name__
            out["message"] = str(exc)
        out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, fresh.state_dict().values()))
        out["picky"] = sorted(picky)
    elif scenario == "fail":
        try:
            ckpt.save({"model": model, "boom": _Boom()}, step=9)
            out["raised"] = None
        except Exception as exc:
            out["raised"] = type(exc).__name__
            out["message"] = str(exc)
    Path(root, f"result-{scenario}-{world}-{rank}.json").write_text(json.dumps(out))


def _run(world: int, root: Path, scenario: str) -> list[dict]:
    launch(_worker, world, str(root), scenario, deadline=120)
    return [json.loads((root / f"result-{scenario}-{world}-{r}.json").read_text()) for r in range(world)]


def test_save_writes_replicated_once_and_per_rank_per_rank(tmp_path: Path) -> None:
    _run(2, tmp_path, "save")
    step = tmp_path / "step-000000000005"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    assert files == [
        "manifest.json",
        "model.json",
        "model.safetensors",
        "rank-00000/local.json",
        "rank-00000/local.safetensors",
        "rank-00001/local.json",
        "rank-00001/local.safetensors",
    ]
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["entries"]["local"] == {"kind": "mapping", "ranks": [0, 1], "scope": "rank"}
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]

    results = _run(2, tmp_path, "restore")
    for rank, r in enumerate(results):
        assert r["step"] == 5 and r["equal"]
        assert r["local_rank"] == rank and r["local_values"] == [float(rank)] * 2


def test_world_size_change_restores_what_matches_and_warns(tmp_path: Path) -> None:
    _run(2, tmp_path, "save")
    # One process: rank 0's record matches; the model is replicated.
    (single,) = _run(1, tmp_path, "restore")
    assert single["equal"] and single["local_rank"] == 0
    # Three processes: rank 2 has no record of its own and is told so.
    results = _run(3, tmp_path, "restore")
    assert all(r["equal"] for r in results)
    assert results[2]["local_rank"] is None
    assert any("no 'local' record for rank 2" in w for w in results[2]["warnings"])


def test_failure_on_one_rank_commits_nothing_and_raises_everywhere(tmp_path: Path) -> None:
    results = _run(2, tmp_path, "fail")
    assert results[1]["raised"] == "RuntimeError"
    assert results[0]["raised"] == "StorageError"
    assert "rank(s) 1" in results[0]["message"] and "earlier checkpoints are intact" in results[0]["message"]
    assert not list(tmp_path.glob("step-*"))
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.timeout(180)
def test_a_refusal_on_one_rank_is_raised_on_every_rank_before_any_object_changes(tmp_path: Path) -> None:
    _run(2, tmp_path, "save")
    results = _run(2, tmp_path, "refuse")
    assert results[1]["raised"] == "StateMismatchError" and "rank 1's record" in results[1]["message"]
    assert results[0]["raised"] == "StateMismatchError" and "refused on rank(s) 1" in results[0]["message"]
    for r in results:
        assert r["unchanged"] and r["picky"] == ["untouched"]
