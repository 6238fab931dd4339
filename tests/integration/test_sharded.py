"""Sharded training state (FSDP2, DTensor parameters, a 2-D mesh) through the same Checkpointer.

Few process launches, each doing several cases, to keep the runtime small:

1. world 2, FSDP2 (uneven dims): save steps 1 and 2 (pickle banned), record the gathered state at
   each save and a continuation of training; a per-rank learning rate is refused on every rank.
2. world 4: restore the world-2 checkpoint (2->4); save an FSDP2 checkpoint at 4; a 2x2 (dp, tp)
   mesh of DTensor parameters saves its own, and so does FSDP2 over tensor parallel (strided shards).
3. world 2: same-world restore continues training bit for bit; 4->2; 2-D -> FSDP2 only; a flipped
   byte in a shard file / the sharding metadata of the newest step makes both ranks fall back to
   the previous step together; FSDP2-over-TP -> FSDP2 only.
4. world 1 (gloo) FSDP2 restore of the world-2 checkpoint (2->1); then, in this process without a
   process group, the same checkpoint into a plain model and optimizer.

Every restored value is compared byte for byte with the state gathered when it was saved.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _sharded_helpers import (
    DIMS,
    TP_DIMS,
    bitwise_diff,
    fsdp,
    gathered,
    launch,
    load_gathered,
    make_model,
    no_pickle,
    read_results,
    save_gathered,
    tp_fsdp,
    train,
    train_2d,
    two_d,
    write_result,
)

import resumekit as rk

#: The launches' deadlines (120 + 150 + 150 + 80 s) fit inside the test's, so a hang in any launch is
#: reported by its launcher (which names it and kills its processes), not by pytest-timeout. The whole
#: test took 93 s on a loaded 2-core machine.
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(560)]


def _new(world_model: Any = fsdp, dims: Any = DIMS) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = world_model(make_model(dims))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _restore_and_compare(root: Path, url: Path, expected: str, rank: int, **kw: Any) -> dict[str, Any]:
    model, opt = _new(kw.pop("wrap", fsdp), kw.pop("dims", DIMS))
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    if (url / "step-000000000001").exists():  # the world-2 run (and its corrupted copies) saved RNG
        state["rng"] = rk.RNGState()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_pickle():
            res = rk.Checkpointer(url).restore(state, **kw)
    assert res is not None
    diff = bitwise_diff(gathered(model, opt), load_gathered(root / expected))
    return {
        "step": res.step,
        "diff": diff,
        "warnings": [
            str(w.message) for w in caught if "fell back" in str(w.message) or "skipped" in str(w.message)
        ],
        "model": model,
        "opt": opt,
    }


def _first(rank: int, world: int, root: Path) -> None:
    model, opt = _new()
    ckpt = rk.Checkpointer(root / "w2")
    rng = rk.RNGState()
    out: dict[str, Any] = {}
    train(model, opt, 1, rank)
    with no_pickle():
        ckpt.save({"model": model, "optimizer": opt, "rng": rng}, step=1)
    g = gathered(model, opt)  # collective
    if rank == 0:
        save_gathered(g, root / "w2-step1")
    train(model, opt, 2, rank)
    # The ban spans the whole background save, up to its commit: whatever its thread exchanges runs
    # while the ban is active. Async: the save holds the values of this moment while training goes on.
    with no_pickle():
        ckpt.save_async({"model": model, "optimizer": opt, "rng": rng}, step=2)
        g = gathered(model, opt)  # collective
        losses = [train(model, opt, step, rank) for step in (3, 4)]
        ckpt.wait()
    if rank == 0:
        save_gathered(g, root / "w2-step2")
    final = gathered(model, opt)
    if rank == 0:
        save_gathered(final, root / "w2-final")
    out["losses"] = losses
    # A value saved once for all ranks that differs between them is refused on every rank.
    opt.param_groups[0]["lr"] = 0.01 * (rank + 1)
    try:
        ckpt.save({"model": model, "optimizer": opt}, step=3)
        out["refused"] = None
    except rk.errors.UnsupportedValueError as exc:
        out["refused"] = str(exc)
    out["steps"] = ckpt.steps()
    write_result(root, "first", rank, out)


def _second(rank: int, world: int, root: Path) -> None:
    out: dict[str, Any] = {}
    got = _restore_and_compare(root, root / "w2", "w2-step2", rank)
    out["2to4"] = {"step": got["step"], "diff": got["diff"]}
    model, opt = got["model"], got["opt"]
    train(model, opt, 5, rank)
    with no_pickle():
        rk.Checkpointer(root / "w4").save({"model": model, "optimizer": opt}, step=5)
    g = gathered(model, opt)
    if rank == 0:
        save_gathered(g, root / "w4-step5")
    model2d, opt2d = _new(two_d)
    train_2d(model2d, opt2d, 1)
    train_2d(model2d, opt2d, 2)
    with no_pickle():
        rk.Checkpointer(root / "mesh").save({"model": model2d, "optimizer": opt2d}, step=2)
    g = gathered(model2d, opt2d)
    if rank == 0:
        save_gathered(g, root / "mesh-step2")
    model_tp, opt_tp = _new(tp_fsdp, TP_DIMS)
    for step in (1, 2):
        train(model_tp, opt_tp, step, 0)  # tensor-parallel peers see the same batch
    with no_pickle():
        rk.Checkpointer(root / "tp").save({"model": model_tp, "optimizer": opt_tp}, step=2)
    g = gathered(model_tp, opt_tp)
    if rank == 0:
        save_gathered(g, root / "tp-step2")
    write_result(root, "second", rank, out)


def _third(rank: int, world: int, root: Path) -> None:
    out: dict[str, Any] = {}
    got = _restore_and_compare(root, root / "w2", "w2-step2", rank)
    out["same"] = {"step": got["step"], "diff": got["diff"]}
    model, opt = got["model"], got["opt"]
    out["losses"] = [train(model, opt, step, rank) for step in (3, 4)]
    out["final_diff"] = bitwise_diff(gathered(model, opt), load_gathered(root / "w2-final"))
    got = _restore_and_compare(root, root / "w4", "w4-step5", rank)
    out["4to2"] = {"step": got["step"], "diff": got["diff"]}
    got = _restore_and_compare(root, root / "mesh", "mesh-step2", rank)
    out["2dtofsdp"] = {"step": got["step"], "diff": got["diff"]}
    got = _restore_and_compare(root, root / "tp", "tp-step2", rank, dims=TP_DIMS)
    out["tpfsdp"] = {"step": got["step"], "diff": got["diff"]}
    for kind, _, _ in FLIPS:
        got = _restore_and_compare(root, root / f"flip-{kind}", "w2-step1", rank)
        out[f"flip-{kind}"] = {"step": got["step"], "diff": got["diff"], "warnings": got["warnings"]}
    out["crash"] = {phase: _crash_on_one_rank(root, rank, phase) for phase in ("check", "read")}
    write_result(root, "third", rank, out)


class _Boom(Exception):
    """Not a ResumeKitError: a bug or a torch error inside the sharded restore on one rank."""


def _crash_on_one_rank(root: Path, rank: int, phase: str) -> dict[str, Any]:
    """Restore with a non-ResumeKit exception on one rank only, while checking the live DTensors
    (``check``: before the first agreement) or reading the chunks (``read``: before the second)."""
    import resumekit.engine.plan as plan_mod
    import resumekit.engine.reader as reader_mod

    mod, attr, victim = (
        (plan_mod, "check_sharded", 0) if phase == "check" else (reader_mod, "read_sharded", 1)
    )
    real = getattr(mod, attr)

    def boom(*args: Any, **kw: Any) -> Any:
        raise _Boom(f"injected on rank {rank}")

    model, opt = _new()
    before = gathered(model, opt)
    if rank == victim:
        setattr(mod, attr, boom)
    try:
        rk.Checkpointer(root / "w2").restore({"model": model, "optimizer": opt})
        raised: list[str] | None = None
    except Exception as exc:
        raised = [type(exc).__name__, str(exc)]
    finally:
        setattr(mod, attr, real)
    return {"victim": victim, "raised": raised, "unchanged": bitwise_diff(gathered(model, opt), before) == []}


def _fourth(rank: int, world: int, root: Path) -> None:
    got = _restore_and_compare(root, root / "w2", "w2-step2", rank)
    out: dict[str, Any] = {"step": got["step"], "diff": got["diff"]}
    # A DTensor anywhere but in a Module/Optimizer entry is refused with a message, not a crash.
    param = next(got["model"].parameters())
    try:
        rk.Checkpointer(root / "stray").save({"stray": {"w": param}}, step=1)
        out["stray"] = None
    except rk.errors.UnsupportedValueError as exc:
        out["stray"] = str(exc)
    # verify_after_save reads a sharded step back through the same restore plans.
    info = rk.Checkpointer(root / "readback", verify_after_save=True).save(
        {"model": got["model"], "optimizer": got["opt"]}, step=3
    )
    out["readback"] = info.step
    write_result(root, "fourth", rank, out)


#: A flipped byte in each kind of file of a sharded step: (name, file, byte offset from the end).
FLIPS = (
    ("shard-header", "rank-00001/model.shard.safetensors", None),  # offset 12: inside the JSON header
    ("shard-data", "rank-00001/optimizer.shard.safetensors", 1),
    ("index", "rank-00001/model.chunks.json", 5),
    ("meta", "optimizer.sharding.json", 5),
    ("manifest", "manifest.json", 30),
)


def _flip(src: Path, dst: Path, relpath: str, from_end: int | None) -> None:
    shutil.copytree(src, dst)
    f = dst / "step-000000000002" / relpath
    data = bytearray(f.read_bytes())
    data[12 if from_end is None else len(data) - from_end] ^= 0x01
    f.write_bytes(bytes(data))


def test_fsdp2_and_2d_mesh_save_and_reshard_bitwise(tmp_path: Path) -> None:
    launch(_first, 2, tmp_path, deadline=120)
    first = read_results(tmp_path, "first", 2)
    step2 = tmp_path / "w2" / "step-000000000002"
    files = sorted(str(p.relative_to(step2)) for p in step2.rglob("*") if p.is_file())
    assert files == [
        "manifest.json",
        "model.sharding.json",
        "optimizer.sharding.json",
        "rank-00000/model.chunks.json",
        "rank-00000/model.shard.safetensors",
        "rank-00000/optimizer.chunks.json",
        "rank-00000/optimizer.shard.safetensors",
        "rank-00000/rng.json",
        "rank-00000/rng.safetensors",
        "rank-00001/model.chunks.json",
        "rank-00001/model.shard.safetensors",
        "rank-00001/optimizer.chunks.json",
        "rank-00001/optimizer.shard.safetensors",
        "rank-00001/rng.json",
        "rank-00001/rng.safetensors",
    ]
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["world_size"] == 2
    assert manifest["entries"]["model"] == {"kind": "state", "ranks": [0, 1], "scope": "sharded"}
    meta = json.loads((step2 / "model.sharding.json").read_text())
    # The 5-row weight of the first layer: rows 0-2 on rank 0, 3-4 on rank 1, each in its own file.
    chunks = meta["tensors"]["0.weight"]["chunks"]
    assert [(c["offsets"], c["sizes"], c["file"]) for c in chunks] == [
        ([0, 0], [3, 4], "rank-00000/model.shard.safetensors"),
        ([3, 0], [2, 4], "rank-00001/model.shard.safetensors"),
    ]
    for r in first:
        assert r["refused"] is not None and "param_groups." in r["refused"] and "rank(s) 0" in r["refused"]
        assert "rank(s) 1" in r["refused"]
        assert r["steps"] == [1, 2]  # the refused save left nothing behind
    for kind, relpath, from_end in FLIPS:
        _flip(tmp_path / "w2", tmp_path / f"flip-{kind}", relpath, from_end)

    launch(_second, 4, tmp_path, deadline=150)
    for r in read_results(tmp_path, "second", 4):
        assert r["2to4"] == {"step": 2, "diff": []}

    launch(_third, 2, tmp_path, deadline=150)
    third = read_results(tmp_path, "third", 2)
    for rank, r in enumerate(third):
        assert r["same"] == {"step": 2, "diff": []}
        assert r["losses"] == first[rank]["losses"]  # training continues bit for bit
        assert r["final_diff"] == []
        assert r["4to2"] == {"step": 5, "diff": []}
        assert r["2dtofsdp"] == {"step": 2, "diff": []}
        assert r["tpfsdp"] == {"step": 2, "diff": []}  # FSDP2 over TP (strided shards) -> FSDP2 only
        for kind, _, _ in FLIPS:
            # Rank 1 alone reads the corrupt file (rank 0 only for the metadata): both fall back.
            assert r[f"flip-{kind}"]["step"] == 1 and r[f"flip-{kind}"]["diff"] == [], kind
            assert any(
                "step 2" in w and ("checksum" in w or "crc32c" in w) for w in r[f"flip-{kind}"]["warnings"]
            )
        # A non-ResumeKit exception on one rank: every rank raises (none hangs, none falls back or
        # loads), the others naming the failing rank; nothing live changed.
        for phase, c in r["crash"].items():
            assert c["unchanged"], phase
            if rank == c["victim"]:
                assert c["raised"] == ["_Boom", f"injected on rank {rank}"], phase
            else:
                assert c["raised"] is not None and c["raised"][0] == "StateMismatchError", phase
                assert f"rank {c['victim']}" in c["raised"][1] and "_Boom" in c["raised"][1], phase

    launch(_fourth, 1, tmp_path, deadline=80)
    (fourth,) = read_results(tmp_path, "fourth", 1)
    assert fourth["step"] == 2 and fourth["diff"] == []
    assert fourth["stray"] is not None and "'w' is a DTensor" in fourth["stray"]
    assert not (tmp_path / "stray" / "step-000000000001").exists()
    assert fourth["readback"] == 3

    # No process group at all: the world-2 checkpoint into a plain model and optimizer.
    assert not dist.is_initialized()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with no_pickle():
        res = rk.Checkpointer(tmp_path / "w2").restore({"model": model, "optimizer": opt})
    assert res is not None and res.step == 2
    assert bitwise_diff(gathered(model, opt), load_gathered(tmp_path / "w2-step2")) == []
