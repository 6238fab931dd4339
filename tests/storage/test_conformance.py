"""One storage conformance suite, run through the public Checkpointer on every backend.

Local disk, ``memory://``, S3 (moto on loopback) and GCS (gcp-storage-emulator on loopback) must give
the same guarantees: a bitwise round trip; nothing visible before the manifest; the newest checkpoint
that verifies is restored; retention deletes a manifest before its data; a damaged data object is named
in a warning and skipped for the previous checkpoint; debris is cleaned only after its grace period.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

import resumekit as rk
from resumekit.storage import open_storage

try:
    from ._backends import Backend, HookedStorage, assert_restored, make_state, snapshot, step_dir
except ImportError:
    from _backends import (  # type: ignore[no-redef]
        Backend,
        HookedStorage,
        assert_restored,
        make_state,
        snapshot,
        step_dir,
    )

MANIFEST = "manifest.json"


@pytest.fixture(
    params=[
        "local",
        "memory",
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("gcs", marks=pytest.mark.gcs),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The same checkpoint root, seen by resumekit and raw, on each kind of store."""
    kind = request.param
    if kind == "local":
        root = str(tmp_path / "ckpt")
        yield Backend(kind, root, None, fsspec.filesystem("file"), root)
    elif kind == "memory":
        name = f"rk-conformance-{uuid.uuid4().hex[:10]}"
        fs = fsspec.filesystem("memory")
        yield Backend(kind, f"memory://{name}", None, fs, f"/{name}")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        root = request.getfixturevalue("s3_root")
        yield Backend(kind, f"s3://{root}", dict(server.storage_options), server.filesystem(), root)
    else:
        server = request.getfixturevalue("gcs_server")
        root = request.getfixturevalue("gcs_root")
        yield Backend(kind, f"gs://{root}", dict(server.storage_options), server.filesystem(), root)


def _ckpt(b: Backend, **kwargs: Any) -> rk.Checkpointer:
    return rk.Checkpointer(b.url, storage_options=b.options, **kwargs)


def _uncommit(b: Backend, step: int) -> None:
    """Turn a committed step into what a writer killed before its manifest leaves: data, no manifest."""
    b.rm(b.path(step, MANIFEST))


def test_round_trip_is_bitwise(backend: Backend) -> None:
    ckpt = _ckpt(backend)
    state = make_state(1)
    expected = snapshot(state)
    info = ckpt.save(state, step=3)
    assert info.step == 3 and info.nbytes > 0
    assert info.url.endswith(step_dir(3))

    target = make_state(2)  # different values everywhere, so a no-op restore cannot pass
    with pytest.raises(AssertionError):
        assert_restored(expected, target)
    result = _ckpt(backend).restore(target)
    assert result is not None and result.step == 3 and result.skipped == ()
    assert_restored(expected, target)


def test_nothing_is_visible_before_the_manifest(backend: Backend) -> None:
    ckpt = _ckpt(backend)
    first = make_state(1)
    ckpt.save(first, step=1)
    observer = _ckpt(backend)  # another process's view: a fresh Checkpointer on the same root
    seen: dict[str, Any] = {}

    def before_commit(stage: Any, manifest: bytes) -> None:
        # Every data file of step 2 is durable now; only the manifest is missing.
        listed = json.loads(manifest)["files"]
        safetensors = [f for f in backend.files() if f.endswith("model.safetensors")]
        seen["data_written"] = len(safetensors) == 2 and len(listed) >= 4
        seen["steps"] = observer.steps()
        seen["latest"] = observer.latest_step()
        probe = make_state(9)
        result = observer.restore(probe)
        seen["restored"] = result.step if result is not None else None
        seen["step2_manifest"] = backend.exists(backend.path(2, MANIFEST))

    hooked = rk.Checkpointer(
        backend.url, storage=HookedStorage(open_storage(backend.url, backend.options), before_commit)
    )
    hooked.save(make_state(2), step=2)
    assert seen == {
        "data_written": True,
        "steps": [1],
        "latest": 1,
        "restored": 1,
        "step2_manifest": False,
    }
    assert observer.steps() == [1, 2] and observer.latest_step() == 2


def test_newest_valid_checkpoint_is_discovered(backend: Backend) -> None:
    ckpt = _ckpt(backend)
    expected = {}
    for step in (7, 12, 100, 250):  # 100 > 12 > 7 numerically, not as unpadded strings
        state = make_state(step)
        expected[step] = snapshot(state)
        ckpt.save(state, step=step)
    _uncommit(backend, 250)  # a save killed before its manifest: silently not a checkpoint
    backend.write(backend.path(300, MANIFEST), b"{ this is not a manifest")  # a damaged commit point

    assert ckpt.steps() == [7, 12, 100, 300]
    target = make_state(0)
    with pytest.warns(UserWarning, match=r"step 300 .*failed verification") as warned:
        result = ckpt.restore(target)
    assert not any("step 250" in str(w.message) for w in warned)
    assert result is not None and result.step == 100
    assert [s for s, _why in result.skipped] == [300]
    assert_restored(expected[100], target)

    exact = make_state(0)
    result = ckpt.restore(exact, step=12)
    assert result is not None and result.step == 12
    assert_restored(expected[12], exact)


