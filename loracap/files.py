"""Read the files a user's dataset folder holds without trusting what they are; write files atomically.

A dataset folder can hold a FIFO named `a.txt` (opening it blocks until a writer appears: forever), a
folder named `a.png`, a symlink to somewhere else. Every read of a user's image or caption goes through
`open_regular`: it never blocks and refuses anything that is not a regular file, with an OSError
whose `strerror` says what the entry is, so callers report it per file and go on.

Every write goes through `atomic_write_text` / `atomic_write_bytes`: a reader (or a crash) sees the old
file or the new one, never half of one. The new content goes to a hidden temp file in the same folder (so
`os.replace` is a rename within one file system), is flushed and fsynced, then renamed over the target. A
killed process can leave a `.loracap-*.tmp` behind; the run that starts next removes those (see
TEMP_PREFIX/TEMP_SUFFIX and `loracap.inputs.remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".loracap-"
TEMP_SUFFIX = ".tmp"


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


# --- atomic writes ----------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`: UTF-8, "\\n" newlines, no BOM."""
    path = Path(path)
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp, fd = _create_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _copy_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a Ctrl-C between the write and the rename must not leave the temp file.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp(folder: Path) -> tuple[Path, int]:
    # os.open with 0o666 lets the umask decide the permissions, as for any new file; tempfile.mkstemp
    # would create 0600 captions that a trainer running as another user (a container) cannot read.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # a 64-bit random name is taken: practically never, just try another
            continue


def _copy_mode(path: Path, tmp: Path) -> None:
    # Rewriting a caption keeps the permissions the user gave it.
    if os.name != "posix":
        return
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


class FlushClock:
    """When a store that rewrites a whole file should do it: at most every `interval_s` seconds.

    A crash then loses at most that much work, and a large metadata file is not rewritten per image.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval_s

    def reset(self) -> None:
        self.last = time.monotonic()
