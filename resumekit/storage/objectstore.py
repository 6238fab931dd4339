"""Object-store primitives under the fsspec backend: create-only commits, client options, orphans.

Retries live in :mod:`resumekit.storage.retry`, streaming transfers in :mod:`resumekit.storage.transfer`. Nothing here knows about training. s3fs and gcsfs are never imported by this module: it receives
filesystem objects and tells S3 from GCS by their ``protocol``, so ``import resumekit`` stays free of
optional dependencies. :func:`require_backend` gives the install hint when one is missing.

One retry layer per request (see :mod:`resumekit.storage.retry`): :func:`s3_default_options` and
:func:`single_retry_layer` leave it to botocore.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import time
from datetime import datetime
from typing import Any, Optional, TypeVar

import crc32c

from resumekit.errors import CommitConflictError, StorageError
from resumekit.format.layout import MANIFEST, parse_step_dir
from resumekit.format.manifest import MAX_MANIFEST_BYTES
from resumekit.storage.retry import (
    COMMIT_POLICY,
    RetryPolicy,
    retry_call,
    status_and_code,
)

__all__ = [
    "abort_stale_uploads",
    "find_orphans",
    "put_if_absent",
    "require_backend",
    "s3_default_options",
    "single_retry_layer",
    "store_kind",
]

T = TypeVar("T")

_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


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


def store_kind(fs: Any) -> str:
    """``"s3"``, ``"gcs"`` or ``"other"``: which object store an fsspec filesystem talks to."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols and hasattr(fs, "_call_s3"):
        return "s3"
    if "gs" in protocols or "gcs" in protocols:
        return "gcs"
    return "other"


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
    if store_kind(fs) == "s3":
        fs.retries = 1


# -- create-only commit ----------------------------------------------------------------------------


def _precondition_failed(exc: BaseException) -> bool:
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, FileExistsError):
            return True
        status, code = status_and_code(e)
        if status == 412 or code == "PreconditionFailed":
            return True
        e = e.__cause__
    return False


def _describe(data: bytes) -> str:
    writer = "?"
    with contextlib.suppress(Exception):
        writer = str(json.loads(data)["writer_id"])
    return f"writer {writer}, {len(data)} bytes, crc32c {crc32c.crc32c(data):08x}"


def put_if_absent(fs: Any, path: str, data: bytes, *, policy: RetryPolicy = COMMIT_POLICY) -> None:
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
    kind = store_kind(fs)

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
    if store_kind(fs) == "s3":
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
    if store_kind(fs) != "s3":
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
