"""`metadata.jsonl` captions, the format `datasets.load_dataset("imagefolder", data_dir=root)` reads.

One JSON object per line: {"file_name": "sub/a.jpg", "text": "..."}, file_name relative to the folder the
file is in. Each file is kept in memory and rewritten atomically, at most every `flush_interval_s` seconds
and on close: appending line by line would be cheaper, but a crash mid-append leaves a partial line that
breaks `load_dataset`.

A caption of several lines (alternatives: `loracap caption --captions-per-image`) is one record per line,
each with the image's file_name: imagefolder makes an example of every record (datasets 5.x reads the
metadata row by row and never looks for a file_name seen before), so each caption trains once an epoch
and `text` stays a string column. A list under `text` would have to be a list in every record of every
metadata file (pyarrow fails on a column that changes type, imagefolder on files whose features differ),
and diffusers' DreamBooth scripts take a caption as one string; files that already hold lists are read as
alternatives and written as lists.

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


def text_lines(text: Any) -> list[str]:
    """The caption lines a record's `text` holds: a string's lines, or a list's strings (diffusers'
    text-to-image scripts draw one of a list); [] for anything else."""
    items = text if isinstance(text, list) else [text]
    return [line for item in items if isinstance(item, str) for line in item.split("\n")]


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
        self._index: dict[str, list[int]] = {}
        self._gone: set[int] = set()
        """ids of records a write dropped, still in `records` until the next flush."""
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
        # Every record of an image, in file order: the first is the one updated, and all of them are its
        # alternative captions (imagefolder trains each row).
        self._index = {}
        for i, record in enumerate(self.records):
            file_name = record.get("file_name")
            if isinstance(file_name, str):
                self._index.setdefault(jsonl_key(file_name), []).append(i)

    def record(self, file_name: str) -> dict[str, Any] | None:
        """The image's first record, None when it has none."""
        indices = self._index.get(jsonl_key(file_name))
        return self.records[indices[0]] if indices else None

    def records_of(self, file_name: str) -> list[dict[str, Any]]:
        """Every record of the image, in file order."""
        return [self.records[i] for i in self._index.get(jsonl_key(file_name), [])]

    def text(self, file_name: str) -> str | None:
        """The image's caption: its records' texts (a list's items too), a line each; None without one."""
        lines = [line for record in self.records_of(file_name) for line in text_lines(record.get("text"))]
        return "\n".join(lines) if lines else None

    @property
    def list_texts(self) -> bool:
        """Whether this file's `text` column holds lists, which then every record it writes must too."""
        return any(isinstance(record.get("text"), list) for record in self.records)

    def set_text(self, file_name: str, text: str, *, as_list: bool = False) -> None:
        """The image's caption: one record per line (`as_list`: one record, its lines as a list). Its records
        are rewritten in place (the first keeps its other fields and their order, and the others copy them),
        more go at the end of the file and fewer leave it: no write moves the rest of the file."""
        lines = text.split("\n") if text else [text]
        values: list[Any] = [lines] if as_list else lines
        mine = self.records_of(file_name)
        if not mine:
            for value in values:
                self.add({"file_name": file_name, "text": value})
            return
        first = mine[0]
        first["text"] = values[0]
        for record, value in zip(mine[1:], values[1:], strict=False):
            record.clear()
            record.update({**first, "text": value})  # the same fields: the same features
        for value in values[len(mine) :]:
            self.add({**first, "text": value})
        self._drop(file_name, mine[len(values) :])
        self.dirty = True

    def _drop(self, file_name: str, records: list[dict[str, Any]]) -> None:
        # Left out of the index and the content now, out of `records` at the next flush: removing them from
        # the list at every write would make rewriting a large file's captions quadratic.
        if not records:
            return
        self._gone.update(id(r) for r in records)
        key = jsonl_key(file_name)
        self._index[key] = [i for i in self._index[key] if id(self.records[i]) not in self._gone]

    def add(self, record: dict[str, Any]) -> None:
        self._index.setdefault(jsonl_key(record["file_name"]), []).append(len(self.records))
        self.records.append(record)
        self.dirty = True

    def remove(self, records: list[dict[str, Any]]) -> None:
        gone = {id(r) for r in records}
        self.records = [r for r in self.records if id(r) not in gone]
        self._reindex()
        self.dirty = True

    def content(self) -> str:
        kept = (record for record in self.records if id(record) not in self._gone)
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)

    def flush(self) -> None:
        if self._gone:
            self.remove([r for r in self.records if id(r) in self._gone])
            self._gone.clear()
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
        # Read once: scanning every record at every write would make a large dataset's run quadratic.
        self.list_texts = any(f.list_texts for f in self.files.values())
        """Whether the dataset's files hold lists under `text` (then new captions are lists too)."""

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
        arrived: set[tuple[str, str]] = set()  # images whose records this move brought (all of them come)
        for record in main.records:
            file_name = record.get("file_name")
            split, inner = split_of(file_name) if isinstance(file_name, str) else ("", "")
            if split:
                moved.append(record)
                image = (split, jsonl_key(inner))
                if image in arrived or self._file(split).record(inner) is None:
                    arrived.add(image)
                    self._file(split).add({**record, "file_name": inner})
        if moved:
            main.remove(moved)

    def _locate(self, image: Path) -> tuple[JsonlFile, str]:
        rel = relative_posix(image, self.root)
        split, inner = split_of(rel) if self.per_split else ("", rel)
        return self._file(split), inner

    def existing(self, image: Path) -> str | None:
        file, file_name = self._locate(image)
        text = file.text(file_name)
        return text.strip() if text and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        """A caption of several lines becomes a record per line (see the module docstring), or one record
        with a list where the dataset's files already hold lists (imagefolder needs one type throughout)."""
        if self._closed:
            raise ValueError(f"{self.path}: the caption store is closed")
        file, file_name = self._locate(image)
        file.set_text(file_name, text.strip(), as_list=self.list_texts)
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
