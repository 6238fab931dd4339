"""resumekit.storage.objectstore / resumekit.storage.transfer against real servers on loopback (moto, GCS emulator).

Faults come from the fault proxy; nothing is mocked. A few pure tests (retry classification,
memory://) run without any server.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import crc32c
import fsspec
import pytest

from resumekit.errors import CheckpointCorruptError, CommitConflictError, StorageError
from resumekit.storage.objectstore import (
    abort_stale_uploads,
    find_orphans,
    put_if_absent,
    require_backend,
    s3_default_options,
    single_retry_layer,
)
from resumekit.storage.retry import RetryPolicy, is_transient, retry_call
from resumekit.storage.transfer import S3ParallelWriter, download_into, download_many, open_upload

try:
    from .fault_proxy import Fault, FaultProxy
    from .servers import GCSEndpoint, S3Endpoint, fast_retry_s3_options
except ImportError:
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import GCSEndpoint, S3Endpoint, fast_retry_s3_options  # type: ignore[no-redef]

MiB = 1 << 20


def _manifest(writer: str) -> bytes:
    return json.dumps({"writer_id": writer, "files": {}}).encode()


def _payload(n: int) -> bytes:
    # Not periodic with any part size, so a misplaced range would change the checksum.
    return (uuid.uuid4().bytes * (n // 16 + 1))[:n]


def _proxied_fs(proxy: FaultProxy, attempts: int = 3) -> Any:
    """s3fs through the proxy, with botocore's as the only request-level retry layer."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **fast_retry_s3_options(proxy.url, attempts=attempts))
    single_retry_layer(fs)
    return fs


# -- pure: retry classification and the retry loop ----------------------------------------------------


