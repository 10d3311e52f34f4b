"""Find the images in a folder tree.

Users point loracap at a folder that often also holds captions, OS junk (``.DS_Store``, ``__MACOSX``,
``Thumbs.db``) and leftovers of earlier runs, so discovery is deliberately conservative: only files with
a known image extension, nothing hidden, and symlinked folders are never entered (a link back up the
tree would otherwise loop forever).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from loracap.files import TEMP_PREFIX, TEMP_SUFFIX, open_regular  # TEMP_*: the atomic writes' temp-file names

log = logging.getLogger(__name__)

# Extensions Pillow always decodes. HEIC/HEIF/AVIF depend on optional decoders: see supported_extensions().
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif"})
AVIF_EXTENSIONS: frozenset[str] = frozenset({".avif"})

# Read in 1 MiB pieces: a RAW or 50 MP photo is hashed without holding the whole file in memory.
_HASH_CHUNK = 1 << 20

# Folders that are never part of a dataset even though their names are not hidden.
_SKIPPED_DIRS = frozenset({"__MACOSX"})


@functools.cache
def supported_extensions() -> frozenset[str]:
    """IMAGE_EXTENSIONS plus .heic/.heif/.avif when a decoder for them is installed.

    Cached: the answer cannot change within a process (an install needs a restart to be importable).
    """
    from PIL import features

    from loracap.inputs.decode import heif_available

    exts = set(IMAGE_EXTENSIONS)
    if heif_available():
        exts |= HEIF_EXTENSIONS
    # Pillow >= 11.2 decodes AVIF itself when built with libavif; pillow-heif 1.x dropped AVIF.
    if features.check("avif"):
        exts |= AVIF_EXTENSIONS
    return frozenset(exts)


def _check_root(root: str | Path) -> Path:
    # abspath rather than resolve(): keep the user's spelling of symlinked roots, so written captions
    # and error reports show the paths they know.
    path = Path(os.path.abspath(os.fspath(root)))
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a folder: {path}")
    return path


def walk_files(
    root: Path, recursive: bool, *, unreadable: bool = False
) -> Iterator[tuple[tuple[str, ...], os.DirEntry[str]]]:
    """Yield (relative path parts, entry) for every file, hidden ones included, in visible folders.

    Symlinks to files are yielded (entry.is_file() follows them); symlinked folders never are. With
    `unreadable`, so are the entries that stand where a file could but cannot be read as one (broken
    or looping symlinks, FIFOs, sockets, devices), for callers that report them rather than lose them.
    The root itself is always entered even if its own name is hidden (the user chose it).
    """
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            if not rel:
                raise  # the root itself being unreadable is the caller's problem, not a skipped folder
            log.warning("skipping unreadable folder %s: %s", folder, e)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and not entry.name.startswith(".") and entry.name not in _SKIPPED_DIRS:
                        stack.append((Path(entry.path), (*rel, entry.name)))
                elif entry.is_file() or (unreadable and not entry.is_dir()):
                    yield (*rel, entry.name), entry
            except OSError:  # a symlink loop; or vanished between listing and stat
                if unreadable and os.path.lexists(entry.path):
                    yield (*rel, entry.name), entry


def find_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Absolute paths of the images under ``root``, sorted by relative path.

    Extensions match in any letter case. Hidden files and folders (leading ".") and ``__MACOSX`` are
    skipped. Files are selected by extension only; whether they really decode is load_image's job,
    so that a bad file is reported per file instead of silently vanishing from the dataset: broken and
    looping symlinks and FIFOs with an image's name are listed too (a folder with one is a folder).
    """
    base = _check_root(root)
    exts = supported_extensions()
    found: list[tuple[tuple[str, ...], Path]] = []
    for rel, entry in walk_files(base, recursive, unreadable=True):
        name = entry.name
        if name.startswith("."):
            continue
        if os.path.splitext(name)[1].lower() in exts:
            found.append((rel, base.joinpath(*rel)))
    # Sorting the parts tuple (not the joined string) keeps each folder's files together and gives the
    # same order on every OS and every run, whatever order the filesystem lists them in.
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes. Raises OSError for a missing or unreadable file.

    One hasher for every check that identifies an image by its content (duplicate images, the CLIPScore
    cache), so a digest computed by one can be handed to the other instead of reading the file again.
    """
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(path: str | Path) -> str:
    """What `path` holds, as a string that changes when the file does: "sha256:<hex>" for a readable file;
    for an entry that cannot be read as one, what it is ("broken symlink to x.png", "fifo", the error), so
    a file that failed once is known again while it stays as it was, and retried once it changes."""
    try:
        return f"sha256:{file_sha256(path)}"
    except OSError as exc:
        if os.path.islink(path):
            try:
                return f"symlink to {os.readlink(path)}: {exc.strerror or exc}"
            except OSError:
                pass
        return f"unreadable: {exc.strerror or exc}"


def remove_stale_temp_files(root: str | Path, recursive: bool = True) -> int:
    """Delete ``.loracap-*.tmp`` files left by an interrupted run; return how many were removed.

    Only regular files matching that exact pattern are touched (a symlink with such a name is left
    alone), in the same folders find_images visits.
    """
    base = _check_root(root)
    removed = 0
    for _, entry in walk_files(base, recursive):
        name = entry.name
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another process got there first
        except OSError as e:
            log.warning("could not remove stale temp file %s: %s", entry.path, e)
            continue
        removed += 1
    return removed
