"""A hostile or unlucky on-storage tree: links into and out of the root, FIFOs, folders and files in
the wrong places, empty, truncated and grown files (issue 17, items 1 and 6).

What must hold for any such tree: ``restore()`` gives a checkpoint whose values are exactly those
saved, or falls back to an older one, or raises a resumekit error naming every step it skipped;
``steps()`` and ``latest_step()`` return; nothing blocks; and retention deletes nothing outside its
own root. Every test runs under a deadline, so a blocking open fails it instead of hanging CI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import resumekit as rk
from resumekit.errors import CheckpointCorruptError, ResumeKitError, UnsafeCheckpointError
from resumekit.storage.local import LocalStorage
from resumekit.testing.strategies import assert_identical

STEP1, STEP2, STEP100 = "step-000000000001", "step-000000000002", "step-000000000100"


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": nn.Linear(4, 4), "meta": {"step": step, "t": torch.arange(3) * step}}


def _target() -> dict[str, Any]:
    return {"model": nn.Linear(4, 4), "meta": {}}


def _assert_state(restored: dict[str, Any], step: int) -> None:
    """``restored`` holds exactly what ``_state(step)`` saved."""
    want = _state(step)
    assert_identical(want["model"].state_dict(), restored["model"].state_dict())
    assert_identical(want["meta"], restored["meta"])


def _tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its bytes (or its kind): what 'untouched' means."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(autouse=True)
def _alarm() -> Iterator[None]:
    """A blocking open (a FIFO) raises here after 20 s instead of hanging the run."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError("a storage call blocked (a FIFO opened for reading?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _restore_quietly(ckpt: rk.Checkpointer, target: dict[str, Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ckpt.restore(target)
    return result, [str(w.message) for w in caught]


# -- item 1: retention through a symlink --------------------------------------------------------------


@pytest.fixture
def other_run(tmp_path: Path) -> Path:
    """Another run's root with its only checkpoint, step 100."""
    other = tmp_path / "other-run"
    rk.Checkpointer(other).save(_state(100), step=100)
    return other


def test_retention_never_deletes_another_runs_checkpoint_through_a_symlinked_step(
    tmp_path: Path, other_run: Path
) -> None:
    mine = tmp_path / "my-run"
    mine.mkdir()
    (mine / STEP100).symlink_to(other_run / STEP100)  # a "warm start" by linking
    before = _tree_digest(other_run)
    ckpt = rk.Checkpointer(mine, keep_last=1)

    # The link is not followed: restore names it and refuses, with the fix in the message.
    with pytest.raises(CheckpointCorruptError, match=r"symbolic link.*never followed.*cp -r"):
        _restore_quietly(ckpt, _target())
    assert ckpt.steps() == []
    assert ckpt.latest_step() is None

    ckpt.save(_state(101), step=101)
    ckpt.save(_state(102), step=102)  # keep_last=1: retention ran twice

    assert _tree_digest(other_run) == before, "retention touched another run's checkpoint"
    assert rk.Checkpointer(other_run).steps() == [100]
    restored = _target()
    assert rk.Checkpointer(other_run).restore(restored).step == 100
    _assert_state(restored, 100)
    assert (mine / STEP100).is_symlink()  # left in place, never deleted: it is not ours
    assert ckpt.steps() == [102]


def test_delete_step_refuses_a_symlinked_step(tmp_path: Path, other_run: Path) -> None:
    mine = tmp_path / "my-run"
    mine.mkdir()
    (mine / STEP100).symlink_to(other_run / STEP100)
    before = _tree_digest(other_run)
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        LocalStorage(str(mine)).delete_step(100)
    assert _tree_digest(other_run) == before
    assert (mine / STEP100).is_symlink()


def test_cleanup_never_follows_a_step_link_to_a_folder_without_manifest(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / STEP1
    elsewhere.mkdir(parents=True)
    (elsewhere / "precious.bin").write_bytes(b"x" * 10)
    mine = tmp_path / "my-run"
    mine.mkdir()
    (mine / STEP1).symlink_to(elsewhere)  # looks like debris (no manifest) through the link
    (mine / ".tmp-step-000000000003-abc").symlink_to(elsewhere)
    removed = LocalStorage(str(mine)).cleanup(grace_seconds=0)
    assert removed == []
    assert (elsewhere / "precious.bin").read_bytes() == b"x" * 10


def test_retention_deletes_a_step_with_a_linked_file_without_touching_the_target(
    tmp_path: Path, other_run: Path
) -> None:
    mine = tmp_path / "my-run"
    ckpt = rk.Checkpointer(mine, keep_last=1)
    ckpt.save(_state(1), step=1)
    target = other_run / STEP100 / "model.safetensors"
    before = _tree_digest(other_run)
    link = mine / STEP1 / "model.safetensors"
    link.unlink()
    link.symlink_to(target)
    ckpt.save(_state(2), step=2)
    assert ckpt.steps() == [2]
    assert not (mine / STEP1).exists()
    assert _tree_digest(other_run) == before


# -- item 6: FIFOs, and other kinds of file where a regular file belongs ----------------------------


@pytest.fixture
def two_steps(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    ckpt = rk.Checkpointer(root)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    return root


@pytest.mark.timeout(30)
def test_fifo_manifest_is_skipped_not_waited_on(two_steps: Path) -> None:
    manifest = two_steps / STEP2 / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    ckpt = rk.Checkpointer(two_steps)
    assert ckpt.steps() == [1]
    assert ckpt.latest_step() == 1
    result, caught = _restore_quietly(ckpt, t := _target())
    assert result.step == 1
    _assert_state(t, 1)
    assert any("FIFO" in m and str(manifest) in m for m in caught), caught


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["model.json", "model.safetensors", "meta.json"])
def test_fifo_data_file_is_skipped_with_fallback(two_steps: Path, name: str) -> None:
    path = two_steps / STEP2 / name
    path.unlink()
    os.mkfifo(path)
    ckpt = rk.Checkpointer(two_steps)
    assert ckpt.steps() == [1, 2]  # committed (a manifest), but it does not verify
    result, caught = _restore_quietly(ckpt, t := _target())
    assert result.step == 1
    _assert_state(t, 1)
    assert any("FIFO" in m and name in m for m in caught), caught


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "file", "dir-link-inside"])
def test_step_entry_that_is_not_a_real_folder_is_skipped(two_steps: Path, kind: str) -> None:
    step3 = two_steps / "step-000000000003"
    if kind == "fifo":
        os.mkfifo(step3)
    elif kind == "file":
        step3.write_bytes((two_steps / STEP2 / "manifest.json").read_bytes())
    else:
        step3.symlink_to(two_steps / STEP2)  # a link that stays inside the root is not followed either
    ckpt = rk.Checkpointer(two_steps)
    assert ckpt.steps() == [1, 2]
    result, caught = _restore_quietly(ckpt, t := _target())
    assert result.step == 2
    _assert_state(t, 2)
    assert any("step-000000000003" in m for m in caught), caught


@pytest.mark.timeout(30)
def test_linked_subfolder_inside_a_step_is_not_followed(two_steps: Path, tmp_path: Path) -> None:
    # A rank folder (or any folder between the step and a file) that is a link: refused.
    outside = tmp_path / "outside"
    shutil.copytree(two_steps / STEP2, outside)
    step2 = two_steps / STEP2
    for name in ("model.json", "model.safetensors"):
        (step2 / name).unlink()
    sub = step2 / "sub"
    sub.symlink_to(outside)
    storage = LocalStorage(str(two_steps))
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        storage.read_file(2, "sub/model.json", 1)
    with pytest.raises(UnsafeCheckpointError):
        storage.read_file(2, "../step-000000000001/model.json", 1)


def test_oversized_manifest_is_refused_before_it_is_read(two_steps: Path) -> None:
    from resumekit.format.manifest import MAX_MANIFEST_BYTES

    manifest = two_steps / STEP2 / "manifest.json"
    with open(manifest, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    ckpt = rk.Checkpointer(two_steps)
    assert ckpt.steps() == [1]
    result, caught = _restore_quietly(ckpt, _target())
    assert result.step == 1
    assert any("over the" in m for m in caught), caught


# -- structured fuzzing of the tree --------------------------------------------------------------------

_FILES = ("manifest.json", "model.json", "model.safetensors", "meta.json", "meta.safetensors")
_MUTATIONS = (
    "delete",
    "empty",
    "truncate",
    "append",
    "sparse-huge",
    "fifo",
    "dir",
    "link-inside",
    "link-outside",
    "dangling-link",
)


def _mutate(path: Path, how: str, cut: int, outside: Path) -> None:
    """Damage ``path`` (an existing regular file): after this its step must not verify."""
    data = path.read_bytes()
    path.unlink()
    if how == "delete":
        return
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        path.write_bytes(data[: cut % max(len(data), 1)])
    elif how == "append":
        path.write_bytes(data + b"\0" * (1 + cut % 7))
    elif how == "sparse-huge":
        path.write_bytes(data)
        with open(path, "r+b") as f:
            f.truncate(1 << 40)  # 1 TiB apparent, no disk: the size check must come before any read
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()
        (path / "x").write_bytes(data)
    elif how == "link-inside":
        copy = path.parent.parent / f".copy-{path.parent.name}-{path.name}"
        copy.write_bytes(data)  # identical bytes, but reached through a link: refused all the same
        path.symlink_to(copy)
    elif how == "link-outside":
        copy = outside / f"{path.parent.name}-{path.name}"
        copy.write_bytes(data)
        path.symlink_to(copy)
    elif how == "dangling-link":
        path.symlink_to(outside / "does-not-exist")


_damage = st.lists(
    st.tuples(
        st.sampled_from((1, 2)), st.sampled_from(_FILES), st.sampled_from(_MUTATIONS), st.integers(0, 10**6)
    ),
    max_size=4,
    unique_by=lambda t: (t[0], t[1]),
)


@pytest.fixture(scope="module")
def pristine_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "run"
    ckpt = rk.Checkpointer(root)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    return root


@pytest.mark.timeout(120)
@settings(
    max_examples=60,
    derandomize=True,
    deadline=5000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(damage=_damage, step_link=st.sampled_from(("none", "inside", "outside")))
def test_any_tree_gives_a_verified_restore_or_a_named_resumekit_error(
    pristine_tree: Path, damage: list[tuple[int, str, str, int]], step_link: str
) -> None:
    work = Path(tempfile.mkdtemp(prefix="rk-tree-"))
    try:
        root, outside = work / "run", work / "outside"
        shutil.copytree(pristine_tree, root)
        outside.mkdir()
        (outside / "keep.bin").write_bytes(b"other data")
        for step, name, how, cut in damage:
            _mutate(root / f"step-{step:012d}" / name, how, cut, outside)
        if step_link != "none":  # a newer step that is a link to a good copy: never followed
            dest = outside / "copy" if step_link == "outside" else root / ".copy"
            shutil.copytree(pristine_tree / STEP2, dest)
            (root / "step-000000000003").symlink_to(dest)
        outside_before = _tree_digest(outside)
        damaged = {step for step, *_ in damage}

        ckpt = rk.Checkpointer(root, keep_last=1)
        listed = ckpt.steps()
        assert set(listed) <= {1, 2}
        assert ckpt.latest_step() == (listed[-1] if listed else None)
        try:
            result, _ = _restore_quietly(ckpt, t := _target())
        except ResumeKitError as exc:
            assert damaged == {1, 2}, f"a good step was not restored: {exc}"
            assert isinstance(exc, CheckpointCorruptError) or not listed
        else:
            expected = max({1, 2} - damaged, default=None)
            if expected is None:
                assert result is None  # no manifest left anywhere: a fresh run
            else:
                assert result.step == expected
                _assert_state(t, expected)

        # Retention after a save acts inside the root only.
        ckpt.save(_state(5), step=5)
        assert ckpt.steps()[-1] == 5
        assert _tree_digest(outside) == outside_before
    finally:
        shutil.rmtree(work, ignore_errors=True)
