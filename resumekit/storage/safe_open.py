"""Opening files under a checkpoint root without trusting the tree: no links, no FIFOs, no devices.

Every byte read from storage is untrusted until checked; the first check is what kind of thing a
path is. A link is never followed (it may lead out of the root, into another run's checkpoint), and
only regular files are opened for reading (a FIFO blocks the opener until a writer appears; a device
may have side effects). Used by :class:`resumekit.storage.local.LocalStorage`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from resumekit.errors import UnsafeCheckpointError

__all__ = ["not_kind_message", "open_checked"]

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
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


def open_checked(root: str, names: list[str]) -> int:
    """Open ``root/names[0]/.../names[-1]`` for reading if every folder on the way is a real folder
    and the last name a regular file; refuse anything else without opening it.

    ``lstat`` first, so a link is never followed and a FIFO or device never opened at all; then the
    file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and its descriptor checked with ``fstat``: the same
    inode that was checked, a regular file. The folders are checked again after the open, so a
    component swapped for a link meanwhile is refused too. ``root`` itself is trusted (the user chose
    it; it may be a link).

    Raises:
        FileNotFoundError: a component does not exist.
        UnsafeCheckpointError: a component is a link, or not of the kind expected.
    """
    path = root
    folders: list[tuple[str, int, int]] = []
    for name in names[:-1]:
        path = os.path.join(path, name)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeCheckpointError(not_kind_message(path, st.st_mode, True))
        folders.append((path, st.st_dev, st.st_ino))
    path = os.path.join(path, names[-1])
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointError(not_kind_message(path, st.st_mode, False))
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise UnsafeCheckpointError(
                f"'{path}' changed into something else while it was opened; refused."
            ) from exc
        raise
    try:
        opened = os.fstat(fd)
        same = stat.S_ISREG(opened.st_mode) and (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino)
        for folder, dev, ino in folders:
            now = os.lstat(folder)
            same = same and stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (dev, ino)
        if not same:
            raise UnsafeCheckpointError(
                f"'{path}' changed while it was opened (a link or file swapped in); refused."
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
