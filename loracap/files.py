"""Open the files a user's dataset folder holds without trusting what they are.

A dataset folder can hold a FIFO named `a.txt` (opening it blocks until a writer appears: forever), a
folder named `a.png`, a symlink to somewhere else. Every read of a user's image or caption goes through
`open_regular`: it never blocks and refuses anything that is not a regular file, with an OSError
whose `strerror` says what the entry is, so callers report it per file and go on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotARegularFile(OSError):
    """The path exists but is a FIFO, socket, device or folder: there is nothing to read as a file."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (or a symlink to one).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is then
    checked on the open descriptor, so a file swapped for a FIFO in between cannot slip through.
    Raises NotARegularFile, or the OSError the open gave (FileNotFoundError, PermissionError, ELOOP).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
            raise NotARegularFile(code, f"{_kind(mode)}, not a file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file; the OSErrors of `open_regular` otherwise."""
    with open_regular(path) as f:
        return f.read()


def describe_os_error(path: str | Path, exc: OSError) -> str:
    """One short reason for a failed read, naming what the entry really is where that helps."""
    if isinstance(exc, NotARegularFile):
        return exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long for the file system"
    return exc.strerror or str(exc)
