"""Object stores and other fsspec filesystems (no atomic rename).

Data objects go under the step's prefix in a folder private to this writer, then the manifest is PUT
last, create-only where the store supports it (:func:`resumekit.storage.objectstore.put_if_absent`).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from resumekit.errors import (
    StorageError,
    UnsafeCheckpointError,
)
from resumekit.format.layout import MANIFEST, parse_step_dir, step_dir, writer_prefix
from resumekit.format.manifest import MAX_MANIFEST_BYTES
from resumekit.storage.base import Buffer, Stage, new_buffer

if TYPE_CHECKING:
    from resumekit.storage.transfer import Download

__all__ = ["FsspecStorage"]


#: Objects one save uploads at once, and the S3 part uploads in flight shared among them (memory stays
#: below about (this + objects) x 64 MiB part buffers, whatever the checkpoint's size).
_PARALLEL_OBJECTS = 2
_REQUESTS_IN_FLIGHT = 8


class _FsspecStage:
    def __init__(self, store: FsspecStorage, step: int, writer_id: str) -> None:
        self.store = store
        self.step = step
        self.writer_id = writer_id
        # A folder private to this writer: two writers racing for one step never mix files.
        self.data_prefix = writer_prefix(writer_id)
        # Objects upload side by side (each S3 object's parts too, within one budget of requests in
        # flight), so one object's slow last part or completion overlaps the next one's upload.
        self.parallel_files = _PARALLEL_OBJECTS

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        from resumekit.storage.retry import storage_boundary
        from resumekit.storage.transfer import open_upload

        path = self.store._path(self.step, relpath)
        # Parallel multipart on S3; an upload whose body raises is aborted, never completed.
        with (
            storage_boundary(f"writing '{path}'"),
            open_upload(
                self.store.fs, path, max_concurrency=max(1, _REQUESTS_IN_FLIGHT // self.parallel_files)
            ) as f,
        ):
            yield f

    def commit(self, manifest: bytes) -> None:
        path = self.store._path(self.step, MANIFEST)
        from resumekit.storage.objectstore import put_if_absent
        from resumekit.storage.retry import storage_boundary

        try:
            with storage_boundary(f"committing '{path}'"):
                put_if_absent(self.store.fs, path, manifest)
        except StorageError:
            # Every answer was lost: the PUT may still have landed. Ours (byte for byte) means committed.
            if self._committed_by_us(manifest):
                return
            raise

    def _committed_by_us(self, manifest: bytes | None = None) -> bool | None:
        """True when the step's manifest is ours, False when it is absent or another writer's, None
        when the store cannot tell right now."""
        try:
            existing = self.store.read_manifest(self.step)
        except Exception:
            return None
        if existing is None:
            return False
        if manifest is not None:
            return bytes(existing) == bytes(manifest)
        try:
            return bool(json.loads(bytes(existing)).get("data_prefix") == self.data_prefix)
        except (ValueError, AttributeError):  # not a manifest: not ours
            return False

    def abort(self) -> None:
        # Delete our data only when provably not committed: after a commit whose answer was lost, the
        # manifest may list these files, and deleting them would leave a checkpoint that never verifies.
        # Anything left behind is an orphan that retention removes after the grace period.
        if self._committed_by_us() is not False:
            return
        with contextlib.suppress(Exception):
            self.store.fs.rm(self.store._path(self.step, self.data_prefix), recursive=True)


_F = TypeVar("_F", bound=Callable[..., Any])


def _at_boundary(what: str) -> Callable[[_F], _F]:
    """Decorate a :class:`FsspecStorage` method: a transport failure (botocore's, aiohttp's...) leaves
    it as :class:`StorageError` (see :func:`resumekit.storage.retry.to_storage_error`)."""

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def inner(self: FsspecStorage, *args: Any, **kwargs: Any) -> Any:
            from resumekit.storage.retry import storage_boundary

            with storage_boundary(f"{what} in '{self.url}'"):
                return method(self, *args, **kwargs)

        return cast(_F, inner)

    return wrap


class FsspecStorage:
    """A checkpoint root on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        from resumekit.storage.objectstore import require_backend, s3_default_options, single_retry_layer

        require_backend(url)
        options = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")):
            # botocore retries transient faults with backoff; s3fs's own loop is reduced to one pass
            # so attempts do not multiply (see .notes/object-stores.md).
            options = s3_default_options(options)
            options.setdefault("skip_instance_cache", True)
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        single_retry_layer(self.fs)
        self.root = self.root.rstrip("/")

    def _path(self, step: int, relpath: str = "") -> str:
        return f"{self.root}/{step_dir(step)}/{relpath}" if relpath else f"{self.root}/{step_dir(step)}"

    @_at_boundary("listing steps")
    def step_candidates(self) -> list[int]:
        try:
            names = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:
            names = self.fs.ls(self.root, detail=False)
        return sorted(
            s for s in (parse_step_dir(n.rstrip("/").rsplit("/", 1)[-1]) for n in names) if s is not None
        )

    @_at_boundary("reading a manifest")
    def read_manifest(self, step: int) -> bytes | None:
        from resumekit.storage.retry import is_body_fault, retry_call

        path = self._path(step, MANIFEST)
        try:
            # botocore retried the request; a body cut short is re-read here (one retry layer). One
            # byte over the limit is asked for, never the whole of an object of any size.
            data: bytes = retry_call(
                lambda: self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1),
                what=f"reading '{path}'",
                retry_if=is_body_fault,
            )
        except FileNotFoundError:
            return None
        if len(data) > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(
                f"'{path}' is over the {MAX_MANIFEST_BYTES} bytes a manifest may have; not read further "
                "(resumekit never writes one that large)."
            )
        return data

    @_at_boundary("reading a file")
    def read_file(self, step: int, relpath: str, size: int) -> Buffer:
        from resumekit.storage.transfer import download_into

        # Parallel ranged GETs straight into one buffer, allocated only once the object's real size
        # matched the manifest's (a hostile size never reaches the allocator); a mismatch or a missing
        # object is reported as CheckpointCorruptError naming the path.
        buf: Buffer = download_into(self.fs, self._path(step, relpath), size, alloc=new_buffer).buffer
        return buf

    @_at_boundary("reading files")
    def fetch_files(self, step: int, files: list[tuple[str, int]]) -> list[Future[Download]]:
        """Start reading several files of ``step`` at once (one budget of ranged GETs in flight for all);
        each future gives the file's bytes and their crc32c, computed as the ranges arrived."""
        from resumekit.storage.transfer import download_many

        return download_many(
            self.fs, [(self._path(step, rel), size, None) for rel, size in files], alloc=new_buffer
        )

    def stage(self, step: int, writer_id: str) -> Stage:
        # As LocalStorage.stage: the create-only manifest PUT is the guard against a racing writer.
        return _FsspecStage(self, step, writer_id)

    @_at_boundary("deleting a step")
    def delete_step(self, step: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(step, MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(step), recursive=True)

    @_at_boundary("cleaning up")
    def cleanup(self, grace_seconds: float) -> list[str]:
        from resumekit.storage.objectstore import abort_stale_uploads, find_orphans

        removed = []
        for path in find_orphans(self.fs, self.root, grace_seconds):
            step = parse_step_dir(path.rstrip("/").rsplit("/", 1)[-1])
            if step is not None and self.read_manifest(step) is not None:
                continue  # committed since it was listed: a slow writer finished, keep it
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            removed.append(path)
        removed.extend(abort_stale_uploads(self.fs, self.root, grace_seconds))
        return removed

    # -- for read-only tools (the command line) ---------------------------------------------------------

    @_at_boundary("opening a file")
    def open_read(self, step: int, relpath: str) -> IO[bytes]:
        """A step's object opened for streaming and ranged reads."""
        f: IO[bytes] = self.fs.open(self._path(step, relpath), "rb")
        return f

    def root_kind(self) -> str:
        """Always ``"folder"``: a prefix exists once an object is written under it."""
        return "folder"

    def unfinished(self) -> list[tuple[int, str]]:
        """Empty: unfinished object-store saves lie under their step's prefix (listed as steps)."""
        return []
