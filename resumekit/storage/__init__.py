"""Where checkpoints live (internal): the storage interface and its backends.

``base`` (the ``Storage`` interface as Protocols, with its optional capabilities declared), ``local``
(local disk: fsync and atomic rename), ``remote`` (any fsspec filesystem), ``objectstore`` (the
object-store commit: create-only manifest PUT, orphans, stale uploads), ``retry`` (transient-fault
classification and backoff), ``transfer`` (parallel, budgeted,
retried uploads and downloads), ``safe_open`` (no links, FIFOs or devices under a root), ``verify``
(the one check of a file against its manifest record), ``retention`` (which steps ``keep_last``
deletes). Internal: the public API is ``resumekit.__all__``.
"""

from __future__ import annotations

import os
from typing import Any

from resumekit.storage.base import Storage
from resumekit.storage.local import LocalStorage
from resumekit.storage.remote import FsspecStorage

__all__ = ["open_storage"]


def open_storage(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Storage:
    """The backend for ``url``: a local path (or ``file://``) gets :class:`LocalStorage`, anything else fsspec."""
    s = os.fspath(url)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" not in s:
        return LocalStorage(s)
    return FsspecStorage(s, storage_options)
