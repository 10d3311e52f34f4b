"""Bulk edits of captions and their undo log.

An operation maps one caption to its new text (`apply_op`); `preview` shows every change before anything
is written; `write_changes` writes them through the dataset's store, skipping captions changed on disk
since the index read them (those are returned as conflicts, never overwritten), and logs the change in
DIR/.loracap/undo.jsonl (one JSON line per edit, and one per undo), so `undo` works after a restart: it
puts back the old text of the newest edit not yet undone, wherever the file still holds that edit's text.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracap.postprocess import PostProcess, postprocess, split_tags

__all__ = ["OPS", "BulkOp", "UndoLog", "apply_op"]

OPS = ("add_tag", "remove_tag", "replace_tag", "regex", "prepend", "append", "set_trigger")
MAX_PATTERN = 500
"""Longest regex pattern accepted: a bulk edit is one request, and must not be able to stall the server."""


@dataclass(frozen=True)
class BulkOp:
    kind: str
    tag: str = ""
    old: str = ""
    new: str = ""
    pattern: str = ""
    replacement: str = ""
    text: str = ""
    trigger: str = ""

    def check(self) -> None:
        """ValueError, one line, for an operation that cannot run."""
        if self.kind not in OPS:
            raise ValueError(f"unknown operation {self.kind!r}; one of {', '.join(OPS)}")
        needs = {"add_tag": "tag", "remove_tag": "tag", "replace_tag": "old", "regex": "pattern",
                 "prepend": "text", "append": "text", "set_trigger": "trigger"}  # fmt: skip
        if not getattr(self, needs[self.kind]).strip():
            raise ValueError(f"{self.kind} needs {needs[self.kind]}")
        if self.kind == "regex":
            if len(self.pattern) > MAX_PATTERN:
                raise ValueError(f"the pattern is longer than {MAX_PATTERN} characters")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression: {exc}") from None

    def describe(self) -> str:
        details = {"add_tag": self.tag, "remove_tag": self.tag, "replace_tag": f"{self.old} -> {self.new}",
                   "regex": f"/{self.pattern}/ -> {self.replacement}", "prepend": self.text,
                   "append": self.text, "set_trigger": self.trigger}  # fmt: skip
        return f"{self.kind} {details[self.kind]}"


def apply_op(op: BulkOp, caption: str | None, *, tags: bool) -> str:
    """The caption after `op` (tag operations treat it as comma-separated tags)."""
    text = caption or ""
    if op.kind in ("add_tag", "remove_tag", "replace_tag"):
        parts = split_tags(text)
        if op.kind == "add_tag":
            parts = parts if op.tag.strip() in parts else [*parts, op.tag.strip()]
        elif op.kind == "remove_tag":
            parts = [p for p in parts if p != op.tag.strip()]
        else:
            new = op.new.strip()
            parts = list(dict.fromkeys(new if p == op.old.strip() else p for p in parts if p or new))
            parts = [p for p in parts if p]
        return ", ".join(parts)
    if op.kind == "regex":
        return re.sub(op.pattern, op.replacement, text)
    if op.kind == "prepend":
        return f"{op.text}{text}"
    if op.kind == "append":
        return f"{text}{op.text}"
    # The trigger rule `loracap caption --trigger` writes by: first, never twice.
    return postprocess(text, PostProcess(trigger=op.trigger.strip(), strip_boilerplate=False), tags=tags)


class UndoLog:
    """DIR/.loracap/undo.jsonl: {"id", "when", "what", "changes": [{"path", "before", "after"}]} per edit,
    {"undo": id} per undo."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "undo.jsonl"

    def record(self, what: str, changes: list[dict[str, Any]]) -> str:
        entry_id = uuid.uuid4().hex[:12]
        entry = {"id": entry_id, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what, "changes": changes}
        self._append(entry)
        return entry_id

    def mark_undone(self, entry_id: str) -> None:
        self._append({"undo": entry_id})

    def entries(self) -> list[dict[str, Any]]:
        """Every edit, newest first, with `undone` set."""
        edits, undone = [], set()
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: the rest of the log still counts
            if "undo" in item:
                undone.add(item["undo"])
            elif "id" in item:
                edits.append(item)
        return [{**e, "undone": e["id"] in undone} for e in reversed(edits)]

    def newest_open(self) -> dict[str, Any] | None:
        return next((e for e in self.entries() if not e["undone"]), None)

    def _append(self, item: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
