"""Corruption tests: damage one file of the newest checkpoint in every way a disk, a transfer or a human
can, and restore must detect it, name the step and the file, and fall back to the previous checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import resumekit as rk
from resumekit.errors import CheckpointCorruptError
from resumekit.format.manifest import seal
from resumekit.format.tensorfile import parse_header
from resumekit.testing.strategies import assert_identical

STEP1, STEP2 = "step-000000000001", "step-000000000002"


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    return {"model": model, "meta": {"step": step, "ids": torch.arange(4) * step}}


def _target() -> dict[str, Any]:
    return {"model": _state(99)["model"], "meta": {}}


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def _data_start(path: Path) -> int:
    return parse_header(path.read_bytes(), str(path))[1]


# Each damage takes the file and returns nothing; the step folder is step-2's.
def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def truncate_last_byte(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def flip_bit_middle(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p.write_bytes(bytes(raw))


def flip_bit_last(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x01
    p.write_bytes(bytes(raw))


def zero_block(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    start = len(raw) // 3
    raw[start : start + 64] = bytes(len(raw[start : start + 64]))
    p.write_bytes(bytes(raw))


def append_garbage(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\x00" * 8)


def delete(p: Path) -> None:
    p.unlink()


def replace_with_previous_step(p: Path) -> None:
    # The same file of the previous checkpoint: right name, plausible content, wrong bytes.
    older = Path(str(p).replace(STEP2, STEP1))
    if older.read_bytes() == p.read_bytes():
        pytest.skip(f"{p.name} is identical in both steps (a skeleton without values): nothing to detect")
    shutil.copyfile(older, p)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncate": truncate,
    "truncate-1": truncate_last_byte,
    "flip-bit": flip_bit_middle,
    "flip-last-bit": flip_bit_last,
    "zero-block": zero_block,
    "append": append_garbage,
    "delete": delete,
    "from-previous-step": replace_with_previous_step,
}
DATA_FILES = ["model.json", "model.safetensors", "meta.json", "meta.safetensors"]


def _restore_expecting_fallback(root: Path, file: str) -> str:
    target = _target()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rk.Checkpointer(root).restore(target)
    assert result is not None and result.step == 1, "restore did not fall back to step 1"
    assert_identical(_state(1)["model"].state_dict(), target["model"].state_dict())
    assert_identical(_state(1)["meta"], target["meta"])
    assert [s for s, _ in result.skipped] == [2]
    messages = [str(w.message) for w in caught if "failed verification" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "step 2" in messages[0] and file in messages[0], messages[0]
    return messages[0]


def test_the_pristine_checkpoint_restores(root: Path) -> None:
    assert set(DATA_FILES) | {"manifest.json"} == set(_files(root / STEP2))
    target = _target()
    result = rk.Checkpointer(root).restore(target)
    assert result is not None and result.step == 2 and result.skipped == ()
    assert_identical(_state(2)["meta"], target["meta"])


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
@pytest.mark.parametrize("file", DATA_FILES)
def test_damaged_data_file_is_detected_named_and_skipped(root: Path, file: str, damage: str) -> None:
    DAMAGES[damage](root / STEP2 / file)
    _restore_expecting_fallback(root, file)


def test_swapped_files_within_a_step_are_detected(root: Path) -> None:
    a, b = root / STEP2 / "model.json", root / STEP2 / "meta.json"
    tmp = root / "swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    _restore_expecting_fallback(root, "json")


def test_swapped_tensor_files_of_equal_size_are_detected(tmp_path: Path) -> None:
    # Two entries whose tensor files have identical sizes: only the checksum can tell them apart.
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save({"a": {"t": torch.zeros(8)}, "b": {"t": torch.zeros(8)}}, step=1)
    ckpt.save({"a": {"t": torch.ones(8)}, "b": {"t": torch.full((8,), 2.0)}}, step=2)
    a, b = tmp_path / STEP2 / "a.safetensors", tmp_path / STEP2 / "b.safetensors"
    assert a.stat().st_size == b.stat().st_size
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)
    b.write_bytes(ra)
    ta: dict[str, Any] = {}
    tb: dict[str, Any] = {}
    with pytest.warns(UserWarning, match=r"step 2 .*a\.safetensors"):
        result = ckpt.restore({"a": ta, "b": tb})
    assert result is not None and result.step == 1
    assert torch.equal(ta["t"], torch.zeros(8)) and torch.equal(tb["t"], torch.zeros(8))


def test_flipped_tensor_bit_loads_silently_in_safetensors_but_not_in_resumekit(root: Path) -> None:
    path = root / STEP2 / "model.safetensors"
    clean = {k: v.clone() for k, v in load_file(str(path)).items()}  # load_file maps the file: copy
    raw = bytearray(path.read_bytes())
    raw[_data_start(path) + 5] ^= 0x04  # inside the first tensor's data, not its header
    path.write_bytes(bytes(raw))
    damaged = load_file(str(path))  # the library has no checksum: it loads without a word
    assert set(damaged) == set(clean)
    differing = [
        k for k in clean if not torch.equal(clean[k].view(torch.uint8), damaged[k].view(torch.uint8))
    ]
    assert len(differing) == 1
    message = _restore_expecting_fallback(root, "model.safetensors")
    assert "crc32c" in message


@pytest.mark.parametrize("damage", ["truncate", "truncate-1", "zero-block", "append", "from-previous-step"])
def test_damaged_manifest_is_detected_and_skipped(root: Path, damage: str) -> None:
    DAMAGES[damage](root / STEP2 / "manifest.json")
    _restore_expecting_fallback(root, "manifest")


def test_deleted_manifest_uncommits_the_step(root: Path) -> None:
    # By design a step without its manifest is not a checkpoint (an unfinished write looks the same).
    (root / STEP2 / "manifest.json").unlink()
    ckpt = rk.Checkpointer(root)
    assert ckpt.steps() == [1]
    target = _target()
    result = ckpt.restore(target)
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_identical(_state(1)["meta"], target["meta"])


def test_manifest_edits_in_file_records_are_detected(root: Path) -> None:
    path = root / STEP2 / "manifest.json"
    manifest = json.loads(path.read_bytes())
    record = manifest["files"]["model.safetensors"]
    record["crc32c"] = f"{int(record['crc32c'], 16) ^ 1:08x}"
    path.write_bytes(seal(manifest))  # a consistent manifest whose record disagrees with the file
    _restore_expecting_fallback(root, "model.safetensors")


def test_any_bit_flip_in_the_manifest_is_detected(root: Path) -> None:
    path = root / STEP2 / "manifest.json"
    raw = path.read_bytes()
    i = raw.index(b'"created_unix": ') + len(b'"created_unix": ') + 3
    flipped = bytearray(raw)
    flipped[i] ^= 0x01  # one digit of the timestamp becomes another digit: still valid JSON
    json.loads(bytes(flipped))
    path.write_bytes(bytes(flipped))
    _restore_expecting_fallback(root, "manifest.json")


def test_restore_of_a_named_corrupt_step_raises_without_fallback(root: Path) -> None:
    flip_bit_middle(root / STEP2 / "meta.safetensors")
    target = _target()
    with pytest.raises(CheckpointCorruptError, match=r"step 2.*meta\.safetensors"):
        rk.Checkpointer(root).restore(target, step=2)
    assert target["meta"] == {}  # nothing was loaded


def test_when_no_checkpoint_verifies_the_error_lists_every_candidate(root: Path) -> None:
    truncate(root / STEP2 / "model.safetensors")
    flip_bit_middle(root / STEP1 / "meta.json")
    target = _target()
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointCorruptError) as info:
            rk.Checkpointer(root).restore(target)
    message = str(info.value)
    assert "step 2" in message and "model.safetensors" in message
    assert "step 1" in message and "meta.json" in message
    assert_identical(before, dict(target["model"].state_dict()))  # nothing half-restored
