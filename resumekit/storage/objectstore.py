"""Object-store primitives under the fsspec backend: create-only commits, retries, streaming, orphans.

Streaming transfers live in :mod:`resumekit.storage.transfer`. Nothing here knows about training. s3fs and gcsfs are never imported by this module: it receives
filesystem objects and tells S3 from GCS by their ``protocol``, so ``import resumekit`` stays free of
optional dependencies. :func:`require_backend` gives the install hint when one is missing.

Retry layering (measured against moto through a fault proxy, see .notes/object-stores.md): botocore
retries 5xx, throttling and connection errors itself, and s3fs wraps every call in a second loop of
``S3FileSystem.retries`` (5) attempts, so a persistent 503 costs 25 requests. resumekit keeps exactly
one request-level layer, botocore's (:func:`s3_default_options` + :func:`single_retry_layer`), and adds
its own bounded retries only where no client retries: response bodies cut short during ranged reads
(:func:`resumekit.storage.transfer.download_into`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, TypeVar

import crc32c

from resumekit.errors import CommitConflictError, ResumeKitError, StorageError
from resumekit.format.manifest import MANIFEST, MAX_MANIFEST_BYTES, parse_step_dir

__all__ = [
    "RetryPolicy",
    "abort_stale_uploads",
    "find_orphans",
    "is_transient",
    "put_if_absent",
    "require_backend",
    "retry_call",
    "s3_default_options",
    "single_retry_layer",
    "storage_boundary",
    "to_storage_error",
]

T = TypeVar("T")

_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
# Exception class names (anywhere in the MRO) that mean "the request may succeed if sent again".
# Names, not classes, so that botocore/aiohttp/requests need not be importable here.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "IncompleteRead",
        "ClientPayloadError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ChunkedEncodingError",
        "ProxyError",
        "RemoteDisconnected",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        # AWS: two conditional writes raced on one key; the documented answer is to retry.
        "ConditionalRequestConflict",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def require_backend(url: str) -> None:
    """Check that the fsspec implementation for ``url``'s scheme is installed.

    Raises:
        ImportError: naming the package and the resumekit extra to install.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _EXTRAS:
        return
    module, extra = _EXTRAS[scheme]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"'{url}' needs the {module} package, which is not installed; "
            f'install it with: pip install "resumekit[{extra}]"'
        ) from exc


def _kind(fs: Any) -> str:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols and hasattr(fs, "_call_s3"):
        return "s3"
    if "gs" in protocols or "gcs" in protocols:
        return "gcs"
    return "other"


# -- retries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter.

    Attributes:
        attempts: Total tries, the first included (1 = no retry).
        base_delay: Upper bound of the first sleep, in seconds.
        max_delay: Upper bound of any sleep, in seconds.
    """

    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Sleep before retry number ``retry`` (1-based): uniform in [0, min(max, base * 2**(retry-1))]."""
        return rand() * min(self.max_delay, self.base_delay * 2 ** (retry - 1))


_DEFAULT_POLICY = RetryPolicy()
# The S3 and GCS clients already retry each request; a second layer here would multiply attempts.
_COMMIT_POLICY = RetryPolicy(attempts=1)


