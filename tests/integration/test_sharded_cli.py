"""``resumekit ls``/``inspect``/``verify`` on the committed sharded checkpoint (format 2, written before
meshes were recorded): world size, mesh and shard counts, and verify's cross-check of every shard file
against its chunk index and the sharding metadata (an edit the manifest's checksums cannot see)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest

from resumekit import cli
from resumekit.format.manifest import seal
from resumekit.storage.verify import crc_hex

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sharded-v2" / "root"
STEP = "step-000000000002"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    out = tmp_path / "root"
    shutil.copytree(FIXTURE, out)
    return out


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], expect: int = 0) -> Any:
    assert cli.main([*argv, "--json"]) == expect
    return json.loads(capsys.readouterr().out)


def test_ls_and_inspect_show_world_mesh_and_shards(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (row,) = _json(["ls", str(root)], capsys)["steps"]
    assert row["world_size"] == 2 and row["shards"] == 4
    assert row["mesh"] is None  # not in this older manifest's environment
    d = _json(["inspect", str(root)], capsys)
    assert d["shards"] == 4
    one_d = {"shape": [2], "dim_names": []}
    assert d["mesh"] == {"model": one_d, "optimizer": one_d}  # from each entry's sharding metadata
    by_name = {e["name"]: e["sharding"] for e in d["entries"]}
    assert by_name["rng"] is None
    assert by_name["model"] == {"world_size": 2, "mesh": one_d, "shards": 2, "tensors": 4, "error": None}
    assert cli.main(["inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "shard files  4" in text and "SHARDED ENTRY" in text
    v = _json(["verify", str(root)], capsys)
    assert v["ok"] and v["steps"][0]["shards"] == 4


def _reseal(root: Path, rel: str, edit: Callable[[bytes], bytes]) -> None:
    """Edit one file and record its new size and crc32c in a resealed manifest: only the cross-check
    can tell."""
    step = root / STEP
    data = edit((step / rel).read_bytes())
    (step / rel).write_bytes(data)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"][rel] = {"size": len(data), "crc32c": crc_hex(crc32c.crc32c(data))}
    (step / "manifest.json").write_bytes(seal(manifest))


def _edit_index(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        d = json.loads(raw)
        change(d)
        return json.dumps(d, sort_keys=True).encode()

    return edit


def _drop_chunk(d: dict[str, Any]) -> None:
    del d["chunks"][sorted(d["chunks"])[0]]


def _bad_crc(d: dict[str, Any]) -> None:
    name = sorted(d["chunks"])[0]
    d["chunks"][name][2] = "00000000"


def _flip_data(raw: bytes) -> bytes:
    data = bytearray(raw)
    data[-1] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize(
    ("rel", "edit", "file", "says"),
    [
        (
            "rank-00001/model.chunks.json",
            _edit_index(_drop_chunk),
            "rank-00001/model.chunks.json",
            "not in its index",
        ),
        (
            "rank-00000/model.chunks.json",
            _edit_index(_bad_crc),
            "rank-00000/model.shard.safetensors",
            "its index says 00000000",
        ),
        # The shard's bytes changed and the manifest was resealed: the index's chunk crc still catches it.
        (
            "rank-00001/optimizer.shard.safetensors",
            _flip_data,
            "rank-00001/optimizer.shard.safetensors",
            "its index says",
        ),
    ],
)
def test_verify_cross_checks_shards_against_index_and_metadata(
    root: Path, capsys: pytest.CaptureFixture[str], rel: str, edit: Any, file: str, says: str
) -> None:
    _reseal(root, rel, edit)
    v = _json(["verify", str(root)], capsys, expect=1)
    problems = v["steps"][0]["problems"]
    assert problems and {p["kind"] for p in problems} == {"chunk-index"}, problems
    assert any(p["file"] == file and says in p["message"] for p in problems), problems


def test_a_checkpoint_without_a_recorded_mesh_restores_without_mesh_drift(root: Path) -> None:
    import warnings

    import torch

    import resumekit as rk

    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 2 -> 1 and the writer's environment
        res = rk.Checkpointer(root, drift_policy=rk.DriftPolicy({"env.mesh": "error"})).restore(
            {"model": model, "optimizer": opt}
        )
    assert res is not None and res.step == 2 and "mesh" not in res.environment
    assert all(i.key != "env.mesh" for i in res.drift.items)
