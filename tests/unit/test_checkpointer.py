"""Checkpointer API behaviour on local disk: discovery, retention, refusal to overwrite, partial restore,
validation of user input, and the import boundary of ``import resumekit``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import (
    CheckpointNotFoundError,
    StateMismatchError,
    StepExistsError,
    UnsafeCheckpointError,
)
from resumekit.storage import open_storage
from resumekit.storage.base import Stage, Storage
from resumekit.testing.strategies import assert_identical


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return {"model": model, "extra": {"seed": seed, "w": torch.full((2,), float(seed))}}


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root with its content hash and mtime (to prove nothing changed)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def test_fresh_root_restores_none_and_has_no_steps(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "does-not-exist-yet"):
        ckpt = rk.Checkpointer(root)
        assert ckpt.restore(_state(0)) is None
        assert ckpt.steps() == []
        assert ckpt.latest_step() is None
    assert not (tmp_path / "does-not-exist-yet").exists()  # restore() creates nothing


def test_steps_and_latest_step_are_numeric_and_ignore_debris(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    for step in (100, 5, 20):
        ckpt.save(_state(step), step=step)
    (tmp_path / ".tmp-step-000000000999-deadbeef00000000").mkdir()  # an unfinished save
    (tmp_path / "step-000000000500").mkdir()  # a folder without a manifest: not committed
    (tmp_path / "notes.txt").write_text("user file")
    assert ckpt.steps() == [5, 20, 100]
    assert ckpt.latest_step() == 100
    target = _state(-1)
    result = ckpt.restore(target)
    assert result is not None and result.step == 100
    assert_identical(_state(100)["model"].state_dict(), target["model"].state_dict())


def test_restore_specific_step_and_missing_step(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    for step in (1, 2, 3):
        ckpt.save(_state(step), step=step)
    target = _state(-1)
    result = ckpt.restore(target, step=2)
    assert result is not None and result.step == 2
    assert target["extra"]["seed"] == 2
    assert_identical(_state(2)["model"].state_dict(), target["model"].state_dict())
    with pytest.raises(CheckpointNotFoundError, match=r"step 7 .*committed steps: \[1, 2, 3\]"):
        ckpt.restore(target, step=7)


def test_plain_dict_entries_are_restored_in_place(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, config={"batch_size": 32})
    meta = {"epoch": 3, "history": [1.5, float("inf")], "nested": {"k": (1, 2)}}
    ckpt.save({"meta": meta}, step=1)
    target: dict[str, Any] = {"epoch": 0, "stale": True}
    same = target
    result = ckpt.restore({"meta": target})
    assert result is not None and result.config == {"batch_size": 32}
    assert target is same
    assert_identical(meta, target)


def test_strict_false_leaves_missing_entries_untouched(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    ckpt.save({"model": _state(1)["model"]}, step=1)
    new_head = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in new_head.state_dict().items()}
    target = {"model": _state(-1)["model"], "head": new_head}
    with pytest.raises(StateMismatchError, match="head"):
        ckpt.restore(target)
    result = ckpt.restore(target, strict=False)
    assert result is not None and result.not_restored == ("head",)
    assert_identical(before, dict(new_head.state_dict()))
    assert_identical(_state(1)["model"].state_dict(), target["model"].state_dict())


def test_saving_an_existing_step_raises_and_changes_nothing(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    before = _tree(tmp_path)
    with pytest.raises(StepExistsError, match="step 2 already exists") as info:
        ckpt.save(_state(99), step=2)
    assert isinstance(info.value, FileExistsError)
    assert _tree(tmp_path) == before
    target = _state(-1)
    ckpt.restore(target)
    assert target["extra"]["seed"] == 2


def test_keep_last_keeps_the_newest(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        ckpt.save(_state(step), step=step)
        assert ckpt.steps() == list(range(max(1, step - 1), step + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000004", "step-000000000005"]


def test_keep_every_keeps_milestones_forever(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=2, keep_every=10)
    for step in range(5, 41, 5):
        ckpt.save(_state(step), step=step)
    assert ckpt.steps() == [10, 20, 30, 35, 40]
    target = _state(-1)
    ckpt.restore(target, step=10)
    assert_identical(_state(10)["model"].state_dict(), target["model"].state_dict())


class RecordingStorage:
    """A storage wrapper that logs protocol calls in order (a fake observer, not a mock)."""

    def __init__(self, inner: Storage, log: list[tuple[str, int]]) -> None:
        self.inner = inner
        self.url = inner.url
        self.log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stage(self, step: int, writer_id: str) -> Stage:
        stage = self.inner.stage(step, writer_id)
        log = self.log

        class _Stage:
            data_prefix = stage.data_prefix

            def open_write(self, relpath: str) -> Any:
                log.append(("write", step))
                return stage.open_write(relpath)

            def commit(self, manifest: bytes) -> None:
                stage.commit(manifest)
                log.append(("commit", step))

            def abort(self) -> None:
                stage.abort()

        return _Stage()

    def delete_step(self, step: int) -> None:
        self.log.append(("delete", step))
        self.inner.delete_step(step)


def test_retention_runs_only_after_the_new_checkpoint_is_committed(tmp_path: Path) -> None:
    log: list[tuple[str, int]] = []
    ckpt = rk.Checkpointer(tmp_path, keep_last=1, storage=RecordingStorage(open_storage(tmp_path), log))
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    ckpt.save(_state(3), step=3)
    events = [e for e in log if e[0] != "write"]
    assert events == [("commit", 1), ("commit", 2), ("delete", 1), ("commit", 3), ("delete", 2)]


def test_retention_removes_the_manifest_before_any_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(_state(1), step=1)
    old = tmp_path / "step-000000000001"
    data_files = sorted(
        p.relative_to(old) for p in old.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert data_files, "the checkpoint must have data files for this test to mean anything"
    observed: list[str] = []
    real_unlink, real_rmtree = os.unlink, shutil.rmtree

    def check_state(event: str) -> None:
        # At the first removal of anything in the old step, only its manifest may be gone already.
        manifest_present = (old / "manifest.json").exists()
        data_present = all((old / f).exists() for f in data_files)
        observed.append(f"{event}: manifest={manifest_present} data={data_present}")

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(old)) or kwargs.get("dir_fd") is not None:
            check_state(f"unlink {Path(path).name}")
        real_unlink(path, *args, **kwargs)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(old)):
            check_state("rmtree")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ckpt.save(_state(2), step=2)
    monkeypatch.undo()
    assert observed, "retention removed nothing"
    assert observed[0] == "unlink manifest.json: manifest=True data=True"
    assert observed[1] == "rmtree: manifest=False data=True"
    assert not old.exists()
    assert ckpt.steps() == [2]


def test_failed_save_does_not_trigger_retention(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=1)
    ckpt.save(_state(1), step=1)

    class Unsavable:
        def state_dict(self) -> dict[str, Any]:
            return {"bad": object()}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            raise AssertionError("never called")

    with pytest.raises(rk.ResumeKitError):
        ckpt.save({"model": _state(2)["model"], "x": Unsavable()}, step=2)
    assert ckpt.steps() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000001"]  # the staging folder is gone too


# -- user input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "", ".hidden", "x" * 200, "a\\b", "/abs", "s3://b/x", "a..b"]
)
def test_invalid_entry_names_are_refused(tmp_path: Path, name: str) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="entry name"):
        ckpt.save({name: {"a": 1}}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_non_string_entry_name_and_non_stateful_entry_are_refused(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="entry name"):
        ckpt.save({5: {"a": 1}}, step=1)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="no state_dict"):
        ckpt.save({"lr": 0.1}, step=1)
    with pytest.raises(TypeError, match="mapping"):
        ckpt.save([("model", nn.Linear(1, 1))], step=1)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", [-1, 1.0, "3", True, None, 2**64 * 1.0])
def test_invalid_step_values_are_refused(tmp_path: Path, step: Any) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="step must be a non-negative int"):
        ckpt.save(_state(0), step=step)
    ckpt.save(_state(0), step=0)
    with pytest.raises(TypeError, match="step must be a non-negative int"):
        ckpt.restore(_state(0), step=step if step is not None else -1)


def test_large_step_numbers_sort_correctly(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path)
    for step in (10**13, 999_999_999_999, 2):
        ckpt.save({"m": {"s": step}}, step=step)
    assert ckpt.steps() == [2, 999_999_999_999, 10**13]
    target: dict[str, Any] = {}
    assert ckpt.restore({"m": target}) is not None and target == {"s": 10**13}


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"keep_last": 0}, ValueError, "keep_last"),
        ({"keep_last": -2}, ValueError, "keep_last"),
        ({"keep_last": 1.5}, ValueError, "keep_last"),
        ({"keep_last": True}, ValueError, "keep_last"),
        ({"keep_every": 0}, ValueError, "keep_every"),
        ({"config": {"lr": object()}}, TypeError, "config must be JSON"),
        ({"config": {"lr": float("nan")}}, TypeError, "config must be JSON"),
        ({"config": {1: 2, "a": {3: 4}, "b": {(1, 2): 3}}}, TypeError, "config must be JSON"),
    ],
    ids=[
        "keep0",
        "keep-neg",
        "keep-float",
        "keep-bool",
        "every0",
        "config-object",
        "config-nan",
        "config-key",
    ],
)
def test_invalid_options_are_refused_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        rk.Checkpointer(tmp_path, **kwargs)


def test_options_are_keyword_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        rk.Checkpointer(tmp_path, 3)  # type: ignore[call-arg]
    ckpt = rk.Checkpointer(tmp_path)
    with pytest.raises(TypeError):
        ckpt.save(_state(0), 1)  # type: ignore[call-arg]


def test_manifest_records_config_environment_and_files(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, config={"batch_size": 8, "grad_accumulation": 2})
    info = ckpt.save(_state(3), step=3)
    manifest = json.loads((tmp_path / "step-000000000003" / "manifest.json").read_bytes())
    assert manifest["step"] == 3 and type(manifest["format_version"]) is int
    assert manifest["config"] == {"batch_size": 8, "grad_accumulation": 2}
    assert manifest["environment"]["torch"] == torch.__version__
    listed = set(manifest["files"])
    on_disk = {
        str(p.relative_to(tmp_path / "step-000000000003"))
        for p in (tmp_path / "step-000000000003").rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert listed == on_disk
    assert info.nbytes == sum(r["size"] for r in manifest["files"].values())
    assert all(p.name.endswith((".json", ".safetensors")) for p in (tmp_path / "step-000000000003").iterdir())


# -- import boundary --------------------------------------------------------------------------------


def test_import_resumekit_imports_no_optional_dependency() -> None:
    code = (
        "import sys, json, resumekit\n"
        "heavy = ['lightning', 'pytorch_lightning', 'lightning_fabric', 'accelerate', 's3fs', 'gcsfs', "
        "'hypothesis', 'boto3', 'botocore', 'transformers']\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    # The check is meaningful: these are installed, so importing them would have shown up.
    for mod in ("lightning", "accelerate", "s3fs", "gcsfs"):
        assert importlib.util.find_spec(mod) is not None, f"{mod} should be installed in the test environment"


def test_keep_last_counts_only_committed_checkpoints(tmp_path: Path) -> None:
    ckpt = rk.Checkpointer(tmp_path, keep_last=2)
    # A newer folder without a manifest (a crashed object-store write) must not evict a real checkpoint.
    (tmp_path / "step-000000000050" / "w-0123456789abcdef").mkdir(parents=True)
    for step in (1, 2, 3):
        ckpt.save(_state(step), step=step)
    assert ckpt.steps() == [2, 3]


# -- the same contract on an fsspec store (memory://) ------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh checkpoint root on local disk or on fsspec's in-process memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    import fsspec

    path = f"rk-test-{uuid.uuid4().hex}"
    yield f"memory://{path}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{path}"):
        fs.rm(f"/{path}", recursive=True)


def test_api_contract_on_every_backend(any_url: str) -> None:
    ckpt = rk.Checkpointer(any_url, keep_last=2, config={"run": 7})
    assert ckpt.restore(_state(0)) is None
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    for step in (3, 6, 9):
        ckpt.save(_state(step), step=step)
    assert ckpt.steps() == [6, 9] and ckpt.latest_step() == 9
    with pytest.raises(StepExistsError):
        ckpt.save(_state(0), step=9)
    fresh = rk.Checkpointer(any_url)
    target = _state(-1)
    result = fresh.restore(target)
    assert result is not None and result.step == 9 and result.config == {"run": 7}
    assert_identical(_state(9)["model"].state_dict(), target["model"].state_dict())
    assert_identical(_state(9)["extra"], target["extra"])
    target = _state(-1)
    result = fresh.restore(target, step=6)
    assert result is not None and result.step == 6
    assert_identical(_state(6)["extra"], target["extra"])
    with pytest.raises(CheckpointNotFoundError):
        fresh.restore(target, step=3)  # removed by retention


@pytest.mark.parametrize("bad", [0, -1.0, True, "60"])
def test_async_timeout_must_be_positive_seconds(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="async_timeout must be a positive number of seconds"):
        rk.Checkpointer(tmp_path, async_timeout=bad)
    assert rk.Checkpointer(tmp_path, async_timeout=2.5).async_timeout == 2.5
