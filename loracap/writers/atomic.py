"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

The new content goes to a hidden temp file in the same folder (so `os.replace` is a rename within one
file system), is flushed and fsynced, then renamed over the target. A killed process can leave a
`.loracap-*.tmp` behind; the run that starts next removes those (see TEMP_PREFIX/TEMP_SUFFIX).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

TEMP_PREFIX = ".loracap-"
TEMP_SUFFIX = ".tmp"


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