def test_retention_keeps_last_and_milestones_and_deletes_manifest_first(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_deletions: list[tuple[str, bool]] = []  # (folder, its manifest still existed)

    def manifest_exists(folder: str) -> bool:
        return backend.exists(f"{folder.rstrip('/')}/{MANIFEST}")

    storage = open_storage(backend.url, backend.options)
    if backend.object_store:
        real_fs = storage.fs  # type: ignore[attr-defined]

        class RecordingFS:
            def __getattr__(self, name: str) -> Any:
                return getattr(real_fs, name)

            def rm(self, path: str, recursive: bool = False, **kw: Any) -> Any:
                if recursive and str(path).rstrip("/").rsplit("/", 1)[-1].startswith("step-"):
                    data_deletions.append((str(path), manifest_exists(str(path))))
                return real_fs.rm(path, recursive=recursive, **kw)

        storage.fs = RecordingFS()  # type: ignore[attr-defined]
    else:
        real_rmtree = shutil.rmtree

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            data_deletions.append((str(path), manifest_exists(str(path))))
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(shutil, "rmtree", rmtree)
    ckpt = rk.Checkpointer(backend.url, keep_last=2, keep_every=3, storage=storage)

    last = None
    for step in range(1, 7):
        last = make_state(step)
        expected = snapshot(last)
        ckpt.save(last, step=step)
    monkeypatch.undo()

    assert ckpt.steps() == [3, 5, 6]  # the last two, and the milestone 3 (6 is both)
    for gone in (1, 2, 4):
        assert backend.files(gone) == [], f"step {gone} left data behind"
    deleted = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p, _ in data_deletions)
    assert deleted == [step_dir(s) for s in (1, 2, 4)]
    # The invariant: whenever data of a step were being deleted, its manifest was already gone,
    # so no reader could ever see a committed step with missing files.
    assert [present for _, present in data_deletions] == [False] * 3
    target = make_state(0)
    result = ckpt.restore(target)
    assert result is not None and result.step == 6
    assert_restored(expected, target)


def test_damaged_data_objects_are_named_and_skipped(backend: Backend) -> None:
    ckpt = _ckpt(backend)
    oldest = make_state(1)
    expected = snapshot(oldest)
    for step, state in ((1, oldest), (2, make_state(2)), (3, make_state(3))):
        ckpt.save(state, step=step)
    damaged = {}
    for step, damage, why in ((2, "flip", "crc32c"), (3, "truncate", "manifest says")):
        (victim,) = backend.glob(step, "*model.safetensors")
        data = bytearray(backend.read(victim))
        if damage == "flip":
            data[len(data) // 2] ^= 0x01  # one bit, inside the tensor bytes
        else:
            del data[len(data) // 2 :]
        backend.write(victim, bytes(data))
        damaged[step] = (victim.split(step_dir(step) + "/", 1)[1], why)

    target = make_state(0)
    with pytest.warns(UserWarning, match=r"failed verification") as warned:
        result = _ckpt(backend).restore(target)
    messages = [str(w.message) for w in warned]
    for step, (relpath, why) in damaged.items():
        # Each warning names the step, the object and what was wrong with it.
        assert any(f"step {step} " in m and relpath in m and why in m for m in messages), messages
    assert result is not None and result.step == 1
    assert [s for s, _ in result.skipped] == [3, 2]
    assert_restored(expected, target)
    with pytest.raises(rk.ResumeKitError, match="failed verification"):
        ckpt.restore(make_state(0), step=2)


def test_cleanup_removes_debris_only_after_its_grace_period(backend: Backend) -> None:
    patient = _ckpt(backend, orphan_grace_seconds=3600)
    states = {s: make_state(s) for s in (1, 2, 3, 4)}
    expected = {s: snapshot(st) for s, st in states.items()}
    patient.save(states[1], step=1)
    patient.save(states[2], step=2)
    _uncommit(backend, 2)  # a killed save: data, no manifest
    # Plus the other kind of debris each backend can have: on object stores the data folder of a
    # writer that lost the commit race for step 3 (written before the winner committed), locally
    # an unfinished staging folder.
    if backend.object_store:
        stray = backend.path(3, "w-0123456789abcdef/model.json")
    else:
        stray = f"{backend.root}/.tmp-{step_dir(9)}-0123456789abcdef/model.json"
    backend.write(stray, b"{}")
    debris_before = backend.files(2)
    assert debris_before

    patient.save(states[3], step=3)  # retention runs: everything is younger than an hour
    assert backend.files(2) == debris_before
    assert backend.exists(stray)
    assert patient.steps() == [1, 3]

    eager = _ckpt(backend, orphan_grace_seconds=0)
    eager.save(states[4], step=4)
    assert backend.files(2) == []
    assert not backend.exists(stray)
    assert eager.steps() == [1, 3, 4]
    for step in (1, 3):  # committed checkpoints are untouched by cleanup
        target = make_state(0)
        result = eager.restore(target, step=step)
        assert result is not None and result.skipped == ()
        assert_restored(expected[step], target)


def test_cleanup_sees_debris_written_after_an_earlier_cleanup(backend: Backend) -> None:
    # s3fs/gcsfs cache listings: a step folder listed by an earlier cleanup must be listed afresh.
    ckpt = _ckpt(backend, orphan_grace_seconds=0)
    ckpt.save(make_state(1), step=1)  # its retention lists step 1's folder
    # Another process's debris appears in step 1 afterwards (a loser whose abort was killed).
    if backend.object_store:
        stray = backend.path(1, "w-0123456789abcdef/model.json")
    else:
        stray = f"{backend.root}/.tmp-{step_dir(1)}-0123456789abcdef/model.json"
    backend.write(stray, b"{}")
    ckpt.save(make_state(2), step=2)
    assert not backend.exists(stray)
    assert ckpt.steps() == [1, 2]
