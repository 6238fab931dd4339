"""Streaming transfers for object stores: parallel multipart uploads and parallel ranged reads.

Both keep memory bounded by a few part buffers, never by the file size, and compute the crc32c in
the same pass over the bytes. s3fs/gcsfs are never imported here; they arrive as filesystem objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import crc32c

from resumekit._messages import missing_file, wrong_size
from resumekit.errors import CheckpointCorruptError
from resumekit.storage.objectstore import store_kind
from resumekit.storage.retry import DEFAULT_POLICY, RetryPolicy, is_body_fault, retry_async, to_storage_error

__all__ = ["S3_MIN_PART", "Download", "S3ParallelWriter", "download_into", "download_many", "open_upload"]

#: S3 refuses multipart parts smaller than this (except the last one).
S3_MIN_PART = 5 << 20


class S3ParallelWriter(io.RawIOBase):
    """A write-only file that uploads to S3 as a parallel multipart upload.

    ``write`` copies into a part buffer of ``part_size`` bytes; a full part is handed to s3fs's event
    loop and uploaded while the caller fills the next one. At most ``max_concurrency`` parts are in
    flight (``write`` blocks beyond that), so memory stays below ``(max_concurrency + 1) * part_size``
    whatever the file size: no second copy of a checkpoint. ``size`` and ``crc32c`` of the bytes
    written are computed in the same pass. ``close()`` completes the upload (create-only with
    ``if_absent``); leaving the ``with`` block by an exception, or :meth:`abort`, aborts it so no part
    lingers. A file smaller than one part is sent as a single PUT.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        part_size: int = 64 << 20,
        max_concurrency: int = 8,
        if_absent: bool = False,
    ) -> None:
        super().__init__()
        if part_size < S3_MIN_PART:
            raise ValueError(
                f"part_size must be at least {S3_MIN_PART} bytes (S3's minimum), got {part_size}"
            )
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size, self.max_concurrency, self.if_absent = part_size, max_concurrency, if_absent
        self.size = 0
        self.crc32c = 0
        self._buf = bytearray(part_size)
        self._fill = 0
        self._upload_id: Optional[str] = None
        self._futures: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._finished = False

    def writable(self) -> bool:
        """Always True."""
        return True

    def write(self, b: Any) -> int:
        """Append ``b`` (any C-contiguous buffer); returns its length in bytes."""
        view = memoryview(b).cast("B")
        n = len(view)
        self.crc32c = crc32c.crc32c(view, self.crc32c)
        self.size += n
        pos = 0
        while pos < n:
            take = min(n - pos, self.part_size - self._fill)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.part_size:
                self._submit_part()
        return n

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _submit_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        while sum(not f.done() for f in self._futures) >= self.max_concurrency:
            concurrent.futures.wait(self._futures, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in self._futures:
            failure = f.exception() if f.done() else None
            if failure is not None:
                raise failure
        # A full buffer is handed over as is (no copy); only a short last part is sliced.
        part = self._buf if self._fill == self.part_size else self._buf[: self._fill]
        self._buf, self._fill = bytearray(self.part_size), 0
        coro = self.fs._call_s3(
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=len(self._futures) + 1,
            Body=part,
        )
        self._futures.append(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))

    def close(self) -> None:
        """Finish the upload (idempotent). On failure the multipart upload is aborted and re-raised."""
        if self.closed:
            return
        try:
            if not self._finished:
                self._complete()
        except BaseException:
            self.abort()
            raise
        finally:
            super().close()

    def _complete(self) -> None:
        match = {"IfNoneMatch": "*"} if self.if_absent else {}
        if self._upload_id is None:
            self._call("put_object", Body=self._buf[: self._fill], **match)
        else:
            if self._fill:
                self._submit_part()
            parts = [{"PartNumber": i + 1, "ETag": f.result()["ETag"]} for i, f in enumerate(self._futures)]
            self._call(
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
                **match,
            )
        self._finished = True
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Abandon the upload: wait for parts in flight, abort the multipart upload. Never raises."""
        self._finished = True
        for f in self._futures:
            with contextlib.suppress(BaseException):
                f.result()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self._upload_id)
        self._buf = bytearray()
        super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # Never complete an upload nobody closed: a half-written file must not become visible.
        if not self.closed:
            self.abort()


def open_upload(fs: Any, path: str, *, part_size: int = 64 << 20, max_concurrency: int = 8) -> Any:
    """Open ``path`` for streaming writes: parallel multipart on S3, ``fs.open(path, "wb")`` elsewhere.

    GCS resumable uploads accept chunks only in order, so gcsfs uploads sequentially in blocks of
    ``part_size`` (rounded up to its 256 KiB granularity). Either way memory is bounded by the part
    buffers, never by the file size.
    """
    if store_kind(fs) == "s3":
        return S3ParallelWriter(fs, path, part_size=part_size, max_concurrency=max_concurrency)
    return fs.open(path, "wb", block_size=-(-part_size // (256 << 10)) * (256 << 10))


@dataclass(frozen=True)
class Download:
    """What :func:`download_into` read: the buffer (as given, or allocated) and its crc32c."""

    buffer: Any
    crc32c: int


def download_into(
    fs: Any,
    path: str,
    size: int,
    out: Any = None,
    *,
    part_size: int = 32 << 20,
    max_concurrency: int = 8,
    policy: RetryPolicy = DEFAULT_POLICY,
    alloc: Callable[[int], Any] = bytearray,
) -> Download:
    """Read ``path`` (expected to be ``size`` bytes) into ``out`` with parallel ranged GETs.

    Each range lands directly at its offset in ``out`` (a writable buffer of ``size`` bytes, e.g. a
    ``bytearray`` or a tensor's memory). Without ``out``, ``alloc(size)`` provides it, and only after
    the object's real size was read from the store and found equal to ``size``: a size taken from a
    manifest is untrusted, and a hostile one (64 TiB) must never reach an allocator. Transient memory
    is at most ``max_concurrency`` ranges of ``part_size`` bytes, not a second copy of the file. The
    crc32c is extended over each range as soon as every range before it is in, while the bytes are
    still hot. Ranges whose body is cut short are retried under ``policy``.

    Raises:
        CheckpointCorruptError: the object is missing, not a file, or its size is not ``size``.
        StorageError: a range could not be read within the retry budget, or the store failed.
    """
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import sync

        got: Download = sync(
            fs.loop, _fetch_async, fs, path, size, out, alloc, part_size, max_concurrency, policy
        )
        return got
    with _storage_errors(path):
        _check_size(path, size, _real_size(path, fs.info(path)))
        if out is None:
            out = alloc(size)
        view = _view_of(out, size)
        crc = 0
        with fs.open(path, "rb") as f:
            for start in range(0, size, part_size):
                end = min(start + part_size, size)
                chunk = f.read(end - start)
                if len(chunk) != end - start:
                    _check_size(path, size, start + len(chunk))
                view[start:end] = chunk
                crc = crc32c.crc32c(view[start:end], crc)
    return Download(out, crc)


def download_many(
    fs: Any,
    files: list[tuple[str, int, Any]],
    *,
    part_size: int = 32 << 20,
    max_concurrency: int = 8,
    policy: RetryPolicy = DEFAULT_POLICY,
    alloc: Callable[[int], Any] = bytearray,
) -> list[concurrent.futures.Future[Download]]:
    """Start reading several objects at once; one future per ``(path, size, out)``, in order.

    The ranged GETs of every file share one budget of ``max_concurrency`` requests in flight, so the
    store stays busy until the last byte of the last file (files fetched one after the other, or each
    with its own budget, leave it half idle at every file's tail). Each file's crc32c is computed as its
    ranges arrive. An ``out`` of None is allocated with ``alloc`` once the object's real size matched
    (see :func:`download_into`). A filesystem without an async implementation reads the files one after
    another in a background thread. Cancelling a future stops that file's remaining ranges.
    """
    if not getattr(fs, "async_impl", False):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="resumekit-fetch")
        futures = [
            pool.submit(download_into, fs, path, size, out, part_size=part_size, policy=policy, alloc=alloc)
            for path, size, out in files
        ]
        pool.shutdown(wait=False)
        return futures

    async def make_limiter() -> asyncio.Semaphore:
        return asyncio.Semaphore(max_concurrency)  # created on the loop that will use it

    limiter = asyncio.run_coroutine_threadsafe(make_limiter(), fs.loop).result()
    return [
        asyncio.run_coroutine_threadsafe(
            _fetch_async(fs, path, size, out, alloc, part_size, limiter, policy), fs.loop
        )
        for path, size, out in files
    ]


def _ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """Byte ranges of ``part_size``; a short tail (a safetensors header makes one) joins the range before
    it rather than costing a request of its own."""
    starts = list(range(0, size, part_size))
    if len(starts) > 1 and size - starts[-1] < part_size // 4:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else size) for i, s in enumerate(starts)]


def _view_of(out: Any, size: int) -> memoryview:
    view = memoryview(out).cast("B")
    if len(view) != size:
        raise ValueError(f"download buffer holds {len(view)} bytes, expected {size}")
    return view


def _check_size(path: str, expected: int, actual: int) -> None:
    if actual != expected:
        raise CheckpointCorruptError(
            wrong_size(f"'{path}'", actual, expected) + ": the object was truncated or replaced."
        )


def _real_size(path: str, info: Any) -> int:
    """The size the store reports for ``path``; anything but a file with a size is corruption."""
    if not isinstance(info, dict) or info.get("type", "file") != "file":
        raise CheckpointCorruptError(
            f"'{path}' is not a file in the store (a folder?); the manifest lists it."
        )
    size = info.get("size")
    if type(size) is not int or size < 0:
        raise CheckpointCorruptError(f"'{path}': the store reports no usable size ({size!r}).")
    return size


@contextlib.contextmanager
def _storage_errors(path: str) -> Any:
    """Report a missing object, or one the store's own checksum keeps refusing, as corruption; any other
    failure of the store as :class:`StorageError` (see :func:`resumekit.storage.retry.to_storage_error`)."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(missing_file(f"'{path}'") + ".") from exc
    except Exception as exc:
        if _checksum_failed(exc):
            raise CheckpointCorruptError(
                f"'{path}': the store's own checksum of the data failed on every attempt; the stored object "
                "is corrupt."
            ) from exc
        mapped = to_storage_error(exc, f"reading '{path}'")
        if mapped is exc:
            raise
        raise mapped from exc


async def _fetch_async(
    fs: Any,
    path: str,
    size: int,
    out: Any,
    alloc: Callable[[int], Any],
    part_size: int,
    limit: int | asyncio.Semaphore,
    policy: RetryPolicy,
) -> Download:
    """One object into ``out``, or into memory from ``alloc`` once its real size is known to match."""
    checked = False
    if out is None:
        with _storage_errors(path):
            _check_size(path, size, _real_size(path, await fs._info(path)))
        out, checked = alloc(size), True
    crc = await _download_file_async(
        fs, path, _view_of(out, size), part_size, limit, policy, stat=not checked
    )
    return Download(out, crc)


async def _download_file_async(
    fs: Any,
    path: str,
    view: memoryview,
    part_size: int,
    limit: int | asyncio.Semaphore,
    policy: RetryPolicy,
    *,
    stat: bool = True,
) -> int:
    size = len(view)
    ranges = _ranges(size, part_size)
    sem = limit if isinstance(limit, asyncio.Semaphore) else asyncio.Semaphore(limit)
    with _storage_errors(path):
        return await _download_async(
            fs, path, view, ranges, sem, policy, lambda actual: _check_size(path, size, actual), stat
        )


def _checksum_failed(exc: BaseException) -> bool:
    e: BaseException | None = exc
    while e is not None:
        if type(e).__name__ == "FlexibleChecksumError":
            return True
        e = e.__cause__
    return False


async def _download_async(
    fs: Any,
    path: str,
    view: memoryview,
    ranges: list[tuple[int, int]],
    sem: asyncio.Semaphore,
    policy: RetryPolicy,
    check_size: Callable[[int], None],
    stat: bool = True,
) -> int:
    done = [False] * len(ranges)
    state = {"next": 0, "crc": 0}

    async def read_range(i: int) -> None:
        start, end = ranges[i]
        async with sem:

            async def once() -> bytes:
                data = await fs._cat_file(path, start=start, end=end)
                if len(data) != end - start:
                    check_size(start + len(data))  # a short answer means a shorter object: corrupt
                return bytes(data)

            # Only body faults: botocore has already retried the request itself (one retry layer).
            data = await retry_async(
                once, what=f"reading bytes {start}-{end} of '{path}'", policy=policy, retry_if=is_body_fault
            )
            view[start:end] = data
            del data
        done[i] = True
        # The crc advances over the contiguous completed prefix, in order, as soon as it grows.
        while state["next"] < len(ranges) and done[state["next"]]:
            s, e = ranges[state["next"]]
            state["crc"] = crc32c.crc32c(view[s:e], state["crc"])
            state["next"] += 1

    async def check_stat() -> None:
        check_size(_real_size(path, await fs._info(path)))

    # A caller's own buffer of the expected size needs no size check before the reads start: the stat
    # runs alongside them.
    tasks = [asyncio.ensure_future(check_stat())] if stat else []
    tasks += [asyncio.ensure_future(read_range(i)) for i in range(len(ranges))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # No range may keep writing into the caller's buffer after this call has returned.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return state["crc"]