class _FakeClientError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def test_is_transient_classifies_by_status_code_type_and_cause() -> None:
    assert is_transient(_FakeClientError(503, "SlowDown"))
    assert is_transient(_FakeClientError(500, "InternalError"))
    assert not is_transient(_FakeClientError(403, "AccessDenied"))
    assert not is_transient(_FakeClientError(412, "PreconditionFailed"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    wrapped = OSError(16, "busy")  # what s3fs raises, with the botocore error as cause
    wrapped.__cause__ = _FakeClientError(503, "SlowDown")
    assert is_transient(wrapped)
    exists = FileExistsError("x")
    exists.__cause__ = ConnectionResetError()
    assert not is_transient(exists)  # an answer was received: the precondition failed
    assert not is_transient(CommitConflictError("another writer"))


def test_retry_call_retries_transient_then_succeeds_with_bounded_sleeps() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    policy = RetryPolicy(attempts=3, base_delay=0.5, max_delay=0.75)
    assert retry_call(flaky, what="op", policy=policy, sleep=sleeps.append) == "ok"
    assert len(calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 0.75


def test_retry_call_persistent_transient_ends_in_storage_error_with_cause() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError("refused")

    with pytest.raises(StorageError) as info:
        retry_call(down, what="reading 's3://b/k'", policy=RetryPolicy(attempts=4), sleep=lambda s: None)
    assert len(calls) == 4
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert "reading 's3://b/k'" in str(info.value) and "4 attempt" in str(info.value)


def test_retry_call_does_not_retry_permanent_errors() -> None:
    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("k")

    with pytest.raises(FileNotFoundError):
        retry_call(missing, what="op", sleep=lambda s: None)
    assert len(calls) == 1


def test_s3_default_options_sit_under_the_users_own() -> None:
    opts = s3_default_options({"endpoint_url": "http://x", "config_kwargs": {"read_timeout": 7}}, attempts=3)
    assert opts["endpoint_url"] == "http://x"
    assert opts["config_kwargs"]["read_timeout"] == 7  # the user's value wins
    assert opts["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 3}
    require_backend("s3://bucket/run")  # installed here: no error
    require_backend("memory://run")  # not an optional backend: nothing to check


# -- memory:// (best effort) ---------------------------------------------------------------------------


def test_put_if_absent_memory_best_effort() -> None:
    fs = fsspec.filesystem("memory")
    path = f"/rk-{uuid.uuid4().hex}/step-000000000001/manifest.json"
    put_if_absent(fs, path, _manifest("a"))
    put_if_absent(fs, path, _manifest("a"))  # same bytes: a retried commit of our own, success
    with pytest.raises(CommitConflictError, match="another writer"):
        put_if_absent(fs, path, _manifest("b"))
    assert fs.cat_file(path) == _manifest("a")


class _OldBotocoreS3:
    """An s3fs whose botocore predates conditional writes: PutObject rejects IfNoneMatch."""

    protocol = ("s3", "s3a")

    def _call_s3(self, *args: Any, **kwargs: Any) -> None:  # only marks this as an s3fs
        raise NotImplementedError

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def call_s3(self, method: str, **kwargs: Any) -> None:
        # botocore's ParamValidationError text for a parameter its service model lacks
        raise ValueError(
            'Parameter validation failed:\nUnknown parameter in input: "IfNoneMatch", must be one of: ...'
        )


def test_put_if_absent_on_a_botocore_without_conditional_writes_says_what_to_upgrade() -> None:
    with pytest.raises(
        StorageError, match=r"(?s)botocore >= 1\.35\.20.*Nothing was committed.*resumekit\[s3\]"
    ):
        put_if_absent(_OldBotocoreS3(), "bucket/run/step-000000000001/manifest.json", b"{}")


def test_find_orphans_memory() -> None:
    fs = fsspec.filesystem("memory")
    root = f"/rk-{uuid.uuid4().hex}"
    fs.pipe_file(f"{root}/step-000000000001/w-a/model.safetensors", b"x")  # no manifest
    fs.pipe_file(f"{root}/step-000000000002/w-a/model.safetensors", b"x")
    fs.pipe_file(
        f"{root}/step-000000000002/manifest.json",
        json.dumps({"files": {"w-a/model.safetensors": [1, "0"]}}).encode(),
    )
    fs.pipe_file(f"{root}/notes.txt", b"not a step")
    assert find_orphans(fs, root, 3600) == []  # everything is young
    later = time.time() + 7200
    assert find_orphans(fs, root, 3600, now=later) == [f"{root}/step-000000000001"]


# -- S3 (moto) ------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_put_if_absent_is_create_only(s3_fs: Any, s3_root: str) -> None:
    path = f"{s3_root}/step-000000000001/manifest.json"
    put_if_absent(s3_fs, path, _manifest("a"))
    with pytest.raises(CommitConflictError) as info:
        put_if_absent(s3_fs, path, _manifest("b"))
    assert "writer a" in str(info.value) and "writer b" in str(info.value)
    assert s3_fs.cat_file(path) == _manifest("a")  # moto honours If-None-Match: the loser changed nothing


@pytest.mark.s3
def test_s3_lost_commit_response_resolves_to_exactly_one_commit(
    fault_proxy: FaultProxy, s3_root: str
) -> None:
    fs = _proxied_fs(fault_proxy)
    path = f"{s3_root}/step-000000000001/manifest.json"
    fault_proxy.add(Fault("reset_after", method="PUT", path=r"manifest\.json$"))
    put_if_absent(fs, path, _manifest("a"))  # stored, answer lost, retry gets 412, read-back matches
    statuses = [r.status for r in fault_proxy.log if r.method == "PUT"]
    assert statuses == [None, 412]
    assert fs.cat_file(path) == _manifest("a")
    with pytest.raises(CommitConflictError):
        put_if_absent(fs, path, _manifest("b"))


@pytest.mark.s3
def test_s3_transient_503_inside_budget_succeeds(fault_proxy: FaultProxy, s3_root: str) -> None:
    fs = _proxied_fs(fault_proxy, attempts=3)
    fault_proxy.add(Fault("status", method="PUT", path=r"manifest\.json$", status=503, count=2))
    put_if_absent(fs, f"{s3_root}/manifest.json", _manifest("a"))
    assert fault_proxy.count("PUT", r"manifest\.json$") == 3
    assert fs.cat_file(f"{s3_root}/manifest.json") == _manifest("a")


@pytest.mark.s3
def test_s3_persistent_fault_is_a_storage_error_after_one_retry_layer(
    fault_proxy: FaultProxy, s3_root: str
) -> None:
    fs = _proxied_fs(fault_proxy, attempts=3)
    fault_proxy.add(Fault("status", method="PUT", status=500, count=None))
    with pytest.raises(StorageError) as info:
        put_if_absent(fs, f"{s3_root}/manifest.json", _manifest("a"))
    assert info.value.__cause__ is not None
    assert fault_proxy.count("PUT") == 3  # botocore's 3 attempts, not multiplied by s3fs or resumekit
    fault_proxy.clear()
    assert not fs.exists(f"{s3_root}/manifest.json")


@pytest.mark.s3
def test_s3_parallel_writer_multipart_round_trip(s3_fs: Any, s3_root: str) -> None:
    data = _payload(2 * 5 * MiB + 12345)
    path = f"{s3_root}/w-a/model.safetensors"
    with S3ParallelWriter(s3_fs, path, part_size=5 * MiB, max_concurrency=2) as f:
        view = memoryview(data)
        for i in range(0, len(data), 3 * MiB + 7):  # chunk sizes unrelated to the part size
            f.write(view[i : i + 3 * MiB + 7])
    assert f.size == len(data) and f.crc32c == crc32c.crc32c(data)
    assert s3_fs.cat_file(path) == data
    bucket, key, _ = s3_fs.split_path(path)
    assert s3_fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []


@pytest.mark.s3
def test_s3_parallel_writer_uploads_parts_concurrently(fault_proxy: FaultProxy, s3_root: str) -> None:
    fs = _proxied_fs(fault_proxy)
    fault_proxy.add(Fault("delay", method="PUT", path=r"partNumber=", delay=0.4, count=None))
    data = _payload(3 * 5 * MiB)
    with S3ParallelWriter(fs, f"{s3_root}/big", part_size=5 * MiB, max_concurrency=3) as f:
        f.write(data)
    assert fault_proxy.count("PUT", r"partNumber=") == 3
    # Each part is held 0.4 s at the proxy; parts sent one after another would never overlap.
    assert fault_proxy.max_concurrency("PUT", r"partNumber=") >= 2
    assert fs.cat_file(f"{s3_root}/big") == data


@pytest.mark.s3
def test_s3_parallel_writer_aborts_on_error_and_leaves_nothing(s3_fs: Any, s3_root: str) -> None:
    path = f"{s3_root}/w-a/model.safetensors"
    with pytest.raises(RuntimeError, match="killed"), S3ParallelWriter(s3_fs, path, part_size=5 * MiB) as f:
        f.write(_payload(11 * MiB))  # two parts already sent
        raise RuntimeError("killed mid-file")
    assert not s3_fs.exists(path)
    bucket, key, _ = s3_fs.split_path(path)
    assert s3_fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []


@pytest.mark.s3
def test_s3_download_into_parallel_ranges_with_crc(s3_fs: Any, s3_root: str) -> None:
    data = _payload(4 * MiB + 3)
    s3_fs.pipe_file(f"{s3_root}/f", data)
    out = bytearray(len(data))
    got = download_into(s3_fs, f"{s3_root}/f", len(data), out, part_size=1 * MiB, max_concurrency=4)
    assert got.buffer is out and out == data
    assert got.crc32c == crc32c.crc32c(data)


@pytest.mark.s3
def test_s3_download_many_shares_one_budget_across_files(fault_proxy: FaultProxy, s3_root: str) -> None:
    fs = _proxied_fs(fault_proxy)
    datas = [_payload(2 * MiB + i) for i in range(3)]  # 2 ranges each (the tiny tail joins the second)
    for i, d in enumerate(datas):
        fs.pipe_file(f"{s3_root}/m{i}", d)
    fault_proxy.add(Fault("delay", method="GET", path=r"/m\d", delay=0.3, count=None))
    outs = [bytearray(len(d)) for d in datas]
    futures = download_many(
        fs,
        [(f"{s3_root}/m{i}", len(d), o) for i, (d, o) in enumerate(zip(datas, outs))],
        part_size=1 * MiB,
        max_concurrency=4,
    )
    got = [f.result(timeout=60) for f in futures]
    assert outs == datas and [g.crc32c for g in got] == [crc32c.crc32c(d) for d in datas]
    assert fault_proxy.count("GET", r"/m\d") == 6
    # 6 ranges held 0.3 s each: per-file budgets or files one after another would stay at <= 2 at once.
    assert 3 <= fault_proxy.max_concurrency("GET", r"/m\d") <= 4


@pytest.mark.s3
def test_s3_download_many_reports_a_missing_object_as_corruption(s3_fs: Any, s3_root: str) -> None:
    s3_fs.pipe_file(f"{s3_root}/present", b"x" * 10)
    futures = download_many(
        s3_fs, [(f"{s3_root}/present", 10, bytearray(10)), (f"{s3_root}/absent", 10, bytearray(10))]
    )
    assert bytes(futures[0].result(timeout=60).buffer) == b"x" * 10
    with pytest.raises(CheckpointCorruptError, match=r"absent.*missing"):
        futures[1].result(timeout=60)


@pytest.mark.s3
def test_s3_download_truncated_body_is_retried(fault_proxy: FaultProxy, s3_root: str) -> None:
    fs = _proxied_fs(fault_proxy)
    data = _payload(3 * MiB)
    fs.pipe_file(f"{s3_root}/f", data)
    fault_proxy.add(Fault("truncate", method="GET", path=r"/f$", count=1))
    got = download_into(fs, f"{s3_root}/f", len(data), part_size=1 * MiB, policy=RetryPolicy(3, 0.01, 0.05))
    assert got.buffer == data and got.crc32c == crc32c.crc32c(data)
    assert fault_proxy.count("GET", r"/f$") == 4  # 3 ranges + 1 retry of the cut one


@pytest.mark.s3
def test_s3_download_flipped_byte_shows_in_the_crc(fault_proxy: FaultProxy, s3_root: str) -> None:
    fs = _proxied_fs(fault_proxy)
    data = _payload(2 * MiB)
    fs.pipe_file(f"{s3_root}/f", data)
    fault_proxy.add(Fault("flip_byte", method="GET", path=r"/f$"))
    got = download_into(fs, f"{s3_root}/f", len(data), part_size=1 * MiB)
    assert got.crc32c != crc32c.crc32c(data)  # the caller compares with the manifest and falls back


@pytest.mark.s3
def test_s3_download_size_mismatch_is_corruption(s3_fs: Any, s3_root: str) -> None:
    s3_fs.pipe_file(f"{s3_root}/f", b"0123456789")
    with pytest.raises(CheckpointCorruptError, match="manifest says 12"):
        download_into(s3_fs, f"{s3_root}/f", 12)
    with pytest.raises(CheckpointCorruptError, match="missing"):
        download_into(s3_fs, f"{s3_root}/nope", 12)


@pytest.mark.s3
def test_s3_orphans_respect_grace_and_young_uploads(s3_fs: Any, s3_root: str) -> None:
    fs, root = s3_fs, s3_root
    fs.pipe_file(f"{root}/step-000000000001/w-a/model.safetensors", b"old, no manifest")
    fs.pipe_file(f"{root}/step-000000000002/w-a/model.safetensors", b"committed")
    fs.pipe_file(f"{root}/step-000000000002/w-b/model.safetensors", b"loser's data")
    fs.pipe_file(
        f"{root}/step-000000000002/manifest.json",
        json.dumps({"writer_id": "a", "files": {"w-a/model.safetensors": [9, "0"]}}).encode(),
    )
    fs.pipe_file(f"{root}/step-000000000004/w-a/model.json", b"old object, young upload beside it")
    # S3 timestamps have one-second resolution: 2.5 s of age against a 1.8 s grace is unambiguous.
    time.sleep(2.5)
    bucket, key, _ = fs.split_path(f"{root}/step-000000000004/w-a/model.safetensors")
    up = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"p" * 10)
    fs.pipe_file(f"{root}/step-000000000003/w-a/model.safetensors", b"young, no manifest")

    orphans = find_orphans(fs, root, grace_seconds=1.8)
    assert orphans == [f"{root}/step-000000000001", f"{root}/step-000000000002/w-b"]
    # moto reports every upload as initiated in 2010; only the fresh part keeps this one young.
    assert abort_stale_uploads(fs, root, grace_seconds=1.8) == []
    aborted = abort_stale_uploads(fs, root, grace_seconds=1.8, now=time.time() + 60)
    assert aborted == [f"{bucket}/{key}?uploadId={up['UploadId']}"]
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []


# -- GCS (gcp-storage-emulator) -------------------------------------------------------------------------


@pytest.mark.gcs
def test_gcs_round_trip_is_fast(gcs_fs: Any, gcs_root: str) -> None:
    start = time.monotonic()
    gcs_fs.pipe_file(f"{gcs_root}/a", b"hello")
    assert gcs_fs.cat_file(f"{gcs_root}/a") == b"hello"
    assert gcs_fs.ls(gcs_root, detail=False) == [f"{gcs_root}/a"]
    assert time.monotonic() - start < 1.0  # the gRPC bucket probe would take ~60 s here


@pytest.mark.gcs
def test_gcs_put_if_absent_sends_if_generation_match_and_resolves_412(
    gcs_server: GCSEndpoint, gcs_root: str
) -> None:
    with FaultProxy(gcs_server.endpoint_url) as proxy:
        fs = gcs_server.filesystem(endpoint_url=proxy.url)
        path = f"{gcs_root}/step-000000000001/manifest.json"
        put_if_absent(fs, path, _manifest("a"))
        assert proxy.count("POST", r"ifGenerationMatch=0") == 1
        # The emulator ignores the precondition; the proxy answers 412 the way GCS does.
        gone = b'{"error": {"code": 412, "message": "conditionNotMet"}}'
        proxy.add(
            Fault("status", method="POST", path=r"ifGenerationMatch=0", status=412, body=gone, count=None)
        )
        put_if_absent(fs, path, _manifest("a"))  # our own commit seen again: success
        with pytest.raises(CommitConflictError):
            put_if_absent(fs, path, _manifest("b"))
        assert fs.cat_file(path) == _manifest("a")


@pytest.mark.gcs
@pytest.mark.xfail(strict=True, reason="gcp-storage-emulator ignores ifGenerationMatch (overwrites)")
def test_gcs_emulator_enforces_if_generation_match(gcs_fs: Any, gcs_root: str) -> None:
    path = f"{gcs_root}/manifest.json"
    put_if_absent(gcs_fs, path, _manifest("a"))
    with pytest.raises(CommitConflictError):
        put_if_absent(gcs_fs, path, _manifest("b"))


@pytest.mark.gcs
def test_gcs_streaming_upload_and_ranged_download(gcs_fs: Any, gcs_root: str) -> None:
    data = _payload(3 * MiB + 5)
    with open_upload(gcs_fs, f"{gcs_root}/f", part_size=1 * MiB) as f:
        for i in range(0, len(data), 700_000):
            f.write(data[i : i + 700_000])
    got = download_into(gcs_fs, f"{gcs_root}/f", len(data), part_size=1 * MiB)
    assert got.buffer == data and got.crc32c == crc32c.crc32c(data)


@pytest.mark.gcs
def test_gcs_orphans(gcs_fs: Any, gcs_root: str) -> None:
    gcs_fs.pipe_file(f"{gcs_root}/step-000000000001/w-a/model.safetensors", b"no manifest")
    gcs_fs.pipe_file(f"{gcs_root}/step-000000000002/w-a/x.json", b"{}")
    gcs_fs.pipe_file(
        f"{gcs_root}/step-000000000002/manifest.json",
        json.dumps({"files": {"w-a/x.json": [2, "0"]}}).encode(),
    )
    assert find_orphans(gcs_fs, gcs_root, 3600) == []
    assert find_orphans(gcs_fs, gcs_root, 3600, now=time.time() + 7200) == [f"{gcs_root}/step-000000000001"]


@pytest.mark.s3
def test_s3_endpoint_options_work_through_fsspec_url(s3_server: S3Endpoint) -> None:
    fs, path = fsspec.core.url_to_fs(s3_server.url("via-url", uuid.uuid4().hex), **s3_server.storage_options)
    fs.pipe_file(path, b"x")
    assert fs.cat_file(path) == b"x"
