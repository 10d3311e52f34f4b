"""Sidecar captions: `<image stem><ext>` next to each image (kohya sd-scripts, ai-toolkit, OneTrainer)."""

from __future__ import annotations

import codecs
import errno
import os
from pathlib import Path

from loracap.files import NotARegularFile, atomic_write_text, describe_os_error, read_regular_bytes

# A caption extension that is an image extension would overwrite the image with text.
_IMAGE_EXTS = frozenset(
    {
        ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif",
        ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ppm",
    }
)  # fmt: skip

# Longest BOMs first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def normalize_ext(ext: str) -> str:
    """Accept ".txt", "txt", ".CAPTION"; return a dotted lower-case extension. Refuse unsafe ones."""
    ext = ext.strip().lower()
    if not ext.startswith("."):
        ext = "." + ext
    if ext == "." or "/" in ext or "\\" in ext or ext.count(".") > 1:
        raise ValueError(f"bad caption extension {ext!r}: expected something like '.txt' or '.caption'")
    if ext in _IMAGE_EXTS:
        raise ValueError(f"caption extension {ext!r} is an image extension: captions would overwrite images")
    return ext


def caption_path(image: Path, ext: str = ".txt") -> Path:
    """Where the sidecar caption of `image` lives: a.jpg -> a.txt, a.b.png -> a.b.txt (as sd-scripts)."""
    return image.with_suffix(normalize_ext(ext))


class UnreadableCaption(OSError):
    """Something stands where a caption file would, but it cannot be read as one; never rewrite it from
    what could be read. `replaceable`: whether a new caption file could take its place at all (a folder
    cannot be replaced by a file, and a name too long for the file system cannot be written)."""

    @property
    def replaceable(self) -> bool:
        return self.errno not in (errno.EISDIR, errno.ENAMETOOLONG)


def read_caption_file(path: Path, root: Path | None = None) -> str | None:
    """The caption in `path`, None when there is no file at all.

    Raises UnreadableCaption (an OSError; its strerror says why) when the entry exists but is not a
    caption that can be read: a folder, FIFO or device; a broken symlink, or (given the dataset's
    `root`) one that leads out of the dataset; bytes that are not text (binary, NUL bytes, UTF-16
    without a BOM, Latin-1). The caller must leave such a file alone: rewriting it from what could be
    read would lose its real bytes. Other OSErrors (permission denied) propagate.
    """
    if root is not None and os.path.islink(path):
        target = os.path.realpath(path)
        if not Path(target).is_relative_to(os.path.realpath(root)):
            raise UnreadableCaption(errno.EXDEV, f"a symbolic link to {target}, outside the dataset folder")
    try:
        data = read_regular_bytes(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise UnreadableCaption(exc.errno, describe_os_error(path, exc)) from exc
        return None
    except OSError as exc:
        if isinstance(exc, NotARegularFile) or exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            raise UnreadableCaption(exc.errno, describe_os_error(path, exc)) from exc
        raise
    encoding = "utf-8"
    for bom, bom_encoding in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom) :], bom_encoding
            break
    try:
        text: str | None = data.decode(encoding)
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # a NUL: binary, or UTF-16 without a BOM that happens to decode
        raise UnreadableCaption(
            errno.EILSEQ, f"not {encoding} text: binary, or another encoding (UTF-16 without a BOM, Latin-1)"
        )
    return text


class SidecarStore:
    """One caption file per image; each write is atomic on its own, so flush has nothing to do."""

    def __init__(self, root: Path, ext: str = ".txt") -> None:
        self.root = Path(root)
        self.ext = normalize_ext(ext)
        self._failed: dict[str, str] = {}  # captions whose write failed, by target, for `unsaved`

    def path(self, image: Path) -> Path:
        return caption_path(Path(image), self.ext)

    def existing(self, image: Path) -> str | None:
        text = read_caption_file(self.path(image), self.root)
        return text.strip() if text and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        # No trailing newline: sd-scripts reads the first line, other trainers read the whole file and
        # not all of them strip it, so the bare caption is what every reader gets right.
        try:
            atomic_write_text(self.path(image), text.strip())
        except OSError:
            self._failed[self.target(image)] = text.strip()
            raise
        self._failed.pop(self.target(image), None)

    def unsaved(self) -> dict[str, str]:
        """Captions whose write failed: {caption file relative to the root: caption}."""
        return dict(self._failed)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def target(self, image: Path) -> str:
        # Relative to the root when inside it ("sub/a.txt"): short, and unambiguous in a summary.
        path = self.path(image)
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).as_posix()
        except ValueError:
            return path.as_posix()

    def __enter__(self) -> SidecarStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
