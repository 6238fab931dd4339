"""Sharded state at world size 3 on GCS (issue 13: "world sizes 1 to 4"; "S3 and GCS").

A world-3 FSDP2 save (5 and 3 rows over 3 ranks: 2+2+1 and 1+1+1 chunks) to fake-gcs-server on
loopback, whose create-only commit is the one real GCS answers; then a world-2 restore from it
(resharded 3 -> 2) and, in this process without a process group, a restore into a plain model. Every
restored value is compared byte for byte with the state gathered at save time; a byte flipped in one
shard object then makes the restore fall back to the previous step on every rank.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _sharded_helpers import (
    bitwise_diff,
    fsdp,
    gathered,
    launch,
    load_gathered,
    make_model,
    no_pickle,
    read_results,
    save_gathered,
    train,
    write_result,
)

import resumekit as rk

pytest.importorskip("gcsfs")
pytestmark = [pytest.mark.distributed, pytest.mark.gcs, pytest.mark.slow, pytest.mark.timeout(400)]


def _new() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = fsdp(make_model())
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _save(rank: int, world: int, root: Path, url: str, opts: dict[str, Any]) -> None:
    model, opt = _new()
    ckpt = rk.Checkpointer(url, storage_options=opts)
    for step in (1, 2):
        train(model, opt, step, rank)
        with no_pickle():
            ckpt.save({"model": model, "optimizer": opt, "rng": rk.RNGState()}, step=step)
        g = gathered(model, opt)
        if rank == 0:
            save_gathered(g, root / f"step{step}")
    local = [list(p.to_local().shape) for p in model.parameters()]
    write_result(root, "save", rank, {"steps": ckpt.steps(), "local": local})


def _restore(rank: int, world: int, root: Path, url: str, opts: dict[str, Any], expect: int) -> None:
    model, opt = _new()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_pickle():
            res = rk.Checkpointer(url, storage_options=opts).restore(
                {"model": model, "optimizer": opt, "rng": rk.RNGState()}
            )
    out = {
        "step": None if res is None else res.step,
        "skipped": [] if res is None else [s for s, _ in res.skipped],
        "diff": bitwise_diff(gathered(model, opt), load_gathered(root / f"step{expect}")),
        "world_drift": any("world_size" in str(w.message) for w in caught),
    }
    write_result(root, f"restore{expect}", rank, out)


def test_world_3_on_gcs_reshards_to_2_and_to_a_plain_model(
    tmp_path: Path, gcs: Any, unique_prefix: Any
) -> None:
    url, opts = gcs.url(unique_prefix("sharded-world3")), gcs.storage_options
    launch(_save, 3, tmp_path, url, opts, deadline=200)
    saves = read_results(tmp_path, "save", 3)
    assert all(r["steps"] == [1, 2] for r in saves)
    # Uneven at world 3: rank 2 holds one row of the first weight where ranks 0 and 1 hold two.
    assert saves[0]["local"][0] != saves[2]["local"][0]

    launch(_restore, 2, tmp_path, url, opts, 2, deadline=200)
    for rank, r in enumerate(read_results(tmp_path, "restore2", 2)):
        assert r["step"] == 2 and r["skipped"] == [] and r["diff"] == [], (rank, r)
        assert r["world_drift"], rank  # 3 -> 2 is reported, not refused

    # No process group: the world-3 step into a plain model and optimizer, bit for bit.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rk.Checkpointer(url, storage_options=opts).restore({"model": model, "optimizer": opt})
    assert res is not None and res.step == 2
    assert bitwise_diff(gathered(model, opt), load_gathered(tmp_path / "step2")) == []

    # A flipped byte in rank 2's shard object of step 2: every rank falls back to step 1.
    fs = gcs.filesystem()
    shards = [
        p for p in fs.find(url.removeprefix("gs://")) if p.endswith("rank-00002/model.shard.safetensors")
    ]
    (shard,) = [p for p in shards if "/step-000000000002/" in p]
    raw = bytearray(fs.cat_file(shard))
    raw[-3] ^= 0x10
    fs.pipe_file(shard, bytes(raw))
    launch(_restore, 2, tmp_path, url, opts, 1, deadline=200)
    for rank, r in enumerate(read_results(tmp_path, "restore1", 2)):
        assert r["step"] == 1 and r["skipped"] == [2] and r["diff"] == [], (rank, r)
