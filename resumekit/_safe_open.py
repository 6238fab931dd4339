"""Opening files under a checkpoint root without trusting the tree: no links, no FIFOs, no devices.

Every byte read from storage is untrusted until checked; the first check is what kind of thing a
path is. A link is never followed (it may lead out of the root, into another run's checkpoint), and
only regular files are opened for reading (a FIFO blocks the opener until a writer appears; a device
may have side effects). Used by :class:`resumekit._storage.LocalStorage`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .errors import UnsafeCheckpointError

__all__ = ["O_DIRECTORY", "not_kind_message", "open_checked"]

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _kind_name(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def not_kind_message(path: str, mode: int, want_dir: bool) -> str:
    if stat.S_ISLNK(mode):
        target = ""
        with contextlib.suppress(OSError):
            target = f" (to '{os.readlink(path)}')"
        return (
            f"'{path}' is a symbolic link{target}; resumekit reads and deletes only what lives inside its "
            "own checkpoint root, so the link is never followed. To start from another run's checkpoint, "
            "copy its step folder into this root (cp -r, or cp -al for hard links that share the bytes)."
        )
    want = "a folder" if want_dir else "a regular file"
    return f"'{path}' is {_kind_name(mode)}, not {want}; refused without opening it."


def open_checked(dir_fd: int, name: str, path: str, want_dir: bool) -> int:
    """Open ``name`` in ``dir_fd`` if it is a real folder (``want_dir``) or a regular file, else refuse.

    ``lstat`` first, so a FIFO or a device is never opened at all; then ``O_NOFOLLOW | O_NONBLOCK`` and
    an ``fstat`` of the descriptor, so a link or FIFO swapped in meanwhile is refused too, without
    blocking.
    """
    check = stat.S_ISDIR if want_dir else stat.S_ISREG
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if not check(mode):
        raise UnsafeCheckpointError(not_kind_message(path, mode, want_dir))
    flags = os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | (O_DIRECTORY if want_dir else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise UnsafeCheckpointError(
                f"'{path}' changed into something else while it was opened; refused."
            ) from exc
        raise
    mode = os.fstat(fd).st_mode
    if not check(mode):
        os.close(fd)
        raise UnsafeCheckpointError(not_kind_message(path, mode, want_dir))
    if not want_dir:
        os.set_blocking(fd, True)
    return fd
