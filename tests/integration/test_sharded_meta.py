"""The pure pieces of sharded checkpoints: chunk ownership, the cross-rank agreement check, and the
validation of the sharding metadata a hostile or corrupt file could carry (no processes, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from resumekit.errors import CheckpointCorruptError, UnsupportedFormatError, UnsupportedValueError
from resumekit.sharding.metadata import (
    SHARDING_VERSION,
    ChunkRecord,
    ShardingMeta,
    TensorRecord,
    assign_owners,
    check_ranks_agree,
)


def _plan(chunks: list[list[Any]], values: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "chunks": chunks,
        "values": values or {},
        "tensors": kw.get("tensors", {}),
        "plain": kw.get("plain", {}),
    }


def test_each_chunk_has_one_owner_and_replicas_are_balanced() -> None:
    # Rank r holds its own shard of "w" and a replica of "b" (held by all) and of "c" (held by all).
    plans = [_plan([["w", [2 * r], [2], 800], ["b", [0], [4], 100], ["c", [0], [4], 100]]) for r in range(4)]
    owners = assign_owners(plans)
    assert [owners[("w", (2 * r,))] for r in range(4)] == [0, 1, 2, 3]
    # The replicas go to different ranks (the least loaded), not all to rank 0.
    assert owners[("b", (0,))] != owners[("c", (0,))]
    assert assign_owners(plans) == owners  # deterministic


def test_empty_chunks_are_not_written() -> None:
    plans = [_plan([["w", [0], [5], 20]]), _plan([["w", [5], [0], 0]])]
    assert assign_owners(plans) == {("w", (0,)): 0}


def test_a_value_differing_between_ranks_is_refused_naming_key_and_ranks() -> None:
    plans = [
        _plan([], {"param_groups.w.lr": 0.1}),
        _plan([], {"param_groups.w.lr": 0.1}),
        _plan([], {"param_groups.w.lr": 0.2}),
    ]
    with pytest.raises(UnsupportedValueError) as err:
        check_ranks_agree("optimizer", plans)
    msg = str(err.value)
    assert "'optimizer'" in msg and "'param_groups.w.lr'" in msg
    assert "rank(s) 0, 1: 0.1" in msg and "rank(s) 2: 0.2" in msg
    check_ranks_agree("optimizer", plans[:2])  # agreeing ranks pass


def test_a_plain_tensor_differing_between_ranks_is_refused() -> None:
    plans = [_plan([], plain={"state.w.step": "0000abcd"}), _plan([], plain={"state.w.step": "ffff0000"})]
    with pytest.raises(UnsupportedValueError, match=r"unsharded tensor at 'state\.w\.step'"):
        check_ranks_agree("optimizer", plans)


def _meta() -> ShardingMeta:
    chunks = (
        ChunkRecord((0, 0), (3, 4), "rank-00000/model.shard.safetensors", "w@0,0"),
        ChunkRecord((3, 0), (2, 4), "rank-00001/model.shard.safetensors", "w@3,0"),
    )
    return ShardingMeta(2, {"shape": [2]}, {"w": TensorRecord("F32", (5, 4), chunks)}, {"lr": 0.5})


FILES = {"rank-00000/model.shard.safetensors": None, "rank-00001/model.shard.safetensors": None}


def test_metadata_round_trips() -> None:
    meta = _meta()
    assert ShardingMeta.from_json(meta.to_json(), "x", FILES) == meta


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda d: d["tensors"]["w"]["chunks"][1].update(offsets=[4, 0]), CheckpointCorruptError, "outside"),
        (
            lambda d: d["tensors"]["w"]["chunks"][0].update(file="../../etc/passwd"),
            CheckpointCorruptError,
            "does not list",
        ),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(sizes=[3]), CheckpointCorruptError, "dimensions"),
        (lambda d: d["tensors"]["w"].update(shape=[-1, 4]), CheckpointCorruptError, "malformed"),
        (lambda d: d.update(version=SHARDING_VERSION + 1), UnsupportedFormatError, "Upgrade resumekit"),
        (lambda d: d.update(format="dcp"), CheckpointCorruptError, "not resumekit sharding metadata"),
    ],
)
def test_malformed_metadata_is_refused(edit: Any, error: type[Exception], match: str) -> None:
    d = json.loads(_meta().to_json())
    edit(d)
    with pytest.raises(error, match=match):
        ShardingMeta.from_json(json.dumps(d).encode(), "x", FILES)
