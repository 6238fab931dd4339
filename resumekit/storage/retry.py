"""Transient faults and retries for object stores: which failures may succeed if sent again, bounded
backoff, and the boundary that turns a transport failure into :class:`~resumekit.errors.StorageError`.

Retry layering (measured against moto through a fault proxy, see .notes/object-stores.md): botocore
retries 5xx, throttling and connection errors itself, and s3fs wraps every call in a second loop of
``S3FileSystem.retries`` (5) attempts, so a persistent 503 costs 25 requests. resumekit keeps exactly
one request-level layer, botocore's (:func:`resumekit.storage.objectstore.s3_default_options` +
:func:`~resumekit.storage.objectstore.single_retry_layer`), and adds its own bounded retries only where
no client retries: response bodies cut short during ranged reads
(:func:`resumekit.storage.transfer.download_into`). Exceptions are recognised by class *names*, so
botocore, aiohttp and requests need not be importable here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from resumekit.errors import ResumeKitError, StorageError

__all__ = [
    "RetryPolicy",
    "is_body_fault",
    "is_transient",
    "retry_async",
    "retry_call",
    "status_and_code",
    "storage_boundary",
    "to_storage_error",
]

T = TypeVar("T")

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


DEFAULT_POLICY = RetryPolicy()
# The S3 and GCS clients already retry each request; a second layer here would multiply attempts.
COMMIT_POLICY = RetryPolicy(attempts=1)


def status_and_code(exc: BaseException) -> tuple[Optional[int], str]:
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
        status, code = status_and_code(e)
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
    policy: RetryPolicy = DEFAULT_POLICY,
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
            sleep(_delay_or_raise(exc, attempt, what=what, policy=policy, retry_if=retry_if))
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_async(
    fn: Callable[[], Any],
    *,
    what: str,
    policy: RetryPolicy,
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> Any:
    """:func:`retry_call` for a coroutine function: await ``fn()`` up to ``policy.attempts`` times."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            await asyncio.sleep(_delay_or_raise(exc, attempt, what=what, policy=policy, retry_if=retry_if))
    raise AssertionError("unreachable")  # pragma: no cover


def _delay_or_raise(
    exc: Exception,
    attempt: int,
    *,
    what: str,
    policy: RetryPolicy,
    retry_if: Callable[[BaseException], bool],
) -> float:
    """The one retry decision of :func:`retry_call` and :func:`retry_async`: how long to wait before
    the next attempt after ``exc``, or raise (``exc`` itself, or a StorageError once retries are spent)."""
    if not retry_if(exc):
        if is_transient(exc):  # retried below us (botocore) until its budget ran out
            raise _storage_error(exc, what, attempt) from exc
        raise exc
    if attempt == policy.attempts:
        raise _storage_error(exc, what, attempt) from exc
    return policy.delay(attempt)
