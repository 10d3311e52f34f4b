"""The editor's index of a dataset: every image and its caption in SQLite, under DIR/.loracap/.

    DIR/.loracap/index.sqlite   images(id, path, mtime, size, caption, cap_mtime, tokens, proposal),
                                tags(image_id, tag): what the grid pages, searches and filters
    DIR/.loracap/thumbs/        WebP thumbnails, made when first asked for

Built incrementally: a start walks the folder and reads again only the captions whose image or caption
file changed since the index last saw them (sidecars by their own mtime, a metadata.jsonl / kohya JSON
as one file), in sorted path order, committing every few thousand rows, so the first page can be served
while a big dataset is still being indexed. Ids are stable while a path stays in the index.

Captions are read and written through loracap's dataset stores (`loracap.dataset.open_store`), in the
dataset's own layout; the index is a cache of them and is never the source of truth: a save compares
with what is on disk now, through a fresh store (`Index.store`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracap.dataset import caption_path, detect_layout, open_store
from loracap.inputs import find_images
from loracap.postprocess import looks_like_tags, split_tags

log = logging.getLogger(__name__)

__all__ = ["FLAGS", "Index", "Query"]

FOLDER = ".loracap"
FLAGS = ("no-caption", "truncated", "fused-trigger", "duplicate", "low-clip")
_BATCH = 2000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, mtime REAL, size INTEGER,
    caption TEXT, cap_mtime REAL, tokens INTEGER, proposal TEXT, clip REAL, fused INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tags (image_id INTEGER NOT NULL, tag TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
CREATE INDEX IF NOT EXISTS tags_by_image ON tags(image_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True)
class Query:
    """A selection of the dataset: caption substring, tags it has all of, tags it has none of, a flag."""

    q: str = ""
    tags: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    flag: str = ""


class Index:
    """The SQLite index of one dataset folder (see the module docstring). Thread-safe: one connection
    per thread, writes serialised."""

    def __init__(
        self,
        root: Path,
        *,
        layout: str = "auto",
        ext: str = ".txt",
        metadata_file: Path | None = None,
        max_tokens: int = 77,
    ) -> None:
        self.root = Path(root).resolve()
        self.folder = self.root / FOLDER
        self.folder.mkdir(exist_ok=True)
        self.layout = detect_layout(self.root, metadata_file) if layout == "auto" else layout
        self.ext, self.metadata_file, self.max_tokens = ext, metadata_file, max_tokens
        self.path = self.folder / "index.sqlite"
        self.local = threading.local()
        self.write_lock = threading.Lock()
        self.indexing = False
        self.tag_dataset = False
        with self.connection() as db:
            db.executescript(_SCHEMA)

    # --- connections

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            self.local.db = db
        yield db

    def store(self) -> Any:
        """A fresh caption store over the dataset (it reads the captions as they are on disk now)."""
        return open_store(
            self.layout, self.root, ext=self.ext, metadata_file=self.metadata_file, tags=self.tag_dataset
        )

    # --- building

    def build(self) -> int:
        """Index the folder (only what changed since the last build); returns the image count."""
        self.indexing = True
        try:
            images = find_images(self.root)
            store = self.store()
            meta_mtime = self._metadata_mtime()
            with self.connection() as db:
                known = {r["path"]: r for r in db.execute("SELECT path, mtime, size, cap_mtime FROM images")}
                same_metadata = db.execute("SELECT value FROM meta WHERE key='metadata_mtime'").fetchone()
                metadata_changed = same_metadata is None or same_metadata[0] != repr(meta_mtime)
            rows, present = [], set()
            for image in images:
                rel = image.relative_to(self.root).as_posix()
                present.add(rel)
                try:
                    stat = image.stat()
                except OSError:
                    continue
                cap_mtime = self._caption_mtime(image) if self.layout == "sidecar" else meta_mtime
                old = known.get(rel)
                unchanged = (
                    old is not None
                    and old["mtime"] == stat.st_mtime
                    and old["size"] == stat.st_size
                    and old["cap_mtime"] == cap_mtime
                    and not (self.layout != "sidecar" and metadata_changed)
                )
                if unchanged:
                    continue
                rows.append((rel, stat.st_mtime, stat.st_size, _read(store, image), cap_mtime))
                if len(rows) >= _BATCH:
                    self._upsert(rows)
                    rows = []
            self._upsert(rows)
            with self.write_lock, self.connection() as db:
                gone = [p for p in known if p not in present]
                db.executemany(
                    "DELETE FROM tags WHERE image_id=(SELECT id FROM images WHERE path=?)",
                    ((p,) for p in gone),
                )
                db.executemany("DELETE FROM images WHERE path=?", ((p,) for p in gone))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('metadata_mtime', ?)", (repr(meta_mtime),))
                db.commit()
            sample = self._all("SELECT caption FROM images WHERE caption IS NOT NULL LIMIT 2000")
            self.tag_dataset = looks_like_tags(c for (c,) in sample)
            return len(images)
        finally:
            self.indexing = False

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.connection() as db:
            return [tuple(r) for r in db.execute(sql, params)]

    def _caption_mtime(self, image: Path) -> float | None:
        try:
            return caption_path(image, self.ext).stat().st_mtime
        except OSError:
            return None

    def _metadata_mtime(self) -> float | None:
        if self.layout == "sidecar":
            return None
        candidates = [self.metadata_file] if self.metadata_file else list(self.root.glob("*.json*"))
        times = [p.stat().st_mtime for p in candidates if p and Path(p).is_file()]
        return max(times) if times else None

    def _upsert(self, rows: list[tuple]) -> None:
        if not rows:
            return
        with self.write_lock, self.connection() as db:
            db.executemany(
                "INSERT INTO images(path, mtime, size, caption, cap_mtime, tokens) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(path) DO UPDATE SET mtime=excluded.mtime, "
                "size=excluded.size, "
                "caption=excluded.caption, cap_mtime=excluded.cap_mtime, tokens=NULL",
                rows,
            )
            ids = [db.execute("SELECT id FROM images WHERE path=?", (r[0],)).fetchone()[0] for r in rows]
            db.executemany("DELETE FROM tags WHERE image_id=?", ((i,) for i in ids))
            db.executemany(
                "INSERT INTO tags VALUES (?, ?)",
                ((i, t) for i, r in zip(ids, rows, strict=True) for t in _tags(r[3])),
            )
            db.commit()

    # --- reading

    def get(self, image_id: int) -> dict[str, Any] | None:
        with self.connection() as db:
            row = db.execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        return dict(row) if row else None

    def file(self, image_id: int) -> Path | None:
        """The image's file, only when it is a regular file inside the dataset folder (no symlink out)."""
        row = self.get(image_id)
        if row is None:
            return None
        path = (self.root / row["path"]).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def select(
        self,
        query: Query,
        *,
        offset: int = 0,
        limit: int | None = 100,
        sort: str = "path",
        order: str = "asc",
    ) -> tuple[int, list[dict[str, Any]]]:
        where, params = self._where(query)
        direction = "DESC" if order == "desc" else "ASC"
        order_by = f"clip IS NULL, clip {direction}, path" if sort == "clip" else f"path {direction}"
        with self.connection() as db:
            total = db.execute(f"SELECT COUNT(*) FROM images WHERE {where}", params).fetchone()[0]
            duplicate = (
                "caption IS NOT NULL AND trim(caption) != '' AND caption IN "
                "(SELECT caption FROM images WHERE caption IS NOT NULL GROUP BY caption HAVING COUNT(*) > 1)"
            )
            sql = f"SELECT *, ({duplicate}) AS duplicate FROM images WHERE {where} ORDER BY {order_by}"
            if limit is not None:
                sql += " LIMIT ? OFFSET ?"
                params = [*params, limit, offset]
            rows = [dict(r) for r in db.execute(sql, params)]
        return total, rows

    def _where(self, query: Query) -> tuple[str, list[Any]]:
        clauses, params = ["1"], []
        if query.q:
            clauses.append("instr(lower(coalesce(caption, '')), ?) > 0")
            params.append(query.q.lower())
        for tag in query.tags:
            clauses.append("id IN (SELECT image_id FROM tags WHERE tag=?)")
            params.append(tag)
        for tag in query.without:
            clauses.append("id NOT IN (SELECT image_id FROM tags WHERE tag=?)")
            params.append(tag)
        flag = query.flag
        if flag == "no-caption":
            clauses.append("(caption IS NULL OR trim(caption) = '')")
        elif flag == "truncated":
            clauses.append("tokens > ?")
            params.append(self.max_tokens)
        elif flag == "duplicate":
            clauses.append(
                "caption IS NOT NULL AND caption IN (SELECT caption FROM images WHERE caption IS NOT NULL "
                "GROUP BY caption HAVING COUNT(*) > 1)"
            )
        elif flag == "low-clip":
            clauses.append("clip IS NOT NULL AND clip < ?")
            params.append(LOW_CLIP)
        elif flag == "fused-trigger":
            clauses.append("fused = 1")
        return " AND ".join(clauses), params

    def tag_counts(self) -> list[tuple[str, int]]:
        return [(t, n) for t, n in self._all("SELECT tag, COUNT(*) FROM tags GROUP BY tag")]

    def count(self) -> int:
        return self._all("SELECT COUNT(*) FROM images")[0][0]

    # --- writing

    def set_captions(self, changes: Iterable[tuple[int, str]]) -> None:
        """Record captions just written to disk (their files' new mtimes too) in the index."""
        changes = list(changes)
        meta_mtime = self._metadata_mtime()
        with self.write_lock, self.connection() as db:
            for image_id, caption in changes:
                row = db.execute("SELECT path FROM images WHERE id=?", (image_id,)).fetchone()
                cap_mtime = (
                    self._caption_mtime(self.root / row[0]) if self.layout == "sidecar" else meta_mtime
                )
                db.execute(
                    "UPDATE images SET caption=?, cap_mtime=?, tokens=NULL WHERE id=?",
                    (caption, cap_mtime, image_id),
                )
                db.execute("DELETE FROM tags WHERE image_id=?", (image_id,))
                db.executemany("INSERT INTO tags VALUES (?, ?)", ((image_id, t) for t in _tags(caption)))
            if self.layout != "sidecar":
                db.execute("INSERT OR REPLACE INTO meta VALUES ('metadata_mtime', ?)", (repr(meta_mtime),))
            db.commit()

    def set_tokens(self, counts: Iterable[tuple[int, int]]) -> None:
        with self.write_lock, self.connection() as db:
            db.executemany("UPDATE images SET tokens=? WHERE id=?", ((n, i) for i, n in counts))
            db.commit()

    def set_report(self, pairs: Iterable[dict[str, Any]]) -> None:
        """CLIP scores and fused-trigger flags from `loracap report`'s report.json pairs."""
        rows = [(p.get("clip"), int(p.get("trigger") == "fused"), p["path"]) for p in pairs if "path" in p]
        with self.write_lock, self.connection() as db:
            db.executemany("UPDATE images SET clip=?, fused=? WHERE path=?", rows)
            db.commit()

    def set_clip(self, scores: Iterable[tuple[str, float | None]]) -> None:
        """CLIP scores by path (computed on request)."""
        with self.write_lock, self.connection() as db:
            db.executemany("UPDATE images SET clip=? WHERE path=?", ((s, p) for p, s in scores))
            db.commit()

    def set_proposals(self, proposals: Iterable[tuple[int, str | None]]) -> None:
        with self.write_lock, self.connection() as db:
            db.executemany("UPDATE images SET proposal=? WHERE id=?", ((p, i) for i, p in proposals))
            db.commit()

    def proposals(self) -> list[dict[str, Any]]:
        with self.connection() as db:
            return [
                dict(r) for r in db.execute("SELECT * FROM images WHERE proposal IS NOT NULL ORDER BY path")
            ]


LOW_CLIP = 20.0
"""CLIP scores (0-100) below this count as low: the report draws them red too."""


def _read(store: Any, image: Path) -> str | None:
    try:
        return store.existing(image)
    except OSError:  # an unreadable caption file: shown as none; saving over it needs the user's action
        return None


def _tags(caption: str | None) -> list[str]:
    """The caption's comma-separated parts: tags in a tag dataset (the tag panel shows them only there)."""
    return list(dict.fromkeys(split_tags(caption))) if caption else []