def _status_and_code(exc: BaseException) -> tuple[Optional[int], str]:
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        err = response.get("Error") or {}
        return meta.get("HTTPStatusCode"), str(err.get("Code", ""))
    code = getattr(exc, "code", None)  # gcsfs HttpError
    if isinstance(code, int):
        return code, ""
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    return (status if isinstance(status, int) else None), ""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception in its cause chain) is worth retrying.

    Transient: connection resets and refusals, timeouts, 5xx/429/408 answers, throttling codes and
    response bodies cut short. Never transient: a missing object, an existing object (a failed
    precondition), a permission error, or any resumekit error other than :class:`StorageError`.
    """
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(e, ResumeKitError) and not isinstance(e, StorageError):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if _TRANSIENT_NAMES.intersection(c.__name__ for c in type(e).__mro__):
            return True
        status, code = _status_and_code(e)
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return True
        e = e.__cause__ or e.__context__
    return False


#: Failures while reading a response body, after botocore has returned: botocore never retries these
#: (its retries cover the request), so they are the only ones a read retries on top of it.
_BODY_FAULT_NAMES = frozenset(
    {
        "ResponseStreamingError",
        "IncompleteReadError",
        "IncompleteRead",
        "ClientPayloadError",
        "ChunkedEncodingError",
        "FlexibleChecksumError",
    }
)


def is_body_fault(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause chain) is a response body cut short or failing its checksum."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _BODY_FAULT_NAMES.intersection(c.__name__ for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _storage_error(exc: BaseException, what: str, attempts: int) -> StorageError:
    number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    err = StorageError(
        number,
        f"{what} failed after {attempts} attempt(s): {type(exc).__name__}: {exc}. "
        "The store was unreachable or kept answering with errors; check the endpoint, credentials and "
        "network, then retry. Checkpoints already committed are intact.",
    )
    return err


# Top-level packages whose exceptions mean "the store or the path to it failed": the clients under fsspec
# (botocore, aiohttp, google-auth, requests...) raise their own classes, outside OSError. Names, not
# classes, for the same reason as _TRANSIENT_NAMES.
_TRANSPORT_PACKAGES = frozenset(
    {
        "aiobotocore",
        "aiohttp",
        "botocore",
        "boto3",
        "fsspec",
        "gcsfs",
        "google",
        "http",
        "requests",
        "s3fs",
        "socket",
        "ssl",
        "urllib3",
    }
)


def _is_transport_failure(exc: BaseException) -> bool:
    if isinstance(exc, ResumeKitError):
        return False
    if isinstance(exc, (OSError, asyncio.TimeoutError)) or is_transient(exc):
        return True
    return any(c.__module__.split(".", 1)[0] in _TRANSPORT_PACKAGES for c in type(exc).__mro__[:-2])


def to_storage_error(exc: BaseException, what: str) -> BaseException:
    """``exc`` as resumekit reports it at the storage boundary.

    A failure of the store or of the way to it (an ``OSError``, or any exception class of botocore,
    aiohttp, google-auth, requests... such as ``EndpointConnectionError``) becomes a
    :class:`StorageError` naming ``what`` failed, with ``exc`` as its ``__cause__`` and its ``errno``
    when it has one. resumekit's own errors and programming errors (``TypeError``...) are returned
    unchanged.
    """
    if not _is_transport_failure(exc):
        return exc
    number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    err = StorageError(
        number,
        f"{what} failed: {type(exc).__name__}: {exc}. The store was unreachable or refused the request; "
        "check the endpoint, credentials and network, then retry. Checkpoints already committed are intact.",
    )
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def storage_boundary(what: str) -> Iterator[None]:
    """Raise every transport failure inside the block as :class:`StorageError` (see
    :func:`to_storage_error`): the one place where the clients' own exception classes stop."""
    try:
        yield
    except Exception as exc:
        mapped = to_storage_error(exc, what)
        if mapped is exc:
            raise
        raise mapped from exc


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy = _DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures (see :func:`is_transient`).

    Args:
        fn: The operation; it must be safe to repeat.
        what: Describes the operation for the error message (``"reading 's3://b/k'"``).
        policy: How often and how long to retry.
        sleep: Injected for tests.
        retry_if: Which failures to retry (default: every transient one; reads pass
            :func:`is_body_fault`, since botocore already retried the rest).

    Returns:
        What ``fn`` returned.

    Raises:
        StorageError: a transient failure persisted through every attempt (cause chained).
        Exception: a non-transient failure, unchanged, at the first occurrence.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not retry_if(exc):
                if is_transient(exc):  # retried below us (botocore) until its budget ran out
                    raise _storage_error(exc, what, attempt) from exc
                raise
            if attempt == policy.attempts:
                raise _storage_error(exc, what, attempt) from exc
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


