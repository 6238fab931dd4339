"""Sharded state works everywhere the rest works (issue 13 item 6): S3, retention, drift (the device
mesh), partial restore, the CLI and accumulated gradients under FSDP2.

Two world-2 launches (gloo, CPU) and checks in this process in between, to keep the runtime small:

1. save: FSDP2 steps 1 and 2 to local disk with ``keep_last=1`` (a recording storage logs when step 1
   is deleted) and to S3 (moto on loopback); an accumulation window left open with its gradients
   (``AccumulatedGradients``, DTensor shards) at step 3, then the window finished; a dp=1 x tp=2
   mesh model; gradients held inside FSDP2 (no gradient sync) refused at save on every rank.
2. here: the manifest records the mesh; retention deleted every file of step 1 only after step 2
   committed; ``ls``/``inspect``/``verify`` on S3; the S3 step 2 into a plain model without a
   process group (resharded, bit for bit); then a byte flipped in one shard object of step 2.
3. restore: S3 falls back to step 1 on both ranks; the gradients come back bit for bit and the
   finished window equals the uninterrupted one; ``only=["model"]`` resets the sharded optimizer;
   the 2-D checkpoint into FSDP2 warns naming both meshes, and ``env.mesh: error`` refuses it with
   nothing changed; gradients saved from an unsharded model are refused for an FSDP2 one.
4. here: the gradient shards refused at world size 1 before anything loads, naming the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import torch
import torch.distributed as dist
from _sharded_helpers import (
    batch,
    bitwise_diff,
    fsdp,
    gathered,
    launch,
    load_gathered,
    make_model,
    read_results,
    save_gathered,
    train,
    write_result,
)
from safetensors.torch import load_file, save_file

import resumekit as rk
from resumekit import cli
from resumekit.drift import DriftWarning
from resumekit.storage import open_storage
from resumekit.storage.base import Storage

pytestmark = [pytest.mark.distributed, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(300)]

FSDP_MESH = {"shape": [2], "dim_names": []}
ONE_BY_TWO = {"shape": [1, 2], "dim_names": ["dp", "tp"]}


class _RecordingDeletes:
    """A storage wrapper that records, for every step retention deletes, the committed steps then."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self.deletes: list[tuple[int, list[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete_step(self, step: int) -> None:
        committed = [s for s in self.inner.step_candidates() if self.inner.read_manifest(s) is not None]
        self.deletes.append((step, committed))
        self.inner.delete_step(step)


