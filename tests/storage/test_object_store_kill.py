"""SIGKILL of a writer process saving to S3 (moto in its own process, so it outlives the writer).

Two places to die: after every data object is stored but before the manifest PUT, and in the middle
of a multipart upload (some parts sent, the upload never completed). Either way the step must be
invisible, the resumed run's next save (of the same step) must succeed, and cleanup with a grace
period of 0 must remove the debris and abort the abandoned upload, while a young one is left alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import resumekit as rk

try:
    from ._backends import assert_restored, snapshot, step_dir
    from .fault_proxy import Fault, FaultProxy
    from .servers import S3Endpoint, moto_s3_server, unique_prefix
except ImportError:
    from _backends import assert_restored, snapshot, step_dir  # type: ignore[no-redef]
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import S3Endpoint, moto_s3_server, unique_prefix  # type: ignore[no-redef]

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# The writer: a plain training-state save with one hook for where to die. The hooks patch resumekit's
# private module attributes in the child only; the parent sees the store exactly as a user would.
_WRITER = textwrap.dedent(
    """
    import functools, json, os, signal, sys
    import torch
    import resumekit as rk
    import resumekit.storage.objectstore as cloud
    import resumekit.storage.transfer as transfer

    url, options, step, mode, numel = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    if mode == "before-manifest":
        real_put = cloud.put_if_absent

        def put_if_absent(fs, path, data, **kw):
            if path.endswith("/manifest.json"):
                print("data durable, dying before the manifest", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_put(fs, path, data, **kw)

        cloud.put_if_absent = put_if_absent
    elif mode == "multipart":
        # S3's minimum part size, one part in flight: the parent kills after the first part lands.
        transfer.open_upload = functools.partial(transfer.open_upload, part_size=5 << 20, max_concurrency=1)
    g = torch.Generator().manual_seed(step)
    state = {"model": {"w": torch.randn(numel, generator=g)}, "meta": {"step": step}}
    rk.Checkpointer(url, storage_options=options).save(state, step=step)
    print("committed", flush=True)
    """
)


@pytest.fixture(scope="module")
def moto_process() -> Iterator[S3Endpoint]:
    """moto's S3 server in its own process: it keeps serving whatever happens to a writer."""
    with moto_s3_server(subprocess=True) as endpoint:
        yield endpoint


def _state(step: int, numel: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(numel, generator=g)}, "meta": {"step": step}}


def _spawn(tmp_path: Path, url: str, options: dict[str, Any], step: int, mode: str, numel: int) -> Any:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), url, json.dumps(options), str(step), mode, str(numel)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _uploads(fs: Any, root: str) -> list[dict[str, Any]]:
    bucket, prefix, _ = fs.split_path(root + "/")
    uploads: list[dict[str, Any]] = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get(
        "Uploads", []
    )
    return uploads


def _writer_folders(fs: Any, root: str, step: int) -> list[str]:
    fs.invalidate_cache()
    try:
        names = fs.ls(f"{root}/{step_dir(step)}", detail=False)
    except FileNotFoundError:
        return []
    return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names if re.search(r"/w-[0-9a-f]{16}/?$", n))


def _resume_and_clean(
    server: S3Endpoint, root: str, killed_step: int, numel: int, debris_writer: str, expect_upload: bool
) -> None:
    """The checks shared by both kills: invisible, next save succeeds, grace 0 cleans everything."""
    url, fs = f"s3://{root}", server.filesystem()
    resumed = rk.Checkpointer(url, storage_options=server.storage_options)  # default grace: one hour
    assert resumed.steps() == [killed_step - 1]
    target = _state(0, numel)
    result = resumed.restore(target)
    assert result is not None and result.step == killed_step - 1 and result.skipped == ()
    assert_restored(snapshot(_state(killed_step - 1, numel)), target)

    again = _state(killed_step, numel)
    expected = snapshot(again)
    resumed.save(again, step=killed_step)  # the resumed run saves the same step again: it commits
    assert resumed.steps() == [killed_step - 1, killed_step]
    folders = _writer_folders(fs, root, killed_step)
    assert debris_writer in folders and len(folders) == 2  # the killed writer's debris is young: kept
    assert len(_uploads(fs, root)) == (1 if expect_upload else 0)

    eager = rk.Checkpointer(url, storage_options=server.storage_options, orphan_grace_seconds=0)
    eager.save(_state(killed_step + 1, numel), step=killed_step + 1)
    assert debris_writer not in _writer_folders(fs, root, killed_step)
    assert len(_writer_folders(fs, root, killed_step)) == 1
    assert _uploads(fs, root) == []  # the abandoned multipart upload was aborted
    target = _state(0, numel)
    result = eager.restore(target, step=killed_step)
    assert result is not None and result.skipped == ()
    assert_restored(expected, target)


