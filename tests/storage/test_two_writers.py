"""Two writers on one S3 prefix (moto honours ``If-None-Match: *``): one wins each step, nothing mixes.

Both writers have stored all their data for a step before either commits (a barrier in a storage
wrapper holds them at the instant between data and manifest), then both PUT their manifest
create-only: one after the other (so each writer is seen winning a step), and once at the same
moment. Exactly one commit lands; the other writer gets CommitConflictError with a message that
says what happened and what to do; the winner's manifest references only its own ``w-<writer>/``
files, and they verify.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch

import resumekit as rk
from resumekit.errors import CommitConflictError, StepExistsError
from resumekit.storage import open_storage

try:
    from ._backends import HookedStorage, assert_restored, snapshot, step_dir
    from .servers import S3Endpoint
except ImportError:
    from _backends import HookedStorage, assert_restored, snapshot, step_dir  # type: ignore[no-redef]
    from servers import S3Endpoint  # type: ignore[no-redef]

pytestmark = pytest.mark.s3


def _state(writer: int, step: int) -> dict[str, Any]:
    # Different entry names per writer, so a manifest mixing two writers could not go unnoticed.
    g = torch.Generator().manual_seed(100 * writer + step)
    return {"model": {"w": torch.randn(64, generator=g)}, f"only-writer-{writer}": {"step": step}}


def test_two_writers_one_wins_each_step_and_nothing_mixes(s3_server: S3Endpoint, s3_root: str) -> None:
    url, fs = f"s3://{s3_root}", s3_server.filesystem()
    barrier = threading.Barrier(2, timeout=60)
    first: list[int | None] = [0]

    def hold(index: int) -> Any:
        def before_commit(stage: Any, manifest: bytes) -> None:
            barrier.wait()  # both writers' data are stored now
            if first[0] is not None and index != first[0]:
                # Steps 1 and 2 give each writer a turn at winning: the designated writer's PUT
                # goes first. Step 3 is a true race; the store alone decides.
                time.sleep(0.3)

        return before_commit

    writers = [
        rk.Checkpointer(url, storage=HookedStorage(open_storage(url, s3_server.storage_options), hold(i)))
        for i in range(2)
    ]

    for step in (1, 2, 3):
        first[0] = step % 2 if step < 3 else None
        states = [_state(0, step), _state(1, step)]
        outcomes: list[Any] = [None, None]

        def run(
            i: int, step: int = step, states: list[dict[str, Any]] = states, outcomes: list[Any] = outcomes
        ) -> None:
            try:
                outcomes[i] = writers[i].save(states[i], step=step)
            except Exception as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

        won = [isinstance(o, rk.CheckpointInfo) for o in outcomes]
        assert sum(won) == 1, outcomes  # exactly one commit per step
        winner, loser = won.index(True), won.index(False)
        assert first[0] is None or winner == first[0]
        error = outcomes[loser]
        assert isinstance(error, CommitConflictError), outcomes
        message = str(error)
        assert "another writer" in message and "two writers share this checkpoint prefix" in message
        assert f"{step_dir(step)}/manifest.json" in message and "own prefix" in message

        manifest = json.loads(fs.cat_file(f"{s3_root}/{step_dir(step)}/manifest.json"))
        prefix = manifest["data_prefix"]
        assert prefix == f"w-{manifest['writer_id']}/"
        assert sorted(manifest["entries"]) == sorted(states[winner])
        assert manifest["files"] and all(p.startswith(prefix) for p in manifest["files"])
        fs.invalidate_cache()
        stored = sorted(p.split(f"{step_dir(step)}/", 1)[1] for p in fs.find(f"{s3_root}/{step_dir(step)}"))
        assert stored == sorted([*manifest["files"], "manifest.json"])  # the loser cleaned up after itself

        target = _state(winner, 0)
        result = rk.Checkpointer(url, storage_options=s3_server.storage_options).restore(target)
        assert result is not None and result.step == step and result.skipped == ()
        assert_restored(snapshot(_state(winner, step)), target)

    # A writer arriving after the commit is refused before it writes anything.
    with pytest.raises(StepExistsError, match="already exists"):
        writers[0].save(_state(0, 3), step=3)
    assert writers[0].steps() == [1, 2, 3]