def _new() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = fsdp(make_model())
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _one_by_two(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter a DTensor on a 1x2 (dp, tp) mesh: a 2-D mesh at world size 2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            layer.weight = torch.nn.Parameter(
                distribute_tensor(layer.weight.detach(), mesh, [Replicate(), Shard(1)])
            )
            layer.bias = torch.nn.Parameter(
                distribute_tensor(layer.bias.detach(), mesh, [Replicate(), Shard(0)])
            )
    return model


def _full_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _micro(model: torch.nn.Module, step: int, rank: int) -> None:
    model(batch(step, rank)).square().mean().backward()


def _local_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_local().detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _save(rank: int, world: int, root: Path, s3_url: str, s3_opts: dict[str, Any]) -> None:
    model, opt = _new()
    storage = _RecordingDeletes(open_storage(str(root / "keep")))
    keep = rk.Checkpointer(root / "keep", keep_last=1, storage=storage)
    remote = rk.Checkpointer(s3_url, storage_options=s3_opts)
    for step in (1, 2):
        train(model, opt, step, rank)
        keep.save({"model": model, "optimizer": opt}, step=step)
        remote.save({"model": model, "optimizer": opt, "rng": rk.RNGState()}, step=step)
        g = gathered(model, opt)
        if rank == 0:
            save_gathered(g, root / f"step{step}")
    out: dict[str, Any] = {"deletes": storage.deletes}
    # An accumulation window left open: its gradients are DTensor shards, saved per rank.
    opt.zero_grad()
    _micro(model, 3, rank)
    grads = rk.AccumulatedGradients(model)
    rk.Checkpointer(root / "grads").save({"model": model, "optimizer": opt, "grads": grads}, step=3)
    out["steps"] = keep.steps()  # after a collective: rank 0's retention has finished
    save_file(_local_grads(model), str(root / f"grads-{rank}.safetensors"))
    _micro(model, 4, rank)
    opt.step()
    g = gathered(model, opt)
    if rank == 0:
        save_gathered(g, root / "window-done")
    m2d = _one_by_two(make_model())
    rk.Checkpointer(root / "mesh2d").save({"model": m2d}, step=1)
    full = _full_model(m2d)
    if rank == 0:
        save_file(full, str(root / "mesh2d.safetensors"))
    # Micro-batches without gradient sync keep their gradients inside FSDP2, not in .grad: refused.
    model, opt = _new()
    model.set_requires_gradient_sync(False)
    _micro(model, 5, rank)
    unsynced = rk.Checkpointer(root / "unsynced")
    try:
        unsynced.save({"model": model, "grads": rk.AccumulatedGradients(model)}, step=1)
        out["unsynced"] = None
    except rk.errors.UnsupportedValueError as exc:
        out["unsynced"] = str(exc)
    out["unsynced_steps"] = unsynced.steps()
    write_result(root, "save", rank, out)


def _restore(rank: int, world: int, root: Path, s3_url: str, s3_opts: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    # S3: a flipped byte in rank 1's shard of step 2 makes both ranks fall back to step 1.
    model, opt = _new()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rk.Checkpointer(s3_url, storage_options=s3_opts).restore(
            {"model": model, "optimizer": opt, "rng": rk.RNGState()}
        )
    assert res is not None
    out["s3"] = {
        "step": res.step,
        "skipped": [s for s, _ in res.skipped],
        "diff": bitwise_diff(gathered(model, opt), load_gathered(root / "step1")),
        "warned": any("step 2" in str(w.message) and "skipped" in str(w.message) for w in caught),
    }
    # The accumulated gradient shards come back bit for bit; the finished window equals the original.
    model, opt = _new()
    res = rk.Checkpointer(root / "grads").restore(
        {"model": model, "optimizer": opt, "grads": rk.AccumulatedGradients(model)}
    )
    saved = load_file(str(root / f"grads-{rank}.safetensors"))
    out["grads"] = {"step": res.step if res else None, "diff": bitwise_diff(_local_grads(model), saved)}
    _micro(model, 4, rank)
    opt.step()
    out["window"] = bitwise_diff(gathered(model, opt), load_gathered(root / "window-done"))
    # Partial restore: the weights only; the sharded optimizer is reset with its group.
    model, opt = _new()
    train(model, opt, 9, rank)  # the optimizer has moments that must go
    res = rk.Checkpointer(root / "keep").restore({"model": model, "optimizer": opt}, only=["model"])
    expected = {k: v for k, v in load_gathered(root / "step2").items() if k.startswith("model.")}
    got = {k: v for k, v in gathered(model, opt).items() if k.startswith("model.")}
    out["only"] = {
        "step": res.step if res else None,
        "reset": list(res.reset) if res else None,
        "diff": bitwise_diff(got, expected),
        "opt_state": len(opt.state),
    }
    # Drift: the dp=1 x tp=2 checkpoint into FSDP2 at the same world size warns, naming both meshes.
    model = fsdp(make_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rk.Checkpointer(root / "mesh2d").restore({"model": model})
    full = load_file(str(root / "mesh2d.safetensors"))
    out["mesh"] = {
        "drift": [(i.key, i.severity, i.saved, i.current) for i in res.drift.items] if res else None,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, DriftWarning)],
        "diff": bitwise_diff(_full_model(model), full),
    }
    fresh = fsdp(make_model((4, 5, 3)))
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    before = _full_model(fresh)
    try:
        rk.Checkpointer(root / "mesh2d", drift_policy=rk.DriftPolicy({"env.mesh": "error"})).restore(
            {"model": fresh}
        )
        out["mesh_error"] = None
    except rk.errors.DriftError as exc:
        out["mesh_error"] = str(exc)
    out["mesh_error_unchanged"] = bitwise_diff(_full_model(fresh), before) == []
    # Gradients saved from an unsharded model do not go into a sharded one: refused on every rank
    # (rank 1 has no record of that world-1 checkpoint; rank 0 refuses for both).
    model = fsdp(make_model())
    before = _full_model(model)
    try:
        rk.Checkpointer(root / "plain-grads").restore(
            {"model": model, "grads": rk.AccumulatedGradients(model)}
        )
        out["plain_grads"] = None
    except Exception as exc:
        out["plain_grads"] = [type(exc).__name__, str(exc)]
    out["plain_grads_unchanged"] = bitwise_diff(_full_model(model), before) == [] and all(
        p.grad is None for p in model.parameters()
    )
    write_result(root, "restore", rank, out)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], opts: dict[str, Any], expect: int = 0) -> Any:
    flags = []
    for key, value in opts.items():
        flags += ["-o", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    assert cli.main([*argv, *flags, "--json"]) == expect
    return json.loads(capsys.readouterr().out)


def test_sharded_state_on_s3_with_retention_drift_partial_restore_and_gradients(
    tmp_path: Path, s3: Any, unique_prefix: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = s3.url(unique_prefix("sharded"), "run")
    opts = s3.storage_options
    launch(_save, 2, tmp_path, url, opts, deadline=200)
    for r in read_results(tmp_path, "save", 2):
        assert r["steps"] == [2]
        assert r["unsynced"] is not None and "set_requires_gradient_sync(False)" in r["unsynced"]
        assert "accumulation boundary" in r["unsynced"] and r["unsynced_steps"] == []
    (rank0,) = [r for r in read_results(tmp_path, "save", 2) if r["deletes"]]
    # Rank 0 ran retention, once, after step 2 had committed.
    assert rank0["deletes"] == [[1, [1, 2]]]
    keep = tmp_path / "keep"
    assert sorted(p.name for p in keep.iterdir() if p.name.startswith("step-")) == ["step-000000000002"]
    manifest = json.loads((keep / "step-000000000002" / "manifest.json").read_text())
    assert manifest["environment"]["mesh"] == {"model": FSDP_MESH, "optimizer": FSDP_MESH}
    grads_manifest = json.loads((tmp_path / "grads" / "step-000000000003" / "manifest.json").read_text())
    assert grads_manifest["entries"]["grads"]["scope"] == "rank"

    # The CLI on S3: world size, mesh and shards; verify checks every shard.
    rows = _cli(["ls", url], capsys, opts)["steps"]
    assert [(r["step"], r["world_size"], r["shards"]) for r in rows] == [(1, 2, 4), (2, 2, 4)]
    assert rows[1]["mesh"] == {"model": FSDP_MESH, "optimizer": FSDP_MESH}
    d = _cli(["inspect", url], capsys, opts)
    assert d["shards"] == 4 and d["mesh"] == rows[1]["mesh"]
    v = _cli(["verify", url], capsys, opts)
    assert v["ok"] and [s["shards"] for s in v["steps"]] == [4, 4]

    # No process group: the S3 world-2 step into a plain model and optimizer, bit for bit.
    assert not dist.is_initialized()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rk.Checkpointer(url, storage_options=opts).restore({"model": model, "optimizer": opt})
    assert res is not None and res.step == 2
    assert bitwise_diff(gathered(model, opt), load_gathered(tmp_path / "step2")) == []
    assert any(i.key == "env.mesh" and i.current == {} for i in res.drift.items)
    assert any("none (unsharded) now" in str(w.message) for w in caught)

    # A flipped byte in one shard object of step 2.
    fs = s3.filesystem()
    (key,) = [
        k
        for k in fs.find(url.removeprefix("s3://") + "/step-000000000002")
        if k.endswith("/rank-00001/model.shard.safetensors")  # under the step's data prefix
    ]
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01
    fs.pipe_file(key, bytes(data))
    bad = _cli(["verify", url], capsys, opts, expect=1)
    problems = [(s["step"], p["file"]) for s in bad["steps"] for p in s["problems"]]
    assert len(problems) == 1 and problems[0][0] == 2
    assert problems[0][1].endswith("rank-00001/model.shard.safetensors")

    plain = make_model()
    _micro(plain, 1, 0)
    rk.Checkpointer(tmp_path / "plain-grads").save(
        {"model": plain, "grads": rk.AccumulatedGradients(plain)}, step=1
    )

    launch(_restore, 2, tmp_path, url, opts, deadline=200)
    for r in read_results(tmp_path, "restore", 2):
        assert r["s3"] == {"step": 1, "skipped": [2], "diff": [], "warned": True}
        assert r["grads"] == {"step": 3, "diff": []}
        assert r["window"] == []  # the resumed window ends exactly where the uninterrupted one did
        assert r["only"] == {"step": 2, "reset": ["optimizer"], "diff": [], "opt_state": 0}
        assert r["mesh"]["diff"] == []
        assert r["mesh"]["drift"] == [["env.mesh", "warn", {"model": ONE_BY_TWO}, {"model": FSDP_MESH}]]
        (warning,) = r["mesh"]["warnings"]
        assert "dp=1 x tp=2 (model) at save, 2 (model) now" in warning
        assert r["mesh_error"] is not None and "env.mesh" in r["mesh_error"]
        assert r["mesh_error_unchanged"]
        assert r["plain_grads"] is not None and r["plain_grads"][0] == "StateMismatchError"
        assert "boundary" in r["plain_grads"][1] and r["plain_grads_unchanged"]

    # The gradient shards at another world size: refused before anything loads, naming the fix.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rk.errors.StateMismatchError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk.Checkpointer(tmp_path / "grads").restore(
            {"model": model, "optimizer": opt, "grads": rk.AccumulatedGradients(model)}
        )
    message = str(info.value)
    assert "accumulation boundary" in message and "world size" in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt.state and all(p.grad is None for p in model.parameters())
