"""Storage backends: where checkpoint bytes go, and the commit protocol for each kind of store.

The storage layer knows nothing of training. Every backend follows one rule: write the data files,
make them durable, then make the manifest visible in a single atomic step.

- Local disk: data and manifest go into a temporary sibling folder, each file fsynced; the folder is
  renamed into place (the commit) and the parent fsynced.
- Object stores and other fsspec filesystems (no atomic rename): data objects go under the step's
  prefix in a folder private to this writer, then the manifest is PUT last, create-only where the
  store supports it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch

from resumekit.errors import (
    CheckpointCorruptError,
    CommitConflictError,
    StepExistsError,
    StorageError,
    UnsafeCheckpointError,
)
from resumekit.format.manifest import MANIFEST, MAX_MANIFEST_BYTES, parse_step_dir, step_dir
from resumekit.format.tensorfile import RangeReader
from resumekit.storage.safe_open import not_kind_message, open_checked

if TYPE_CHECKING:
    from resumekit.storage.transfer import Download

__all__ = ["Buffer", "LocalStorage", "Stage", "Storage", "new_buffer", "open_storage", "publish_folder"]

#: The bytes of one checkpoint file in memory: a writable, uninitialised uint8 NumPy array (typed
#: loosely: NumPy's stubs do not declare the buffer protocol that crc32c and torch.frombuffer use).
Buffer = Any


def new_buffer(size: int) -> Buffer:
    """Uninitialised host memory for ``size`` bytes.

    Not ``bytearray(size)``: CPython zero-fills it, touching every page once before the read touches it
    again, which doubled restore time in benchmarks/results/save_restore.md.
    """
    return torch.empty(size, dtype=torch.uint8).numpy()


_TMP_PREFIX = ".tmp-"


class Stage(Protocol):
    """A checkpoint being written: data files first, then :meth:`commit`."""

    data_prefix: str
    #: How many data files a save writes at once (``open_write`` is called from that many threads).
    parallel_files: int

    def open_write(self, relpath: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Open a data file for writing; it is durable when the context exits without error."""
        ...

    def commit(self, manifest: bytes) -> None:
        """Make the checkpoint visible, atomically. Raises StepExistsError/CommitConflictError."""
        ...

    def abort(self) -> None:
        """Remove what this stage wrote; never raises."""
        ...


class Storage(Protocol):
    """One checkpoint root (a folder or an object-store prefix).

    A storage may also offer ``open_reader(step, relpath, size)``, a context manager giving a
    :class:`~resumekit.format.tensorfile.RangeReader` (positional reads, several in flight): restore then reads
    tensor files straight into live tensors. Object stores offer ``fetch_files(step, [(relpath, size)])``
    instead, futures of whole files fetched at once, with their crc32c.
    """

    url: str

    def step_candidates(self) -> list[int]:
        """Steps that have a folder, newest last; their manifests are not checked yet."""
        ...

    def read_manifest(self, step: int) -> bytes | None:
        """The manifest of ``step``, or None when it does not exist (not committed)."""
        ...

    def read_file(self, step: int, relpath: str, size: int) -> Buffer:
        """The whole content of a checkpoint file, which must be ``size`` bytes long."""
        ...

    def stage(self, step: int, writer_id: str) -> Stage:
        """Start writing ``step`` (all ranks of one save share the writer id)."""
        ...

    def delete_step(self, step: int) -> None:
        """Delete a committed step: its manifest first, then its data."""
        ...

    def cleanup(self, grace_seconds: float) -> list[str]:
        """Remove debris (unfinished stages, half-deleted steps) older than the grace period."""
        ...


def _io_error(exc: OSError, what: str, path: str) -> StorageError:
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = " The disk is full: free space or point the Checkpointer at a larger volume."
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " Permission denied: check the folder's owner and mode."
    err = StorageError(exc.errno, f"{what} '{path}' failed: {exc.strerror or exc}.{hint}")
    err.filename = path
    return err


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(src: str, dst: str) -> None:
    """Rename the complete folder ``src`` to the new name ``dst`` and make the rename durable.

    For a caller that builds a whole checkpoint root under a hidden name with :class:`LocalStorage`'s
    commit and then publishes it (the Lightning adapter's first save to a path): ``dst`` appears only
    once it holds a committed step. If the parent's fsync fails the rename is undone, so a caller never
    sees a folder whose publishing raised.

    Raises:
        CommitConflictError: ``dst`` already exists (another writer published it first).
        StorageError: the rename or the fsync failed.
    """
    if os.path.lexists(dst):  # os.rename would silently replace an empty folder
        raise CommitConflictError(f"'{dst}' already exists; this save is discarded.")
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise CommitConflictError(f"'{dst}' was created while this save was writing.") from exc
        raise _io_error(exc, "publishing", dst) from exc
    try:
        _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rename(dst, src)
        raise _io_error(exc, "publishing", dst) from exc