def test_sigkill_between_data_and_manifest(moto_process: S3Endpoint, tmp_path: Path) -> None:
    server, numel = moto_process, 1000
    root = f"{server.bucket}/{unique_prefix('kill-manifest')}"
    rk.Checkpointer(f"s3://{root}", storage_options=server.storage_options).save(_state(1, numel), step=1)

    proc = _spawn(tmp_path, f"s3://{root}", server.storage_options, 2, "before-manifest", numel)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "dying before the manifest" in out and "committed" not in out

    fs = server.filesystem()
    (debris,) = _writer_folders(fs, root, 2)
    stored = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/{step_dir(2)}"))
    assert stored == ["meta.json", "model.json", "model.safetensors"]  # every data object, no manifest
    _resume_and_clean(server, root, 2, numel, debris, expect_upload=False)


def test_sigkill_in_the_middle_of_a_multipart_upload(moto_process: S3Endpoint, tmp_path: Path) -> None:
    server = moto_process
    numel = 3 * 5 * MiB // 4  # float32: three 5 MiB parts
    root = f"{server.bucket}/{unique_prefix('kill-multipart')}"
    rk.Checkpointer(f"s3://{root}", storage_options=server.storage_options).save(_state(1, numel), step=1)

    with FaultProxy(server.endpoint_url) as proxy:
        # Later parts are held back a little, so the writer cannot finish before it is killed.
        held = proxy.add(Fault("delay", method="PUT", path=r"[?&]partNumber=[2-9]", delay=2.0, count=None))
        options = {**server.storage_options, "endpoint_url": proxy.url}
        proc = _spawn(tmp_path, f"s3://{root}", options, 2, "multipart", numel)
        deadline = time.monotonic() + 120
        while proxy.count("PUT", r"[?&]partNumber=1(&|$)") == 0:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the writer never sent its first part"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        # Parts already at the proxy are still forwarded (as in a real network); wait for them.
        while proxy.count("PUT", r"partNumber=") < 1 + held.hits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.count("POST", r"uploadId=") == 0  # the upload was never completed

    fs = server.filesystem()
    (upload,) = _uploads(fs, root)
    match = re.search(rf"/{step_dir(2)}/(w-[0-9a-f]{{16}})/model\.safetensors$", upload["Key"])
    assert match is not None, upload["Key"]
    debris = match.group(1)
    assert not fs.exists(f"{root}/{step_dir(2)}/{debris}/model.safetensors")  # never visible
    _resume_and_clean(server, root, 2, numel, debris, expect_upload=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_after_every_request_of_a_save_never_shows_a_torn_step(
    moto_process: S3Endpoint, tmp_path: Path
) -> None:
    """A writer killed after each request of a save in turn (the existence check, each data object, the
    manifest, retention): the step is either absent or restores exactly, and the previous step always
    restores exactly. (A kill inside a multipart upload: the test above.)"""
    server = moto_process
    numel = 1000
    root = f"{server.bucket}/{unique_prefix('kill-every')}"
    url = f"s3://{root}"
    rk.Checkpointer(url, storage_options=server.storage_options).save(_state(1, numel), step=1)
    expected = {1: snapshot(_state(1, numel)), 2: snapshot(_state(2, numel))}

    def kill_after(requests: int | None) -> tuple[int, int]:
        """Run the step-2 save of a fresh root copy's writer; SIGKILL it once ``requests`` reached the
        store (None: let it finish). Returns (requests seen, exit code)."""
        with FaultProxy(server.endpoint_url) as proxy:
            options = {**server.storage_options, "endpoint_url": proxy.url}
            proc = _spawn(tmp_path, url, options, 2, "plain", numel)
            deadline = time.monotonic() + 180
            while requests is not None and proxy.count() < requests and proc.poll() is None:
                assert time.monotonic() < deadline, "the writer stalled"
                time.sleep(0.005)
            if requests is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=180)
            return proxy.count(), proc.returncode

    fs = server.filesystem()
    total, code = kill_after(None)
    assert code == 0 and total >= 5, total
    outcomes = []
    for k in range(1, total + 1):
        # Each try starts from step 1 alone: remove step 2 (and any debris) by deleting its prefix.
        fs.invalidate_cache()
        if fs.exists(f"{root}/{step_dir(2)}"):
            fs.rm(f"{root}/{step_dir(2)}", recursive=True)
        for upload in _uploads(fs, root):
            bucket = root.split("/", 1)[0]
            fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        _, code = kill_after(k)
        ckpt = rk.Checkpointer(url, storage_options=server.storage_options)
        steps = ckpt.steps()
        assert steps in ([1], [1, 2]), (k, steps)
        outcomes.append((k, code, steps[-1]))
        for s in steps:
            target = _state(0, numel)
            result = ckpt.restore(target, step=s)
            assert result is not None and result.step == s
            assert_restored(expected[s], target)
    killed = [o for o in outcomes if o[1] == -signal.SIGKILL]
    assert len(killed) >= total // 2, outcomes  # most tries really died inside the save
    assert any(step == 1 for _, _, step in killed), outcomes  # some kill landed before the commit
