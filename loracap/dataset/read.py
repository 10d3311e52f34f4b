"""Read a captioned dataset back, whatever layout loracap (or a trainer) wrote it in.

`read_dataset` pairs each image with its caption (a `CaptionRecord`) and lists what a trainer would trip
over: images with no caption, captions with no image (a renamed or deleted image leaves its caption behind,
and trainers ignore it silently), and caption files that could not be read. It reuses the stores' own key
functions and readers, so "has a caption" means exactly what `loracap caption --existing skip` means by it.

    sidecar     <stem><ext> next to each image
    jsonl       metadata.jsonl: {"file_name": "sub/a.jpg", "text": ...}, in the root and in each split folder
    kohya-json  meta_cap.json: {"/abs/path/sub/a.jpg": {"caption": ..., "tags": ...}}; the old relative keys
                ("sub/a") are read too, as the kohya store reads them
"""

from __future__ import annotations

import os
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from loracap.dataset.jsonl import METADATA_FILE as JSONL_FILE
from loracap.dataset.jsonl import (
    JsonlStore,
    jsonl_key,
    metadata_files,
    relative_posix,
    store_file_label,
    text_lines,
)
from loracap.dataset.kohya import METADATA_FILE as KOHYA_FILE
from loracap.dataset.kohya import KohyaJsonStore, kohya_key
from loracap.dataset.record import CaptionProblem, CaptionRecord
from loracap.dataset.sidecar import caption_path, normalize_ext, read_caption_file
from loracap.inputs.discover import find_images, walk_files

LAYOUTS = ("auto", "sidecar", "jsonl", "kohya-json")

__all__ = ["LAYOUTS", "Dataset", "detect_layout", "read_dataset"]


@dataclass
class Dataset:
    root: Path
    layout: str
    """The layout actually read: "sidecar", "jsonl" or "kohya-json" (never "auto")."""
    source: Path | None = None
    """The metadata file read (jsonl / kohya-json; for jsonl with split folders the root's file, or the
    first split's when there is none at the root); None for sidecar captions."""
    records: list[CaptionRecord] = field(default_factory=list)
    """Every captioned image, in find_images order. A caption that is empty or only whitespace is kept as
    "": the file or entry exists, and a trainer trains that image unconditioned, which the text checks
    flag."""
    missing: list[Path] = field(default_factory=list)
    """Images with no caption file or entry at all."""
    orphans: list[str] = field(default_factory=list)
    """Captions naming no existing image: sidecar files (relative path), jsonl file_name, kohya keys."""
    problems: list[CaptionProblem] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    """Every image found, in find_images order; an image whose caption is unreadable is in neither records
    nor missing. Kept so the image checks scan this same list instead of walking the folder again."""

    @property
    def pairs(self) -> list[tuple[Path, str]]:
        """(image, caption) of every record, in find_images order."""
        return [(record.image, record.text) for record in self.records]

    @property
    def captions(self) -> list[str]:
        return [record.text for record in self.records]

    @property
    def image_count(self) -> int:
        return len(self.images)


def detect_layout(root: Path, metadata_file: Path | None = None) -> str:
    """Which layout a folder uses: a metadata file wins over sidecar files, since when both exist the
    metadata file is the one a user pointed a jsonl/kohya trainer at; jsonl (in the root or in a split
    folder) is checked first."""
    if metadata_file is not None:
        return "kohya-json" if Path(metadata_file).suffix.lower() == ".json" else "jsonl"
    if metadata_files(Path(root)):
        return "jsonl"
    if (Path(root) / KOHYA_FILE).is_file():
        return "kohya-json"
    return "sidecar"


