"""Hostile input on object stores (issue 17, items 3 and 7): sizes a manifest declares are compared with
the object's real size before any memory is allocated, and a store that is gone raises resumekit's
StorageError, never the client's own exception classes.

``memory://`` takes the same code path as ``s3://`` (fsspec, whole-file fetches); moto covers the async
path (s3fs) and the unreachable endpoint.
"""

from __future__ import annotations

import json
import socket
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

import resumekit as rk
import resumekit.storage.remote as storage_mod
from resumekit.errors import CheckpointCorruptError, StorageError, UnsafeCheckpointError
from resumekit.format.manifest import seal
from resumekit.storage.remote import FsspecStorage
from resumekit.testing.strategies import assert_identical

try:
    from .fault_proxy import Fault, FaultProxy
    from .servers import S3Endpoint, fast_retry_s3_options
except ImportError:
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import S3Endpoint, fast_retry_s3_options  # type: ignore[no-redef]

TIB = 1 << 40


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


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every size the storage layer asks the allocator for (the real allocator still runs)."""
    sizes: list[int] = []
    real = storage_mod.new_buffer

    def recording(size: int) -> Any:
        sizes.append(size)
        return real(size)

    monkeypatch.setattr(storage_mod, "new_buffer", recording)
    return sizes


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://hostile-{uuid.uuid4().hex[:10]}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _inflate(fs: Any, manifest_path: str, name: str, size: int) -> int:
    """Declare ``size`` bytes for the file ending in ``name`` and reseal (as any hostile writer can)."""
    d = json.loads(fs.cat_file(manifest_path))
    (rel,) = [p for p in d["files"] if p.endswith(name)]
    real = int(d["files"][rel]["size"])
    d["files"][rel]["size"] = size
    fs.pipe_file(manifest_path, seal(d))
    return real


def _max_real_size(fs: Any, root: str) -> int:
    return max(int(i["size"]) for i in fs.find(root, detail=True).values())


@pytest.mark.parametrize("name", ["model.safetensors", "meta.json"])
def test_declared_size_is_checked_before_allocation_memory(
    memory_root: str, allocations: list[int], name: str
) -> None:
    ckpt = rk.Checkpointer(memory_root)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    fs = fsspec.filesystem("memory")
    root = memory_root[len("memory://") :]
    _inflate(fs, f"{root}/step-000000000002/manifest.json", name, 64 * TIB)

    with pytest.warns(UserWarning, match=rf"step 2 .*{name}.* is \d+ bytes, the manifest says {64 * TIB}"):
        result = ckpt.restore(t := _target())
    assert result.step == 1
    _assert_state(t, 1)
    assert allocations and max(allocations) <= _max_real_size(fs, root)


def test_read_file_checks_the_real_size_before_allocating(memory_root: str, allocations: list[int]) -> None:
    ckpt = rk.Checkpointer(memory_root)
    ckpt.save(_state(1), step=1)
    storage = FsspecStorage(memory_root)
    fs = fsspec.filesystem("memory")
    root = memory_root[len("memory://") :]
    (rel,) = [
        p
        for p in json.loads(fs.cat_file(f"{root}/step-000000000001/manifest.json"))["files"]
        if p.endswith("model.json")
    ]
    with pytest.raises(CheckpointCorruptError, match="the manifest says"):
        storage.read_file(1, rel, 64 * TIB)
    with pytest.raises(CheckpointCorruptError, match="missing"):
        storage.read_file(1, "w-0000000000000000/nope.json", 12)
    assert allocations == []


def test_oversized_manifest_object_is_refused_without_reading_it_whole(memory_root: str) -> None:
    from resumekit.format.manifest import MAX_MANIFEST_BYTES

    ckpt = rk.Checkpointer(memory_root)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    fs = fsspec.filesystem("memory")
    root = memory_root[len("memory://") :]
    fs.pipe_file(f"{root}/step-000000000002/manifest.json", b" " * (MAX_MANIFEST_BYTES + 10))
    with pytest.raises(UnsafeCheckpointError, match="over the"):
        FsspecStorage(memory_root).read_manifest(2)
    assert ckpt.steps() == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.restore(_target()).step == 1


@pytest.mark.s3
def test_declared_size_is_checked_before_allocation_s3(
    s3_server: S3Endpoint, s3_root: str, allocations: list[int]
) -> None:
    ckpt = rk.Checkpointer(f"s3://{s3_root}", storage_options=s3_server.storage_options)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    fs = s3_server.filesystem()
    _inflate(fs, f"{s3_root}/step-000000000002/manifest.json", "model.safetensors", 64 * TIB)
    fs.invalidate_cache()
    with pytest.warns(UserWarning, match=rf"model.safetensors.* the manifest says {64 * TIB}"):
        result = ckpt.restore(t := _target())
    assert result.step == 1
    _assert_state(t, 1)
    assert allocations and max(allocations) <= _max_real_size(fs, s3_root)


# -- item 7: the store is gone ---------------------------------------------------------------------


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on exit: nothing listens there


_CLIENT_ERRORS = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ClientOSError",
    "ServerDisconnectedError",
}


def _chain(exc: BaseException) -> list[str]:
    names, e = [], exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    return names


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_unreachable_endpoint_raises_storage_error(s3_server: S3Endpoint) -> None:
    url = f"http://127.0.0.1:{_dead_port()}"
    options = fast_retry_s3_options(url, attempts=1)
    ckpt = rk.Checkpointer(f"s3://{s3_server.bucket}/gone", storage_options=options)
    for call in (lambda: ckpt.save(_state(1), step=1), lambda: ckpt.restore(_target()), ckpt.steps):
        with pytest.raises(StorageError) as info:
            call()
        assert "EndpointConnectionError" in _chain(info.value), _chain(info.value)


@pytest.mark.s3
@pytest.mark.timeout(90)
@pytest.mark.parametrize("gone_from", ["commit", "start"])
def test_server_gone_during_a_save_raises_storage_error(
    s3_server: S3Endpoint, s3_root: str, fault_proxy: FaultProxy, gone_from: str
) -> None:
    options = fast_retry_s3_options(fault_proxy.url, attempts=1)
    ckpt = rk.Checkpointer(f"s3://{s3_root}", storage_options=options)
    ckpt.save(_state(1), step=1)
    # Every connection is cut from the commit on (the data objects made it), or from the first request.
    fault_proxy.add(
        Fault("reset_before", path=r"manifest\.json" if gone_from == "commit" else "", count=None)
    )
    with pytest.raises(StorageError) as info:
        ckpt.save(_state(2), step=2)
    assert any(n in _CLIENT_ERRORS for n in _chain(info.value)), _chain(info.value)
    fault_proxy.add(Fault("reset_before", count=None))
    with pytest.raises(StorageError):
        ckpt.restore(_target())
    with pytest.raises(StorageError):
        ckpt.steps()
    # Nothing was lost: step 1 is intact and alone on the real server.
    direct = rk.Checkpointer(f"s3://{s3_root}", storage_options=s3_server.storage_options)
    assert direct.steps() == [1]
    t = _target()
    assert direct.restore(t).step == 1
    _assert_state(t, 1)


def test_client_exception_classes_become_storage_error() -> None:
    from resumekit.storage.retry import storage_boundary, to_storage_error

    class EndpointConnectionError(Exception):  # botocore's, by name and module
        __module__ = "botocore.exceptions"

    with pytest.raises(StorageError) as info, storage_boundary("reading 's3://b/k'"):
        raise EndpointConnectionError("Could not connect")
    assert isinstance(info.value.__cause__, EndpointConnectionError)
    assert "reading 's3://b/k'" in str(info.value)
    # Programming errors and resumekit's own errors pass unchanged.
    bug = TypeError("bug")
    assert to_storage_error(bug, "x") is bug
    corrupt = CheckpointCorruptError("bad")
    assert to_storage_error(corrupt, "x") is corrupt
    perm = PermissionError(13, "denied")
    mapped = to_storage_error(perm, "x")
    assert isinstance(mapped, StorageError) and mapped.errno == 13
