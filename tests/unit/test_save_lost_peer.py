"""A rank lost after every rank reported its files durable (after the outcome gather), on the save
path's commit: rank 0's commit stands, and its save reports the committed step (with a warning that
the others could not be told) instead of a failure; any other rank raises, as its peers are gone.

The world is a fake of two ranks whose collectives work until the gather and fail after it, as when a
peer dies at that moment (tests/integration/test_sharded_kill.py does it with real processes).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import resumekit as rk
from resumekit.engine.collectives import Outcomes, RankFailure, describe
from resumekit.engine.save import take_snapshot, write
from resumekit.errors import StorageError
from resumekit.format.manifest import Entry, FileRecord, Manifest
from resumekit.storage import open_storage


class _PeerLostAfterGather:
    """A world of two seen from ``rank``: the snapshot's outcomes are gathered (rank 0's carry the
    step's writer id), then the files' outcomes (the peer reports success and no files); the commit's
    outcome cannot be exchanged any more."""

    def __init__(self, rank: int) -> None:
        self.rank, self.size, self.group = rank, 2, None
        self.distributed = True

    def all_gather_json(self, value: Any) -> list[Any]:  # the commit's outcome
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    def gather_outcomes(
        self, error: BaseException | None, kind: str = "error", payload: Any = None
    ) -> Outcomes:
        failures = (RankFailure(self.rank, kind, describe(error) or ""),) if error is not None else ()
        if isinstance(payload, dict) and "plans" in payload:  # the snapshot's exchange
            peer: Any = (
                {"plans": []}
                if self.rank == 0
                else {"plans": [], "exists": False, "writer": "0123456789abcdef"}
            )
        else:  # the files' outcomes
            peer = {}
        payloads = (payload, peer) if self.rank == 0 else (peer, payload)
        return Outcomes(failures, payloads, True)


def _state() -> dict[str, Any]:
    return {"meta": {"w": torch.arange(6, dtype=torch.float32), "note": "kept"}}


def _manifest(step: int, writer: str, prefix: str, files: dict[str, FileRecord]) -> Manifest:
    return Manifest(
        step=step,
        writer_id=writer,
        world_size=2,
        entries={"meta": Entry(scope="replicated", kind="mapping")},
        files=files,
        data_prefix=prefix,
    )


def test_rank0_keeps_its_commit_when_the_peer_is_lost_after_the_gather(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    world: Any = _PeerLostAfterGather(0)
    snap = take_snapshot(storage, storage.url, _state(), 5, world, None, frozenset())
    with pytest.warns(UserWarning, match=r"step 5 is committed, but the other ranks could not be told"):
        nbytes = write(storage, snap, lambda prefix, files: _manifest(5, snap.writer, prefix, files))
    assert nbytes > 0
    ckpt = rk.Checkpointer(tmp_path)
    assert ckpt.steps() == [5]
    target: dict[str, Any] = {"meta": {}}
    res = ckpt.restore(target, step=5)
    assert res is not None and res.step == 5
    assert torch.equal(target["meta"]["w"], _state()["meta"]["w"]) and target["meta"]["note"] == "kept"


def test_other_ranks_raise_when_the_commit_outcome_is_lost(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    world: Any = _PeerLostAfterGather(1)
    snap = take_snapshot(storage, storage.url, _state(), 5, world, None, frozenset())
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        write(storage, snap, lambda prefix, files: _manifest(5, snap.writer, prefix, files))
    assert rk.Checkpointer(tmp_path).steps() == []  # rank 1 never commits


class _FailingCommit:
    """The local backend whose commit fails (a full disk, say)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stage(self, step: int, writer_id: str) -> Any:
        stage = self._inner.stage(step, writer_id)

        def commit(manifest: bytes) -> None:
            raise StorageError(28, "writing the manifest failed: no space left on device")

        stage.commit = commit
        return stage


def test_rank0_raises_its_commit_failure_not_the_lost_broadcast(tmp_path: Any) -> None:
    storage = _FailingCommit(open_storage(str(tmp_path)))
    world: Any = _PeerLostAfterGather(0)
    snap = take_snapshot(storage, storage.url, _state(), 5, world, None, frozenset())
    with pytest.raises(StorageError, match="no space left"):
        write(storage, snap, lambda prefix, files: _manifest(5, snap.writer, prefix, files))
    assert rk.Checkpointer(tmp_path).steps() == []
    assert list(tmp_path.iterdir()) == []  # the stage was aborted
