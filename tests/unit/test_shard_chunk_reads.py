"""``ShardFiles.fill``: the saved chunks of a sharded entry, read in one ordered pass, land exactly where
each region goes, whatever the path (straight into the target, through a buffer, read-ahead window
of any size, whole files), and a flipped byte is refused. On the committed format-2 fixture, whose
``expected.safetensors`` torch gathered when it was saved."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from resumekit.errors import CheckpointCorruptError
from resumekit.sharding import chunkfiles
from resumekit.sharding.chunkfiles import ChunkRead, ShardFiles
from resumekit.sharding.metadata import ShardingMeta
from resumekit.sharding.reshard import read_meta
from resumekit.storage.local import LocalStorage
from resumekit.storage.verify import step_manifest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sharded-v2"
STEP = "step-000000000002"
EXPECTED = load_file(str(FIXTURE / "expected.safetensors"))
DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


class _WholeFiles:
    """The local backend without positional reads (as an object store): whole files, manifest crc."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "open_reader":
            raise AttributeError(name)
        return getattr(self._inner, name)


def _files(root: Path, whole: bool = False) -> ShardFiles:
    m = step_manifest((root / STEP / "manifest.json").read_bytes(), 2, str(root / STEP))
    storage: Any = LocalStorage(str(root))
    return ShardFiles(_WholeFiles(storage) if whole else storage, 2, m, str(root / STEP))


def _meta(root: Path, entry: str, files: ShardFiles) -> ShardingMeta:
    name = f"{entry}.sharding.json"
    return read_meta((root / STEP / name).read_bytes(), name, files.m)


def _reads(meta: ShardingMeta, split: bool) -> tuple[dict[str, torch.Tensor], list[ChunkRead]]:
    """A fresh full tensor per key, and the regions that fill it: each chunk whole, or (``split``) each
    chunk cut in two along its first dimension (two regions of one chunk: the buffered path)."""
    out: dict[str, torch.Tensor] = {}
    reads: list[ChunkRead] = []
    for key, rec in meta.tensors.items():
        dtype = DTYPES[rec.dtype]
        full = torch.full(rec.shape, -7, dtype=dtype)
        out[key] = full
        for c in rec.chunks:
            if not c.sizes:  # a 0-d tensor (an optimizer's step): one region, the whole value
                reads.append(ChunkRead(c.file, c.name, dtype, (), (), (), full))
                continue
            parts: Sequence[tuple[int, int]] = [(0, c.sizes[0])]
            if split and c.sizes[0] >= 2:
                half = c.sizes[0] // 2
                parts = [(half, c.sizes[0] - half), (0, half)]  # out of order on purpose
            for start, n in parts:
                lengths = (n, *c.sizes[1:])
                offsets = (start,) + (0,) * (len(c.sizes) - 1)
                dest = full
                for dim, (o, ln) in enumerate(zip((c.offsets[0] + start, *c.offsets[1:]), lengths)):
                    dest = dest.narrow(dim, o, ln)
                reads.append(ChunkRead(c.file, c.name, dtype, tuple(c.sizes), offsets, lengths, dest))
    return out, reads[::-1]  # reversed: fill must order the reads itself


@pytest.mark.parametrize("entry", ["model", "optimizer"])
@pytest.mark.parametrize(
    ("split", "whole", "ahead"),
    [(False, False, 64 << 20), (True, False, 64 << 20), (False, False, 1), (True, True, 64 << 20)],
)
def test_every_path_fills_every_region_with_the_saved_values(
    entry: str, split: bool, whole: bool, ahead: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunkfiles, "_AHEAD_BYTES", ahead)  # 1: one read in flight at a time
    root = FIXTURE / "root"
    with _files(root, whole) as files:
        meta = _meta(root, entry, files)
        got, reads = _reads(meta, split)
        files.fill(reads)
    assert got.keys() == meta.tensors.keys()
    for key, t in got.items():
        assert torch.equal(t, EXPECTED[f"{entry}.{key}"]), key


def test_a_flipped_byte_inside_a_chunk_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURE / "root", root)
    shard = root / STEP / "rank-00001" / "model.shard.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # inside the last chunk's bytes; the chunk index still holds the saved crc32c
    shard.write_bytes(bytes(data))
    with _files(root) as files:
        _, reads = _reads(_meta(root, "model", files), split=False)
        with pytest.raises(CheckpointCorruptError, match=r"rank-00001/model\.shard\.safetensors.*crc32c"):
            files.fill(reads)