class _LocalStage:
    def __init__(self, root: str, step: int, writer_id: str) -> None:
        self.root = root
        self.step = step
        self.tmp = os.path.join(root, f"{_TMP_PREFIX}{step_dir(step)}-{writer_id}")
        self.data_prefix = ""
        # Two files written and fsynced at once took 0.9 s where one after the other took 2.0-2.6 s
        # (2 x 512 MiB, this project's virtio disk): one file's fsync overlaps the other's writes.
        self.parallel_files = 4
        try:
            os.makedirs(self.tmp, exist_ok=True)
        except OSError as exc:
            raise _io_error(exc, "creating the staging folder", self.tmp) from exc

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        path = os.path.join(self.tmp, relpath)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _io_error(exc, "writing", path) from exc

    def commit(self, manifest: bytes) -> None:
        final = os.path.join(self.root, step_dir(self.step))
        try:
            with open(os.path.join(self.tmp, MANIFEST), "wb") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            for dirpath, _dirs, _files in os.walk(self.tmp):
                _fsync_dir(dirpath)
            if os.path.exists(final):
                if os.path.exists(os.path.join(final, MANIFEST)):
                    raise StepExistsError(
                        f"step {self.step} was committed at '{final}' while this save was writing; "
                        "another writer is using the same checkpoint folder."
                    )
                shutil.rmtree(final)  # debris of an interrupted deletion: no manifest, not a checkpoint
            os.rename(self.tmp, final)
            try:
                _fsync_dir(self.root)
            except OSError:
                # The rename may not survive a power loss: un-commit (manifest first) so that no caller
                # sees a step whose save raised, then report the failure.
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(final, MANIFEST))
                shutil.rmtree(final, ignore_errors=True)
                raise
        except OSError as exc:
            if isinstance(exc, StepExistsError):
                raise
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CommitConflictError(
                    f"another writer committed step {self.step} at '{final}' first; this save is discarded."
                ) from exc
            raise _io_error(exc, "committing", final) from exc

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _PreadReader:
    """Positional reads of a local file: thread-safe, so several requests can be in flight."""

    parallel = True

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def read_at(self, buf: memoryview, offset: int) -> None:
        got, want = 0, len(buf)
        while got < want:
            try:
                n = os.preadv(self.fd, [buf[got:]], offset + got)
            except OSError as exc:
                raise _io_error(exc, "reading", self.path) from exc
            if not n:
                raise CheckpointCorruptError(
                    f"'{self.path}' ended at byte {offset + got}, before {offset + want}"
                )
            got += n