async def _retry_async(
    fn: Callable[[], Any],
    *,
    what: str,
    policy: RetryPolicy,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> Any:
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if not retry_if(exc):
                if is_transient(exc):  # retried below us (botocore) until its budget ran out
                    raise _storage_error(exc, what, attempt) from exc
                raise
            if attempt == policy.attempts:
                raise _storage_error(exc, what, attempt) from exc
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def s3_default_options(
    storage_options: Optional[dict[str, Any]] = None,
    *,
    attempts: int = 5,
    connect_timeout: float = 10,
    read_timeout: float = 60,
) -> dict[str, Any]:
    """s3fs options with resumekit's retry defaults underneath the user's own (the user's win).

    botocore's ``standard`` retry mode (exponential backoff with jitter, ``attempts`` in total) handles
    5xx, throttling, connection errors and timeouts for every request.
    """
    opts = dict(storage_options or {})
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": attempts})
    config.setdefault("connect_timeout", connect_timeout)
    config.setdefault("read_timeout", read_timeout)
    opts["config_kwargs"] = config
    return opts


def single_retry_layer(fs: Any) -> None:
    """Let botocore be the only request-level retry loop of an s3fs filesystem (no-op otherwise).

    s3fs retries each call ``fs.retries`` times around botocore's own attempts; one attempt here
    keeps the total at botocore's configured number. Bodies cut short are then retried by
    :func:`download_into`. The attribute is per instance: build ``fs`` with ``skip_instance_cache=True``
    if other code shares the cached one and wants s3fs's behaviour.
    """
    if _kind(fs) == "s3":
        fs.retries = 1


# -- create-only commit ----------------------------------------------------------------------------


def _precondition_failed(exc: BaseException) -> bool:
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, FileExistsError):
            return True
        status, code = _status_and_code(e)
        if status == 412 or code == "PreconditionFailed":
            return True
        e = e.__cause__
    return False


def _describe(data: bytes) -> str:
    writer = "?"
    with contextlib.suppress(Exception):
        writer = str(json.loads(data)["writer_id"])
    return f"writer {writer}, {len(data)} bytes, crc32c {crc32c.crc32c(data):08x}"


def put_if_absent(fs: Any, path: str, data: bytes, *, policy: RetryPolicy = _COMMIT_POLICY) -> None:
    """Create ``path`` holding ``data``, only if nothing is there yet.

    S3 sends ``If-None-Match: *``, GCS ``ifGenerationMatch=0``: the store decides atomically. Other
    fsspec filesystems (``memory://``...) get a best-effort existence check before the write.

    A lost response is resolved, not failed: when a retry (botocore's, gcsfs's or ours) finds the
    object already there, it is read back and compared byte for byte with ``data``. Equal means our
    own earlier attempt landed (a manifest carries a unique writer id, so no other writer produces the
    same bytes): success. Different means another writer won.

    Raises:
        CommitConflictError: the object exists with other content.
        StorageError: the store stayed unreachable (the commit may or may not have happened: a later
            :func:`put_if_absent` of the same bytes, or a read, will tell).
    """
    kind = _kind(fs)

    def attempt() -> None:
        if kind == "s3":
            bucket, key, _ = fs.split_path(path)
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        elif kind == "gcs":
            fs.pipe_file(path, data, mode="create")
        else:
            if fs.exists(path):
                raise FileExistsError(errno.EEXIST, "object exists", path)
            fs.pipe_file(path, data)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)

    try:
        retry_call(attempt, what=f"create-only write of '{path}'", policy=policy)
        return
    except Exception as exc:
        if kind == "s3" and "IfNoneMatch" in str(exc) and "nknown parameter" in str(exc):
            raise StorageError(
                f"committing '{path}' needs S3 conditional writes (If-None-Match), which this botocore "
                "does not know (it needs botocore >= 1.35.20). Nothing was committed. Fix: "
                "pip install -U 'resumekit[s3]' (or botocore, aiobotocore and s3fs)."
            ) from exc
        if not _precondition_failed(exc):
            raise
        conflict = exc
    existing: bytes = retry_call(lambda: fs.cat_file(path), what=f"reading back '{path}'", policy=policy)
    if bytes(existing) == bytes(data):
        return
    raise CommitConflictError(
        f"'{path}' was created by another writer ({_describe(existing)}) before this one "
        f"({_describe(data)}); two writers share this checkpoint prefix. This save is discarded; give each "
        "run its own prefix."
    ) from conflict


# -- orphans ---------------------------------------------------------------------------------------


