"""sd-scripts fine-tuning metadata: one JSON object {key: {"caption": text} or {"tags": text}}.

The key is the image's absolute path with its extension ("/data/set/sub/a.jpg"), as sd-scripts'
`finetune/merge_captions_to_metadata.py --full_path` writes it. It is the one key form that both
sd-scripts generations find (`--in_json`, library/train_util.py, FineTuningDataset):

    v0.9.x      an existing path is used as is, else it globs `<train_data_dir>/<key>.<image ext>`
    v0.10.0 on  (commit c6bc632) a relative key is joined to train_data_dir, an absolute one used as is:
                no glob, so an extension-less key names no file

Keys that loracap wrote before ("sub/a", relative, no extension) and relative keys with an extension are
re-keyed when the file is opened, if their image is found the way v0.9.x found it; the rewritten file then
loads in both. Absolute keys tie the file to where the dataset is: after moving the folder they name
nothing, and sd-scripts fails on them (v0.9.x: "no image", v0.10.x: a zero image size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loracap.dataset.jsonl import store_file_label
from loracap.files import FlushClock, atomic_write_text, describe_os_error, read_regular_bytes
from loracap.inputs.discover import supported_extensions

METADATA_FILE = "meta_cap.json"


def kohya_key(image: Path) -> str:
    """The key of an image: its absolute path with extension.

    The folder is resolved, so a dataset reached through a symlink ("/tmp" on macOS, a mounted data disk)
    has the same keys however its path was spelled; the file name is not, so a symlinked image stays
    itself.
    """
    folder, name = os.path.split(os.path.abspath(image))
    return os.path.join(os.path.realpath(folder), name)


def legacy_image(key: str, root: Path, listings: dict[Path, list[str]] | None = None) -> Path | None:
    """The image a relative key names, found as sd-scripts v0.9.x found it; None for an absolute key.

    "sub/a.jpg" is `root/sub/a.jpg`; "sub/a" is the first `root/sub/a.<image ext>` in sorted order (v0.9.x
    sorted its glob too, so this is the image it trained on). `listings` caches folder listings between
    calls: a file of thousands of old keys in one folder must not list that folder thousands of times.
    """
    if not key or os.path.isabs(key):
        return None
    path = Path(root, key)
    exts = supported_extensions()
    if path.suffix.lower() in exts and path.is_file():
        return path
    listings = {} if listings is None else listings
    if path.parent not in listings:
        try:
            listings[path.parent] = sorted(os.listdir(path.parent))
        except OSError:
            listings[path.parent] = []
    for name in listings[path.parent]:
        stem, ext = os.path.splitext(name)
        if stem == path.name and ext.lower() in exts and (path.parent / name).is_file():
            return path.parent / name
    return None


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
        loaded = self._load()
        self.entries: dict[str, Any] = self._rekey(loaded)
        self._clock = FlushClock(flush_interval_s)
        self._dirty = list(self.entries) != list(loaded)  # re-keyed: saved even if every image is skipped
        self._closed = False

    def _load(self) -> dict[str, Any]:
        try:
            text = read_regular_bytes(self.path).decode("utf-8-sig")
        except FileNotFoundError:
            return {}
        except OSError as exc:  # a folder or FIFO by that name
            raise ValueError(f"cannot read {self.path}: {describe_os_error(self.path, exc)}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path} is not UTF-8 ({exc}); fix it or move it away") from None
        # Unlike JSON lines, one broken byte makes the whole file unreadable, and rewriting it from
        # what could be salvaged would drop every entry: refuse and let the user fix or move it.
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.path} is not valid JSON ({e}); fix it or move it away") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} must hold a JSON object of image keys, not {type(data).__name__}")
        return data

    def _rekey(self, entries: dict[str, Any]) -> dict[str, Any]:
        # Every key that names an image becomes kohya_key(image): old relative keys, and absolute ones
        # spelled through a symlink. Order is kept, so the rewritten file diffs cleanly against the old one.
        out: dict[str, Any] = {}
        listings: dict[Path, list[str]] = {}
        for key, entry in entries.items():
            if os.path.isabs(key):  # the same image spelled through a symlink is found by its key too
                image = Path(key) if os.path.isfile(key) else None
            else:
                image = legacy_image(key, self.root, listings)
            new = key if image is None else kohya_key(image)
            if new not in out:
                out[new] = entry
            elif isinstance(out[new], dict) and isinstance(entry, dict):
                # Two keys for one image: the absolute key's fields win, an old key only adds what is missing.
                out[new] = {**out[new], **entry} if new == key else {**entry, **out[new]}
        return out

    def existing(self, image: Path) -> str | None:
        entry = self.entries.get(kohya_key(image))
        text = entry.get(self.field) if isinstance(entry, dict) else None
        return text.strip() if isinstance(text, str) and text.strip() else None

    def write(self, image: Path, text: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the caption store is closed")
        key = kohya_key(image)
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
        atomic_write_text(self.path, self.content())
        self._dirty = False

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def target(self, image: Path) -> str:
        return store_file_label(self.path, self.root)

    def content(self) -> str:
        return json.dumps(self.entries, indent=2, ensure_ascii=False) + "\n"

    def unsaved(self) -> dict[str, str]:
        """What is not on disk yet: {file label: its whole new content}, for saving elsewhere."""
        return {store_file_label(self.path, self.root): self.content()} if self._dirty else {}

    def __enter__(self) -> KohyaJsonStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
