"""A committed sharded checkpoint (format 2: FSDP2 over two gloo ranks, uneven dimensions, AdamW,
per-rank RNG) keeps restoring bit for bit, here into a plain model and optimizer in one process
without a process group. ``expected.*`` is the full state gathered by torch (``full_tensor``) when it
was saved, not through resumekit. Never regenerate it: it stands for what users already have."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

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
from resumekit.storage import open_storage
from resumekit.storage.base import positional

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sharded-v2"


class _WholeFiles:
    """The local backend without its positional reads, as an object store is: restore then reads
    each shard file whole and checks it against the manifest (no chunk index)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "open_reader":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("positional_reads", [True, False])
def test_committed_sharded_checkpoint_restores_bit_for_bit(tmp_path: Path, positional_reads: bool) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURE / "root", root)  # the committed fixture stays pristine
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)  # a different lr: the checkpoint's must win
    storage = open_storage(str(root))
    if not positional_reads:
        storage = _WholeFiles(storage)
        assert positional(storage) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 2 -> 1 and the writer's environment
        res = rk.Checkpointer(root, storage=storage).restore({"model": model, "optimizer": opt})
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
