"""Restore reads a Module's or Optimizer's tensor file straight into its live tensors on local disk.

What that may and may not change: a checkpoint refused by any check that runs before the data (shapes,
names, drift) leaves every object untouched; a checksum that fails after an in-place read leaves
unverified bytes that a fallback overwrites, and the error names the object when nothing verifies;
``verify_first=True`` never touches an object before every byte is verified.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import CheckpointCorruptError, StateMismatchError
from resumekit.format.tensorfile import parse_header
from resumekit.storage import open_storage
from resumekit.testing.strategies import assert_identical

STEP1, STEP2 = "step-000000000001", "step-000000000002"


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt}


def _flip_data_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[parse_header(bytes(raw), str(path))[1] + 5] ^= 0x04  # inside the first tensor's data
    path.write_bytes(bytes(raw))


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "opt": {
            p: {k: v.clone() for k, v in s.items()} for p, s in state["opt"].state_dict()["state"].items()
        },
    }


def _exp_avg_ptrs(opt: torch.optim.Optimizer) -> list[int]:
    return [s["exp_avg"].data_ptr() for s in opt.state.values()]


@pytest.mark.parametrize("verify_first", [False, True])
def test_restore_gives_the_saved_state_either_way(root: Path, verify_first: bool) -> None:
    target = _state(99)
    result = rk.Checkpointer(root).restore(target, verify_first=verify_first)
    assert result is not None and result.step == 2
    assert_identical(_snapshot(_state(2)), _snapshot(target))


def test_optimizer_state_is_read_into_its_live_tensors(root: Path) -> None:
    # Adam's load_state_dict keeps the tensors it is given: when they are the live ones, the file was
    # read into them. The verify-first path hands it new tensors, so the pointers move.
    fast, careful = _state(99), _state(99)
    fast_before, careful_before = _exp_avg_ptrs(fast["opt"]), _exp_avg_ptrs(careful["opt"])
    rk.Checkpointer(root).restore(fast)
    rk.Checkpointer(root).restore(careful, verify_first=True)
    assert _exp_avg_ptrs(fast["opt"]) == fast_before
    assert _exp_avg_ptrs(careful["opt"]) != careful_before
    assert_identical(_snapshot(fast), _snapshot(careful))


def test_a_fresh_optimizer_without_state_restores_too(root: Path) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    target = {"model": model, "opt": torch.optim.Adam(model.parameters(), lr=1e-3)}
    rk.Checkpointer(root).restore(target)
    assert_identical(_snapshot(_state(2)), _snapshot(target))


def test_checksum_failure_after_in_place_read_falls_back_and_overwrites(root: Path) -> None:
    _flip_data_bit(root / STEP2 / "model.safetensors")
    target = _state(99)
    with pytest.warns(UserWarning, match=r"step 2.*model\.safetensors.*in place"):
        result = rk.Checkpointer(root).restore(target)
    assert result is not None and result.step == 1
    assert_identical(_snapshot(_state(1)), _snapshot(target))


def test_when_nothing_verifies_the_error_names_the_object_read_in_place(root: Path) -> None:
    _flip_data_bit(root / STEP2 / "model.safetensors")
    target = _state(99)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointCorruptError,
        match=r"(?s)read into .model. in place.*re-initialise.*tensors of model were being read in place",
    ):
        rk.Checkpointer(root).restore(target, step=2)
    # The documented price of the fast path: the model holds the unverified bytes of step 2.
    assert not torch.equal(before["model"]["0.weight"], target["model"].state_dict()["0.weight"])


def test_verify_first_leaves_every_object_untouched_when_nothing_verifies(root: Path) -> None:
    _flip_data_bit(root / STEP2 / "model.safetensors")
    _flip_data_bit(root / STEP1 / "opt.safetensors")
    target = _state(99)
    before = _snapshot(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointCorruptError, match=r"(?s)step 2.*step 1") as info:
            rk.Checkpointer(root).restore(target, verify_first=True)
    assert "in place" not in str(info.value)
    assert_identical(before, _snapshot(target))


def test_a_shape_mismatch_is_refused_before_any_tensor_is_read_in_place(root: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    model[1] = nn.LayerNorm(16, elementwise_affine=True, bias=True)
    model[0] = nn.Linear(8, 16, bias=False)  # one tensor fewer: the module file no longer matches
    target = {"model": model, "opt": opt}
    weight_before = model[0].weight.detach().clone()
    opt_before = _snapshot({"model": nn.Linear(1, 1), "opt": opt})["opt"]
    with pytest.raises(StateMismatchError):
        rk.Checkpointer(root).restore(target, step=2)
    assert torch.equal(weight_before, model[0].weight)
    assert_identical(opt_before, _snapshot({"model": nn.Linear(1, 1), "opt": opt})["opt"])


class _Tagged(nn.Linear):
    """A Linear with non-tensor extra state: its checkpoint has a key a plain Linear lacks."""

    def get_extra_state(self) -> Any:
        return {"version": 2}

    def set_extra_state(self, state: Any) -> None:
        self.loaded_extra = state


def test_a_module_whose_tensors_match_but_keys_do_not_is_refused_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rk.Checkpointer(tmp_path).save({"model": _Tagged(4, 3)}, step=1)
    torch.manual_seed(1)
    plain = nn.Linear(4, 3)  # the same tensor names and shapes: the header alone would allow in place
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"_extra_state"):
        rk.Checkpointer(tmp_path).restore({"model": plain})
    assert_identical(before, dict(plain.state_dict()))


def test_an_optimizer_with_other_parameter_groups_is_refused_before_anything_is_loaded(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # one group of 2
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rk.Checkpointer(tmp_path).save({"model": model, "optimizer": opt}, step=1)
    torch.manual_seed(1)
    live = nn.Linear(4, 3)
    live_opt = torch.optim.Adam([{"params": [live.weight]}, {"params": [live.bias]}], lr=1e-3)
    live(torch.randn(2, 4)).sum().backward()
    live_opt.step()  # Adam state for both: tensor names and shapes match the checkpoint's
    model_before = {k: v.clone() for k, v in live.state_dict().items()}
    opt_before = _snapshot({"model": nn.Linear(1, 1), "opt": live_opt})["opt"]
    with pytest.raises(StateMismatchError, match=r"parameter groups of sizes \[2\].*\[1, 1\]"):
        rk.Checkpointer(tmp_path).restore({"model": live, "optimizer": live_opt})
    assert_identical(model_before, dict(live.state_dict()))
    assert_identical(opt_before, _snapshot({"model": nn.Linear(1, 1), "opt": live_opt})["opt"])


class _ReaderFailsOn:
    """Local storage whose positional reads of one file raise an error that is not resumekit's (a
    driver or allocator failure, say) after the other files were read in place."""

    def __init__(self, inner: Any, relpath: str) -> None:
        self._inner, self._relpath = inner, relpath

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def open_reader(self, step: int, relpath: str, size: int) -> Iterator[Any]:
        with self._inner.open_reader(step, relpath, size) as reader:
            if relpath != self._relpath:
                yield reader
                return
            inner_read = reader.read_at

            def read_at(buf: memoryview, offset: int) -> None:
                if offset > 8:  # past the length prefix and the header JSON: the tensors' data
                    raise RuntimeError("simulated failure inside a read")
                inner_read(buf, offset)

            reader.read_at = read_at
            yield reader


def test_an_unexpected_error_while_reading_in_place_names_the_objects_it_left_half_read(root: Path) -> None:
    # Before: the bare error, without a word that the model already held step 2's tensors.
    target = _state(99)
    before = _snapshot(target)
    storage = _ReaderFailsOn(open_storage(str(root)), "opt.safetensors")
    with pytest.raises(RuntimeError, match="simulated failure") as info:
        rk.Checkpointer(root, storage=storage).restore(target)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "tensors of model, opt were being read in place" in notes and "verify_first=True" in notes
    assert not torch.equal(before["model"]["0.weight"], target["model"].state_dict()["0.weight"])
