"""sd-scripts fine-tuning metadata: one JSON object {key: {"caption": text} or {"tags": text}}.

The key is the image path relative to the dataset folder, POSIX, without extension ("a", "sub/a").
sd-scripts' fine-tuning dataset finds the image by globbing `<train_data_dir>/<key>.<image ext>`,
so a subfolder key works, and the file written here is what its `--in_json` option reads.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from loracap.writers.atomic import FlushClock, atomic_write_text
from loracap.writers.jsonl import relative_posix, store_file_label

METADATA_FILE = "meta_cap.json"


def kohya_key(image: Path, root: Path) -> str:
    """The key of an image: "sub/a.jpg" under root -> "sub/a"; ValueError when it is outside root."""
    return posixpath.splitext(relative_posix(image, root))[0]


class KohyaJsonStore:
    def __init__(
        self,
        root: Path,
        metadata_file: Path | None = None,
        tags: bool = False,
        flush_interval_s: float = 5.0,
    ) -> None:
        self.root = Path(root)
        self.path = Path(metadata_file) if metadata_file else self.root / METADATA_FILE
        # sd-scripts keeps captions and tags side by side in one entry; a tagger run writes "tags" and
        # leaves an earlier "caption" alone, and the other way round.
        self.field = "tags" if tags else "caption"
        self.entries: dict[str, Any] = self._load()
        self._clock = FlushClock(flush_interval_s)
        self._dirty = False
        self._closed = False

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return {}
        # Unlike JSON lines, one broken byte makes the whole file unreadable, and rewriting it from
        # what could be salvaged would drop every entry: refuse and let the user fix or move it.
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.path} is not valid JSON ({e}); fix it or move it away") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} must hold a JSON object of image keys, not {type(data).__name__}")
        return data

    def existing(self, image: Path) -> str | None:
        entry = self.entries.get(kohya_key(image, self.root))
        text = entry.get(self.field) if isinstance(entry, dict) else None
        return text.strip() if isinstance(text, str) and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the caption store is closed")
        key = kohya_key(image, self.root)
        entry = self.entries.get(key)
        if not isinstance(entry, dict):
            entry = self.entries[key] = {}
        entry[self.field] = text.strip()  # other fields ("tags", "train_resolution") stay
        self._dirty = True
        if self._clock.due():
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        self._clock.reset()  # see JsonlStore.flush
        atomic_write_text(self.path, json.dumps(self.entries, indent=2, ensure_ascii=False) + "\n")
        self._dirty = False

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def target(self, image: Path) -> str:
        return store_file_label(self.path, self.root)

    def __enter__(self) -> KohyaJsonStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
