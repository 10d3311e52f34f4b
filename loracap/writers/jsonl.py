"""`metadata.jsonl` captions, the format `datasets.load_dataset("imagefolder", data_dir=root)` reads.

One JSON object per line: {"file_name": "sub/a.jpg", "text": "..."}. The whole file is kept in memory
and rewritten atomically, at most every `flush_interval_s` seconds and on close: appending line by
line would be cheaper, but a crash mid-append leaves a partial line that breaks `load_dataset`.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import warnings
from pathlib import Path
from typing import Any

from loracap.writers.atomic import FlushClock, atomic_write_bytes, atomic_write_text

METADATA_FILE = "metadata.jsonl"


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


class JsonlStore:
    def __init__(self, root: Path, metadata_file: Path | None = None, flush_interval_s: float = 5.0) -> None:
        self.root = Path(root)
        self.path = Path(metadata_file) if metadata_file else self.root / METADATA_FILE
        self.records: list[dict[str, Any]] = []
        self.corrupt_lines: list[tuple[int, str]] = []
        """(line number, text) of lines that were not JSON objects; they are not written back."""
        self._index: dict[str, int] = {}
        self._clock = FlushClock(flush_interval_s)
        self._dirty = False
        self._closed = False
        self._original: bytes | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
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
            file_name = record.get("file_name")
            # The first record of an image is the one read and updated; a duplicate stays as it is.
            if isinstance(file_name, str) and jsonl_key(file_name) not in self._index:
                self._index[jsonl_key(file_name)] = len(self.records)
            self.records.append(record)
        if self.corrupt_lines:
            self._original = data
            lines = ", ".join(str(n) for n, _ in self.corrupt_lines)
            warnings.warn(
                f"{self.path}: skipped {len(self.corrupt_lines)} line(s) that are not JSON objects "
                f"(line {lines}; a partial last line is what an interrupted writer leaves). They will be "
                f"left out when the file is rewritten; the original is saved next to it first.",
                stacklevel=3,
            )

    def _file_name(self, image: Path) -> str:
        return relative_posix(image, self.root)

    def existing(self, image: Path) -> str | None:
        index = self._index.get(jsonl_key(self._file_name(image)))
        text = self.records[index].get("text") if index is not None else None
        return text.strip() if isinstance(text, str) and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the caption store is closed")
        file_name = self._file_name(image)
        index = self._index.get(jsonl_key(file_name))
        if index is None:
            self._index[jsonl_key(file_name)] = len(self.records)
            self.records.append({"file_name": file_name, "text": text.strip()})
        else:
            self.records[index]["text"] = text.strip()  # other fields and their order stay
        self._dirty = True
        if self._clock.due():
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        # Reset before writing: if the folder is read-only, the next write retries after the interval
        # instead of failing (and reporting) every image in between.
        self._clock.reset()
        if self._original is not None:
            backup = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
            atomic_write_bytes(backup, self._original)
            self._original = None
        lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in self.records)
        atomic_write_text(self.path, "".join(lines))
        self._dirty = False

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def target(self, image: Path) -> str:
        return store_file_label(self.path, self.root)

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
