"""A committed sharded checkpoint (format 2: FSDP2 over two gloo ranks, uneven dimensions, AdamW,
per-rank RNG) keeps restoring bit for bit, here into a plain model and optimizer in one process
without a process group. ``expected.*`` is the full state gathered by torch (``full_tensor``) when it
was saved, not through resumekit. Never regenerate it: it stands for what users already have."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

import resumekit as rk
from resumekit import cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sharded-v2"


def test_committed_sharded_checkpoint_restores_bit_for_bit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURE / "root", root)  # the committed fixture stays pristine
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)  # a different lr: the checkpoint's must win
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 2 -> 1 and the writer's environment
        res = rk.Checkpointer(root).restore({"model": model, "optimizer": opt})
    assert res is not None and res.step == 2
    expected: dict = dict(load_file(str(FIXTURE / "expected.safetensors")))
    expected.update(json.loads((FIXTURE / "expected.json").read_text()))
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    got: dict = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    got.update({f"optimizer.{k}": v for k, v in get_optimizer_state_dict(model, opt, options=opts).items()})
    assert sorted(got) == sorted(expected)
    for k, v in got.items():
        if isinstance(v, torch.Tensor):
            e = expected[k]
            assert v.dtype == e.dtype and v.shape == e.shape, k
            assert torch.equal(v.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8)), k
        else:
            assert json.dumps(v) == json.dumps(expected[k]), k


def test_cli_shows_shards_and_verify_checks_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURE / "root", root)
    assert cli.main(["inspect", str(root), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format_version"] == 2 and d["world_size"] == 2 and d["other_files"] == []
    model = next(e for e in d["entries"] if e["name"] == "model")
    assert model["scope"] == "sharded" and model["ranks"] == [0, 1]
    assert [f["path"] for f in model["files"]] == [
        "model.sharding.json",
        "rank-00000/model.shard.safetensors",
        "rank-00000/model.chunks.json",
        "rank-00001/model.shard.safetensors",
        "rank-00001/model.chunks.json",
    ]
    assert cli.main(["verify", str(root)]) == 0
    capsys.readouterr()
    shard = root / "step-000000000002" / "rank-00001" / "optimizer.shard.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(root)]) != 0
    assert "rank-00001/optimizer.shard.safetensors" in capsys.readouterr().out
