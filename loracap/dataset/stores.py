"""Caption stores: where captions are read from and written to.

The pipeline asks a store whether an image already has a caption and hands it new ones. Every file
is written atomically (see `loracap.files.atomic_write_text`), so an interrupted run never leaves a
half-written caption.

    sidecar     <stem>.txt (or .caption) next to each image: kohya sd-scripts, ai-toolkit, OneTrainer
    jsonl       metadata.jsonl in the dataset folder, or one per split folder (train/, test/): HF datasets
                "imagefolder", diffusers scripts
    kohya-json  meta_cap.json keyed by absolute image path: sd-scripts fine-tuning metadata (--in_json)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Protocol

from loracap.dataset.jsonl import JsonlStore
from loracap.dataset.kohya import KohyaJsonStore
from loracap.dataset.sidecar import SidecarStore, caption_path, normalize_ext

FORMATS = ("sidecar", "jsonl", "kohya-json")

__all__ = ["FORMATS", "CaptionStore", "open_store", "sidecar_collisions"]


class CaptionStore(Protocol):
    def existing(self, image: Path) -> str | None:
        """The current caption, stripped; None when there is none or it is only whitespace. OSError
        (sidecar.UnreadableCaption among them) when something is there that cannot be read as one."""

    def write(self, image: Path, text: str) -> None:
        """Store a caption (stripped). OSError (read-only folder, disk full) leaves the store usable."""

    def flush(self) -> None:
        """Persist pending writes now, atomically."""

    def close(self) -> None:
        """Flush; calling it again does nothing."""

    def target(self, image: Path) -> str:
        """Where this image's caption lives, for messages: "sub/a.txt", "metadata.jsonl"."""

    def unsaved(self) -> dict[str, str]:
        """What could not be written: {file relative to the root: its content}, to be saved elsewhere."""


def open_store(
    fmt: str,
    root: Path,
    *,
    ext: str = ".txt",
    metadata_file: Path | None = None,
    tags: bool = False,
    flush_interval_s: float = 5.0,
) -> CaptionStore:
    """Open the caption store for `fmt` over the dataset folder `root`.

    `ext` is for sidecar files; `metadata_file` overrides metadata.jsonl / meta_cap.json in root (for
    jsonl it is then the one file, not one per split folder);
    `tags` makes kohya-json write the "tags" field instead of "caption".
    """
    root = Path(root)
    if fmt == "sidecar":
        return SidecarStore(root, ext)
    if fmt == "jsonl":
        return JsonlStore(root, metadata_file, flush_interval_s)
    if fmt == "kohya-json":
        return KohyaJsonStore(root, metadata_file, tags, flush_interval_s)
    raise ValueError(f"unknown caption format {fmt!r}: expected one of {', '.join(FORMATS)}")


def sidecar_collisions(images: Iterable[Path], ext: str = ".txt") -> dict[Path, list[Path]]:
    """Caption files that two or more images would share (a.jpg and a.png -> a.txt).

    Compared case-insensitively: a.jpg and A.png write a.txt and A.txt, two files on Linux but one on
    Windows and macOS, where datasets are often copied to train. Reported either way, so a dataset that
    works here does not silently lose captions there. jsonl file names and kohya-json keys keep the
    extension, so those formats have no such clash.
    """
    ext = normalize_ext(ext)
    groups = _collisions(images, lambda image: caption_path(Path(os.path.abspath(image)), ext))
    return {caption_path(Path(group[0]), ext): group for group in groups}


def _collisions(images: Iterable[Path], target: Callable[[Path], Hashable]) -> list[list[Path]]:
    by_target: dict[str, list[Path]] = {}
    seen: set[str] = set()
    for image in images:
        image = Path(image)
        same_image = os.path.abspath(image)
        if same_image in seen:  # one image listed twice is not a collision
            continue
        seen.add(same_image)
        by_target.setdefault(str(target(image)).casefold(), []).append(image)
    return [group for group in by_target.values() if len(group) > 1]