def read_dataset(
    root: str | Path,
    *,
    layout: str = "auto",
    ext: str = ".txt",
    metadata_file: str | Path | None = None,
    recursive: bool = True,
    kohya_field: str = "auto",
) -> Dataset:
    """Pair every image under `root` with its caption in `layout` (see module docstring).

    `ext` is the sidecar extension (".txt", ".caption"); `metadata_file` overrides metadata.jsonl /
    meta_cap.json in root. `kohya_field` is "caption", "tags" or "auto" (caption and tags joined as
    sd-scripts' fine-tuning dataset does). Raises only for a missing root or a bad argument; an unreadable
    caption becomes a `CaptionProblem`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if kohya_field not in ("auto", "caption", "tags"):
        raise ValueError(f"kohya_field must be 'auto', 'caption' or 'tags', not {kohya_field!r}")
    images = find_images(root, recursive)  # raises for a missing root, before anything else
    base = Path(os.path.abspath(root))
    meta = Path(metadata_file) if metadata_file is not None else None
    if layout == "auto":
        layout = detect_layout(base, meta)
    if layout == "sidecar":
        ds = _read_sidecar(base, images, normalize_ext(ext), recursive)
    elif layout == "jsonl":
        ds = _read_jsonl(base, images, meta)
    else:
        ds = _read_kohya(base, images, meta, kohya_field)
    ds.images = images
    return ds


# --- sidecar ------------------------------------------------------------------------------------------


def _read_sidecar(root: Path, images: list[Path], ext: str, recursive: bool) -> Dataset:
    ds = Dataset(root=root, layout="sidecar")
    claimed: set[str] = set()
    for image in images:
        path = caption_path(image, ext)
        claimed.add(os.path.normcase(str(path)))
        try:
            text = read_caption_file(path)
        except OSError as e:  # permission denied, a folder named a.txt: this image only
            ds.problems.append(CaptionProblem(store_file_label(path, root), f"unreadable: {e.strerror or e}"))
            continue
        if text is None:
            ds.missing.append(image)
        else:
            key = store_file_label(path, root)  # "sub/a.txt"
            ds.records.append(CaptionRecord(image, text.strip(), ds.layout, key, path))
    # Orphans: caption files in the folders find_images visits that no image claims. Hidden files are
    # skipped as discovery skips them (".DS_Store"-style junk is not a caption).
    for rel, entry in walk_files(root, recursive):
        name = entry.name
        if name.startswith(".") or os.path.splitext(name)[1].lower() != ext:
            continue
        if os.path.normcase(str(root.joinpath(*rel))) not in claimed:
            ds.orphans.append("/".join(rel))
    ds.orphans.sort()
    return ds


# --- metadata.jsonl -----------------------------------------------------------------------------------


def _read_jsonl(root: Path, images: list[Path], metadata_file: Path | None) -> Dataset:
    path = metadata_file or root / JSONL_FILE
    ds = Dataset(root=root, layout="jsonl", source=path)
    try:
        # The store warns about lines that are not JSON objects; here they are problems to report. It
        # opens the root's file and every split folder's, as `loracap caption` reads and writes them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = JsonlStore(root, path if metadata_file else None, flush_interval_s=float("inf"))
    except (OSError, ValueError) as e:  # ValueError: a folder or FIFO by that name
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        ds.problems.append(CaptionProblem(store_file_label(path, root), f"unreadable: {reason}"))
        ds.missing.extend(images)
        return ds
    if not path.is_file() and len(store.files) > 1:
        ds.source = list(store.files.values())[1].path
    # Every record of an image is one of its captions, as imagefolder trains every row (JsonlStore writes
    # alternatives so): they become the caption's lines. Keys and names are relative to root, whichever
    # file a record is in.
    texts: dict[str, list[object]] = {}
    names: dict[str, str] = {}
    sources: dict[str, Path] = {}
    for split, file in store.files.items():
        label = store_file_label(file.path, root)
        for number, _ in file.corrupt_lines:
            ds.problems.append(CaptionProblem(f"{label}:{number}", "not a JSON object"))
        for record in file.records:
            file_name = record.get("file_name")
            if not isinstance(file_name, str):
                ds.problems.append(CaptionProblem(label, f"record without a file_name: {_short(record)}"))
                continue
            key = jsonl_key(posixpath.join(split, file_name))
            texts.setdefault(key, []).append(record.get("text"))
            names.setdefault(key, key if split else file_name)
            sources.setdefault(key, file.path)
    seen: set[str] = set()
    for image in images:
        key = jsonl_key(relative_posix(image, root))
        seen.add(key)
        if key not in texts:
            ds.missing.append(image)
            continue
        odd = [t for t in texts[key] if not _is_text(t)]
        if odd:
            kind = type(odd[0]).__name__
            ds.problems.append(CaptionProblem(names[key], f"text is {kind}, not a string or a list of them"))
            continue
        lines = [line for t in texts[key] for line in text_lines(t)]
        ds.records.append(CaptionRecord(image, "\n".join(lines).strip(), ds.layout, key, sources[key]))
    for key, file_name in names.items():
        # Not discovered (hidden, non-recursive run) is not the same as not there: check the disk.
        if key not in seen and not (root / key).is_file():
            ds.orphans.append(file_name)
    return ds


def _is_text(value: object) -> bool:
    """A `text` a trainer can read: null (no caption), a string, or a list of strings (alternatives)."""
    if isinstance(value, list):
        return all(isinstance(item, str) for item in value)
    return value is None or isinstance(value, str)


# --- kohya meta_cap.json ------------------------------------------------------------------------------


def _read_kohya(root: Path, images: list[Path], metadata_file: Path | None, field_name: str) -> Dataset:
    path = metadata_file or root / KOHYA_FILE
    ds = Dataset(root=root, layout="kohya-json", source=path)
    try:
        # Old relative keys come back re-keyed to absolute paths when their image exists (KohyaJsonStore).
        entries = KohyaJsonStore(root, path).entries
    except (OSError, ValueError) as e:
        # One broken byte makes the whole JSON file unreadable (see KohyaJsonStore._load).
        ds.problems.append(CaptionProblem(store_file_label(path, root), str(e)))
        ds.missing.extend(images)
        return ds
    keys: set[str] = set()
    for image in images:
        key = kohya_key(image)
        keys.add(key)
        if key not in entries:
            ds.missing.append(image)
            continue
        text = _kohya_text(entries[key], field_name)
        if text is None:
            ds.problems.append(
                CaptionProblem(relative_posix(image, root), f"entry has no usable {field_name!r} text")
            )
        else:
            ds.records.append(CaptionRecord(image, text, ds.layout, key, path))
    for key in entries:
        # An image that was not discovered (hidden, non-recursive run) is still there for sd-scripts. A
        # relative key left is one whose image was not found: sd-scripts fails on it too.
        if key not in keys and not (os.path.isabs(key) and os.path.isfile(key)):
            ds.orphans.append(store_file_label(Path(key), root) if os.path.isabs(key) else key)
    return ds


def _kohya_text(entry: object, field_name: str) -> str | None:
    """The caption sd-scripts trains on for one entry; None when there is none it can use."""
    if not isinstance(entry, dict):
        return None
    caption, tags = entry.get("caption"), entry.get("tags")
    caption = caption.strip() if isinstance(caption, str) else None
    tags = tags.strip() if isinstance(tags, str) else None
    if field_name == "caption":
        return caption
    if field_name == "tags":
        return tags
    # sd-scripts' FineTuningDataset: the caption, then ", " and the tags when both are there; a caption of
    # several lines (alternatives, read with --enable_wildcard) gets the tags on each line.
    if caption is None:
        return tags
    if not tags:
        return caption
    return "\n".join(f"{line}, {tags}" for line in caption.split("\n") if line.strip())


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