def _mtime(info: dict[str, Any]) -> Optional[float]:
    for key in ("LastModified", "mtime", "updated", "created", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _young_upload_keys(
    fs: Any, root: str, grace_seconds: float, now: float
) -> tuple[list[tuple[str, str]], set[str]]:
    """S3 multipart uploads under ``root``: (stale (key, upload_id) pairs, keys with a young upload)."""
    bucket, prefix, _ = fs.split_path(root.rstrip("/") + "/")
    stale: list[tuple[str, str]] = []
    young: set[str] = set()
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        for up in page.get("Uploads", []):
            # An upload is as young as its newest part: one started long ago may still be sending.
            times = [up["Initiated"].timestamp()]
            parts = fs.call_s3("list_parts", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            times += [p["LastModified"].timestamp() for p in parts.get("Parts", []) if "LastModified" in p]
            if now - max(times) >= grace_seconds:
                stale.append((up["Key"], up["UploadId"]))
            else:
                young.add(f"{bucket}/{up['Key']}")
        if not page.get("IsTruncated"):
            return stale, young
        kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def _invalidate_tree(fs: Any, root: str) -> None:
    """Drop every cached listing at or below ``root`` (``invalidate_cache(root)`` keeps the children's)."""
    fs.invalidate_cache(root)
    cache = getattr(fs, "dircache", None)
    if cache is None:
        return
    for path in list(cache):
        if path == root or path.startswith(root + "/"):
            with contextlib.suppress(KeyError):
                del cache[path]


def find_orphans(fs: Any, root: str, grace_seconds: float, *, now: Optional[float] = None) -> list[str]:
    """Paths under ``root`` that no checkpoint needs and nobody has touched for ``grace_seconds``.

    Two kinds, each returned as a path to delete recursively:

    - a step prefix without a manifest (an interrupted save, or a deletion cut short);
    - in a committed step, a top-level folder the manifest does not reference (the data of a
      writer that lost the commit race).

    Age is the newest modification time of any object inside, and a prefix with a young S3 multipart
    upload in progress counts as young: a writer may still be finishing it. Anything whose age
    cannot be read, and every step whose manifest does not parse, is left alone.
    """
    now = time.time() if now is None else now
    root = root.rstrip("/")
    _invalidate_tree(fs, root)  # listings are cached by s3fs/gcsfs; an orphan decision needs fresh ones
    try:
        children = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    young_keys: set[str] = set()
    if _kind(fs) == "s3":
        _stale, young_keys = _young_upload_keys(fs, root, grace_seconds, now)

    def old_enough(prefix: str) -> bool:
        if any(k.startswith(prefix.rstrip("/") + "/") for k in young_keys):
            return False
        infos = fs.find(prefix, detail=True)
        times = [_mtime(i) for i in infos.values()]
        known = [t for t in times if t is not None]
        # Undatable objects make the whole prefix young: never delete what cannot be aged.
        return bool(known) and len(known) == len(times) and now - max(known) >= grace_seconds

    orphans: list[str] = []
    for child in sorted(str(c).rstrip("/") for c in children):
        if parse_step_dir(child.rsplit("/", 1)[-1]) is None:
            continue
        try:
            # Bounded like every manifest read: a hostile object of any size is never read whole.
            manifest = fs.cat_file(f"{child}/{MANIFEST}", start=0, end=MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            if old_enough(child):
                orphans.append(child)
            continue
        if len(manifest) > MAX_MANIFEST_BYTES:
            continue  # not a manifest resumekit wrote: restore reports it; cleanup must not guess
        try:
            referenced = {p.split("/", 1)[0] for p in json.loads(manifest)["files"]}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # unreadable manifest: restore reports it; cleanup must not guess
        for entry in fs.ls(child, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name != MANIFEST and name not in referenced and old_enough(str(entry)):
                orphans.append(str(entry).rstrip("/"))
    return orphans


def abort_stale_uploads(
    fs: Any, root: str, grace_seconds: float, *, now: Optional[float] = None
) -> list[str]:
    """Abort S3 multipart uploads under ``root`` idle for ``grace_seconds`` (no-op on other stores).

    Idle means neither initiated nor sent a part within the grace period. Returns the aborted
    uploads as ``"bucket/key?uploadId=..."``.
    """
    if _kind(fs) != "s3":
        return []
    now = time.time() if now is None else now
    stale, _young = _young_upload_keys(fs, root, grace_seconds, now)
    bucket = fs.split_path(root)[0]
    aborted = []
    for key, upload_id in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        aborted.append(f"{bucket}/{key}?uploadId={upload_id}")
    return aborted
