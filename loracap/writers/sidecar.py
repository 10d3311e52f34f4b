"""Sidecar captions: `<image stem><ext>` next to each image (kohya sd-scripts, ai-toolkit, OneTrainer)."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

from loracap.writers.atomic import atomic_write_text

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


def read_caption_file(path: Path) -> str | None:
    """The caption in `path`, None when the file is missing.

    Never None for a file that exists but decodes badly: the caller would take that as "no caption"
    and overwrite it. Bad bytes become U+FFFD instead. Other OSErrors (permission denied) propagate.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace")
    return data.decode("utf-8", errors="replace")


class SidecarStore:
    """One caption file per image; each write is atomic on its own, so flush has nothing to do."""

    def __init__(self, root: Path, ext: str = ".txt") -> None:
        self.root = Path(root)
        self.ext = normalize_ext(ext)

    def path(self, image: Path) -> Path:
        return caption_path(Path(image), self.ext)

    def existing(self, image: Path) -> str | None:
        text = read_caption_file(self.path(image))
        return text.strip() if text and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        # No trailing newline: sd-scripts reads the first line, other trainers read the whole file and
        # not all of them strip it, so the bare caption is what every reader gets right.
        atomic_write_text(self.path(image), text.strip())

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