class LocalStorage:
    """A checkpoint root on a local (or network-mounted POSIX) filesystem."""

    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(path))
        self.url = self.root

    def _step_path(self, step: int, relpath: str = "") -> str:
        return os.path.join(self.root, step_dir(step), relpath)

    def step_candidates(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error(exc, "listing", self.root) from exc
        return sorted(s for s in map(parse_step_dir, names) if s is not None)

    def _open_inside(self, step: int, relpath: str) -> int:
        """Open a regular file of a step for reading: never through a link, never blocking.

        Every component below the root is checked with ``lstat`` before anything is opened: the step
        folder and any folder inside it must be real folders, the file a regular file. A link, FIFO,
        socket or device is refused without being opened (opening a FIFO blocks until a writer
        appears); see :func:`resumekit.storage.safe_open.open_checked`. The root itself may be a link: the
        user chose it.

        Raises:
            FileNotFoundError: the step folder or the file does not exist.
            UnsafeCheckpointError: a component is a link or not of the kind expected.
        """
        parts = relpath.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeCheckpointError(
                f"'{relpath}' is not a plain relative path inside the step folder; refused without reading it."
            )
        return open_checked(self.root, [step_dir(step), *parts])

    def read_manifest(self, step: int) -> bytes | None:
        path = self._step_path(step, MANIFEST)
        try:
            with os.fdopen(self._open_inside(step, MANIFEST), "rb") as f:
                actual = os.fstat(f.fileno()).st_size
                if actual > MAX_MANIFEST_BYTES:
                    raise UnsafeCheckpointError(
                        f"'{path}' is {actual} bytes, over the {MAX_MANIFEST_BYTES} a manifest may have; "
                        "not read (resumekit never writes one that large)."
                    )
                data: bytes = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even if the file grows meanwhile
                return data
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _io_error(exc, "reading", path) from exc

    def read_file(self, step: int, relpath: str, size: int) -> Buffer:
        path = self._step_path(step, relpath)
        try:
            with os.fdopen(self._open_inside(step, relpath), "rb", buffering=0) as f:
                actual = os.fstat(f.fileno()).st_size
                if actual != size:
                    raise CheckpointCorruptError(
                        f"'{path}' is {actual} bytes, the manifest says {size}: the file was truncated or replaced."
                    )
                buf = new_buffer(size)
                view = memoryview(buf)
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointCorruptError(f"'{path}' ended after {got} of {size} bytes")
                    got += n
                return buf
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(f"'{path}' is missing; the manifest lists it.") from exc
        except OSError as exc:
            raise _io_error(exc, "reading", path) from exc

    @contextlib.contextmanager
    def open_reader(self, step: int, relpath: str, size: int) -> Iterator[RangeReader]:
        path = self._step_path(step, relpath)
        try:
            fd = self._open_inside(step, relpath)
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(f"'{path}' is missing; the manifest lists it.") from exc
        except OSError as exc:
            raise _io_error(exc, "reading", path) from exc
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise CheckpointCorruptError(
                    f"'{path}' is {actual} bytes, the manifest says {size}: the file was truncated or replaced."
                )
            if hasattr(os, "posix_fadvise"):  # a hint only: larger read-ahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            yield _PreadReader(fd, path)
        finally:
            os.close(fd)

    def stage(self, step: int, writer_id: str) -> Stage:
        # No existence check here: rank 0 checked before the save and broadcast it, and the commit
        # (a rename that refuses a committed target) is the guard against a writer that raced us.
        return _LocalStage(self.root, step, writer_id)

    def delete_step(self, step: int) -> None:
        # Only what lives inside this root: a step entry that is a link (to another run's checkpoint,
        # say) is refused, never followed, so nothing outside the root is ever deleted.
        folder = os.path.join(self.root, step_dir(step))
        try:
            mode = os.lstat(folder).st_mode
            if not stat.S_ISDIR(mode):
                raise UnsafeCheckpointError(not_kind_message(folder, mode, True) + " Not deleted.")
            os.unlink(os.path.join(folder, MANIFEST))
            _fsync_dir(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if isinstance(exc, UnsafeCheckpointError):
                raise
            raise _io_error(exc, "deleting", folder) from exc
        # rmtree refuses a link at the top (no trailing slash here: "link/" would resolve it) and
        # unlinks, never follows, the links inside.
        shutil.rmtree(folder, ignore_errors=True)

    def cleanup(self, grace_seconds: float) -> list[str]:
        removed: list[str] = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return removed
        now = time.time()
        for name in names:
            path = os.path.join(self.root, name)
            is_tmp = name.startswith(_TMP_PREFIX)
            is_debris = parse_step_dir(name) is not None and not os.path.lexists(os.path.join(path, MANIFEST))
            if not (is_tmp or is_debris):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue  # a link or a file is not debris of ours: never followed, never deleted
            age = now - st.st_mtime
            if age >= grace_seconds:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # -- for read-only tools (the command line) ---------------------------------------------------------

    def open_read(self, step: int, relpath: str) -> IO[bytes]:
        """A step's file opened for streaming and ranged reads (links refused, as for restore)."""
        return os.fdopen(self._open_inside(step, relpath), "rb")

    def root_kind(self) -> str:
        """``"folder"``, ``"file"`` or ``"missing"``: what the root is."""
        return "folder" if os.path.isdir(self.root) else "file" if os.path.exists(self.root) else "missing"

    def unfinished(self) -> list[tuple[int, str]]:
        """Temporary folders of saves that never committed, as (step, folder name), ascending."""
        with contextlib.suppress(OSError):
            names = [n for n in os.listdir(self.root) if n.startswith(_TMP_PREFIX)]
            # "<prefix>step-000000001200-<writer id>", as _LocalStage names it
            found = [(parse_step_dir(n[len(_TMP_PREFIX) :].rsplit("-", 1)[0]), n) for n in names]
            return sorted((s, n) for s, n in found if s is not None)
        return []


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
        self.data_prefix = f"w-{writer_id}/"
        # Objects upload side by side (each S3 object's parts too, within one budget of requests in
        # flight), so one object's slow last part or completion overlaps the next one's upload.
        self.parallel_files = _PARALLEL_OBJECTS

    @contextlib.contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        from resumekit.storage.objectstore import storage_boundary
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
        from resumekit.storage.objectstore import put_if_absent, storage_boundary

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
        return f'"data_prefix": "{self.data_prefix}"'.encode() in existing

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
    it as :class:`StorageError` (see :func:`resumekit.storage.objectstore.to_storage_error`)."""

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def inner(self: FsspecStorage, *args: Any, **kwargs: Any) -> Any:
            from resumekit.storage.objectstore import storage_boundary

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
        from resumekit.storage.objectstore import is_body_fault, retry_call

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


def open_storage(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Storage:
    """The backend for ``url``: a local path (or ``file://``) gets :class:`LocalStorage`, anything else fsspec."""
    s = os.fspath(url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" not in s:
        return LocalStorage(s)
    return FsspecStorage(s, storage_options)
