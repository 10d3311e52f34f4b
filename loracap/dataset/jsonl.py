"""`metadata.jsonl` captions, the format `datasets.load_dataset("imagefolder", data_dir=root)` reads.

One JSON object per line: {"file_name": "sub/a.jpg", "text": "..."}, file_name relative to the folder the
file is in. Each file is kept in memory and rewritten atomically, at most every `flush_interval_s` seconds
and on close: appending line by line would be cheaper, but a crash mid-append leaves a partial line that
breaks `load_dataset`.

A dataset with split folders (train/, test/, ...) gets one file per split folder: imagefolder reads a split
only from the metadata files inside that split's folders, and a root file next to them is dropped together
with its "text" column, without a word. An explicit `metadata_file` is always the one file written.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
import warnings
from pathlib import Path
from typing import Any

from loracap.files import (
    FlushClock,
    atomic_write_bytes,
    atomic_write_text,
    describe_os_error,
    read_regular_bytes,
)

METADATA_FILE = "metadata.jsonl"

# How datasets' imagefolder recognises a split folder (datasets/data_files.py: SPLIT_KEYWORDS and
# KEYWORDS_IN_DIR_NAME_BASE_PATTERNS, "**/{keyword}[{sep}]*/**" and the like, sep = "-._ 0-9"): a folder, at
# any depth, named for a split keyword alone or joined to other words by one of those characters
# ("test", "train-2024", "my_val"); case matters ("Train" is not a split).
SPLIT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_KEYWORDS = "|".join(k for keywords in SPLIT_KEYWORDS.values() for k in keywords)
_SPLIT_FOLDER = re.compile(rf"(?:.*[-._ 0-9])?(?:{_KEYWORDS})(?:[-._ 0-9].*)?")
_SKIPPED_DIRS = ["__MACOSX"]  # as image discovery (loracap.inputs.discover) skips it


def is_split_folder(name: str) -> bool:
    """Whether datasets' imagefolder makes a split of a folder with this name (hidden ones it skips)."""
    return not name.startswith(".") and _SPLIT_FOLDER.fullmatch(name) is not None


def split_of(file_name: str) -> tuple[str, str]:
    """("train", "sub/a.jpg") for "train/sub/a.jpg": the outermost split folder of a path relative to the
    dataset folder and the path inside it; ("", file_name) outside split folders (or the dataset folder)."""
    key = jsonl_key(file_name)
    parts = key.split("/")
    if parts[0] in ("", ".."):  # "/abs/train/a.jpg", "../train/a.jpg": not in this dataset's split folders
        return "", key
    for i, name in enumerate(parts[:-1]):
        if is_split_folder(name):
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
    return "", key


def metadata_files(root: Path) -> list[Path]:
    """The metadata.jsonl files of a dataset as loracap writes them: the root's, then one per split folder."""
    root = Path(root)
    found = [root / METADATA_FILE] if (root / METADATA_FILE).is_file() else []
    for folder, dirs, _ in os.walk(root):
        splits = sorted(d for d in dirs if is_split_folder(d))
        found += [p for d in splits if (p := Path(folder, d, METADATA_FILE)).is_file()]
        # Hidden folders hold no images loracap finds; a split's own subfolders belong to that split.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS + splits)
    return found


def relative_posix(image: Path, root: Path) -> str:
    """`image` relative to `root` as a POSIX path ("sub/a.jpg"); ValueError when it is outside root.

    abspath, not resolve: a symlinked image inside the dataset stays where the dataset sees it.
    """
    try:
        rel = Path(os.path.abspath(image)).relative_to(os.path.abspath(root))
    except ValueError:
        raise ValueError(f"{image} is not inside the dataset folder {root}") from None
    return rel.as_posix()


def store_file_label(path: Path, root: Path) -> str:
    """How messages name a store's file: relative to the root when inside it ("metadata.jsonl")."""
    try:
        return relative_posix(path, root)
    except ValueError:
        return str(path)


def jsonl_key(file_name: str) -> str:
    # datasets normalises file_name the same way, so "./a.jpg" and "a.jpg" are one image.
    return posixpath.normpath(file_name.replace("\\", "/"))


