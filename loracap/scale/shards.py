"""The captions of shard and table sources: parquet shards under --out, written as results arrive.

    OUT/part-<run>-<n>.parquet   id, key, sha256, caption, model, style, prompt, where
    OUT/errors.jsonl             one line per row that failed: id, key, where, stage, reason
    OUT/loracap-source.json      the source and how its rows were read (for `loracap export`)

Each shard is written whole to a temporary name and renamed, so a killed job leaves only complete shards
(and loses at most the rows not yet flushed, which the next run captions). A re-run reads the ids of every
readable shard and skips them, and skips the rows whose image could not be decoded (same bytes, same
result) unless --retry-failed. A retried block can in principle deliver a row twice; `read_captions`
keeps one row per id, so `loracap export` writes each image exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loracap.files import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "ERRORS_FILE",
    "SOURCE_FILE",
    "ShardWriter",
    "done_ids",
    "read_captions",
    "read_source",
    "write_source",
]

COLUMNS = ("id", "key", "sha256", "caption", "model", "style", "prompt", "where")
ERRORS_FILE = "errors.jsonl"
SOURCE_FILE = "loracap-source.json"
"""What was captioned and how its rows were read (kind, location, image and id columns): `loracap export`
reads the images again the same way."""


def write_source(out: Path, source: Any) -> None:
    from dataclasses import asdict

    from loracap.files import atomic_write_text

    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / SOURCE_FILE, json.dumps(asdict(source), indent=1) + "\n")


def read_source(out: Path) -> dict[str, Any]:
    """The recorded source settings ({} for shards written without them)."""
    try:
        return json.loads((Path(out) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class ShardWriter:
    """Collects caption rows and writes a shard every `rows` rows or `seconds` seconds; errors append to
    OUT/errors.jsonl as they come."""

    def __init__(self, out: Path, *, rows: int = 1000, seconds: float = 60.0) -> None:
        self.out, self.rows, self.seconds = Path(out), rows, seconds
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.pending: list[dict[str, Any]] = []
        self.shards: list[Path] = []
        self.written = 0
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append({c: row.get(c) for c in COLUMNS})
        if len(self.pending) >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def error(self, row: dict[str, Any]) -> None:
        line = json.dumps(
            {k: row.get(k) for k in ("id", "key", "where", "stage", "reason")}, ensure_ascii=False
        )
        with open(self.out / ERRORS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self.pending, schema=_schema())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = self.out / f"part-{self.run}-{len(self.shards):05d}.parquet"
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        self.shards.append(path)
        self.written += len(self.pending)
        self.pending = []

    def close(self) -> None:
        self.flush()


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in COLUMNS])


def _shard_tables(out: Path, columns: list[str] | None = None) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for path in sorted(Path(out).glob("part-*.parquet")):
        try:
            yield pq.read_table(path, columns=columns)
        except (OSError, ValueError) as exc:  # an unreadable shard: its rows are captioned again
            log.warning("skipping unreadable shard %s: %s", path.name, exc)


def done_ids(out: Path, *, retry_failed: bool = False) -> set[str]:
    """Ids already captioned under `out` (and, unless `retry_failed`, those whose image did not decode)."""
    done: set[str] = set()
    if not Path(out).is_dir():
        return done
    for table in _shard_tables(out, ["id"]):
        done.update(table.column("id").to_pylist())
    if not retry_failed:
        try:
            lines = (Path(out) / ERRORS_FILE).read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                error = json.loads(line)
            except ValueError:
                continue
            if error.get("stage") == "decode" and error.get("id"):
                done.add(error["id"])
    return done


def read_captions(out: Path) -> list[dict[str, Any]]:
    """Every captioned row under `out`, one per id (the first written), in shard order."""
    seen: set[str] = set()
    rows = []
    for table in _shard_tables(out):
        for row in table.to_pylist():
            if row["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)
    return rows