class JsonlFile:
    """One metadata.jsonl, whose file_name values are relative to `base`."""

    def __init__(self, path: Path, base: Path) -> None:
        self.path = Path(path)
        self.base = Path(base)
        self.records: list[dict[str, Any]] = []
        self.corrupt_lines: list[tuple[int, str]] = []
        """(line number, text) of lines that were not JSON objects; they are not written back."""
        self.dirty = False
        self._index: dict[str, int] = {}
        self._original: bytes | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = read_regular_bytes(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:  # a folder or FIFO by that name: there is no metadata to keep or rewrite
            raise ValueError(f"cannot read {self.path}: {describe_os_error(self.path, exc)}") from None
        for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                record = None
            if not isinstance(record, dict):
                self.corrupt_lines.append((number, raw.decode("utf-8", errors="replace")))
                continue
            self.records.append(record)
        self._reindex()
        if self.corrupt_lines:
            self._original = data
            lines = ", ".join(str(n) for n, _ in self.corrupt_lines)
            warnings.warn(
                f"{self.path}: skipped {len(self.corrupt_lines)} line(s) that are not JSON objects "
                f"(line {lines}; a partial last line is what an interrupted writer leaves). They will be "
                f"left out when the file is rewritten; the original is saved next to it first.",
                stacklevel=5,
            )

    def _reindex(self) -> None:
        # The first record of an image is the one read and updated; a duplicate stays as it is.
        self._index = {}
        for i, record in enumerate(self.records):
            file_name = record.get("file_name")
            if isinstance(file_name, str):
                self._index.setdefault(jsonl_key(file_name), i)

    def record(self, file_name: str) -> dict[str, Any] | None:
        index = self._index.get(jsonl_key(file_name))
        return self.records[index] if index is not None else None

    def set_text(self, file_name: str, text: str) -> None:
        record = self.record(file_name)
        if record is None:
            self.add({"file_name": file_name, "text": text})
        else:
            record["text"] = text  # other fields and their order stay
            self.dirty = True

    def add(self, record: dict[str, Any]) -> None:
        self._index.setdefault(jsonl_key(record["file_name"]), len(self.records))
        self.records.append(record)
        self.dirty = True

    def remove(self, records: list[dict[str, Any]]) -> None:
        gone = {id(r) for r in records}
        self.records = [r for r in self.records if id(r) not in gone]
        self._reindex()
        self.dirty = True

    def content(self) -> str:
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in self.records)

    def flush(self) -> None:
        if not self.dirty:
            return
        if self._original is not None:
            backup = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
            atomic_write_bytes(backup, self._original)
            self._original = None
        if self.records:
            atomic_write_text(self.path, self.content())
        else:  # every record moved to a split folder's file: an empty root file would only mislead
            self.path.unlink(missing_ok=True)
        self.dirty = False


class JsonlStore:
    """The metadata.jsonl files of one dataset folder: the root's and one per split folder (see above)."""

    def __init__(self, root: Path, metadata_file: Path | None = None, flush_interval_s: float = 5.0) -> None:
        self.root = Path(root)
        self.path = Path(metadata_file) if metadata_file else self.root / METADATA_FILE
        """The root's file, or the one `metadata_file` named."""
        self.per_split = metadata_file is None
        self.files: dict[str, JsonlFile] = {}
        """Open files by split folder ("" for the root's or the named one), root first."""
        self._clock = FlushClock(flush_interval_s)
        self._closed = False
        main = self._file("")
        if self.per_split:
            for path in metadata_files(self.root):
                if path.parent != self.root:
                    self._file(relative_posix(path.parent, self.root))
            self._move_split_records(main)

    def _file(self, split: str) -> JsonlFile:
        if split not in self.files:
            base = self.root / split if split else self.root
            self.files[split] = JsonlFile(base / METADATA_FILE if split else self.path, base)
        return self.files[split]

    def _move_split_records(self, main: JsonlFile) -> None:
        # A root file from an earlier loracap (or by hand) may list images in split folders, which
        # imagefolder then never reads: their records move to the split's file. The split file's own
        # record of an image, if any, is the one trainers read, so it wins.
        moved = []
        for record in main.records:
            file_name = record.get("file_name")
            split, inner = split_of(file_name) if isinstance(file_name, str) else ("", "")
            if split:
                moved.append(record)
                if self._file(split).record(inner) is None:
                    self._file(split).add({**record, "file_name": inner})
        if moved:
            main.remove(moved)

    def _locate(self, image: Path) -> tuple[JsonlFile, str]:
        rel = relative_posix(image, self.root)
        split, inner = split_of(rel) if self.per_split else ("", rel)
        return self._file(split), inner

    def existing(self, image: Path) -> str | None:
        file, file_name = self._locate(image)
        record = file.record(file_name)
        text = record.get("text") if record is not None else None
        return text.strip() if isinstance(text, str) and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the caption store is closed")
        file, file_name = self._locate(image)
        file.set_text(file_name, text.strip())
        if self._clock.due():
            self.flush()

    def flush(self) -> None:
        # Reset before writing: if the folder is read-only, the next write retries after the interval
        # instead of failing (and reporting) every image in between.
        if any(file.dirty for file in self.files.values()):
            self._clock.reset()
        for file in self.files.values():
            file.flush()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def target(self, image: Path) -> str:
        return store_file_label(self._locate(image)[0].path, self.root)

    def unsaved(self) -> dict[str, str]:
        """What is not on disk yet: {file label: its whole new content}, for saving elsewhere."""
        return {store_file_label(f.path, self.root): f.content() for f in self.files.values() if f.dirty}

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
