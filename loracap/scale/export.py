"""`loracap export`: caption shards (from `loracap caption --engine ray` on shards or tables) -> a trainer
folder: the images, read once more from the sources the shards name, and their captions in the chosen
layout (sidecar, metadata.jsonl, kohya JSON), through the same stores `loracap caption` writes with.

Each id is written once, whatever a retried block wrote twice (`read_captions` keeps one row per id). An
image's file name is its key (subfolders kept, unsafe parts such as ".." dropped) with the extension of
its format, or its hash where it has no key; two different images under one key get the second's hash
added, so nothing is overwritten. An image already there with the same bytes is not written again, so an
interrupted export resumes.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loracap.dataset import open_store
from loracap.files import atomic_write_bytes
from loracap.postprocess import looks_like_tags
from loracap.scale.shards import read_captions, read_source
from loracap.scale.sources import iter_rows, open_source, row_id

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "ExportSummary", "export"]

_UNSAFE = re.compile(r"[^\w.\-]+")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class ExportConfig:
    """Every setting of `loracap export`."""

    shards: str | Path | None = None
    """The --out folder of a `loracap caption --engine ray` run on shards or tables."""
    to: str | Path | None = None
    """The trainer folder to write (created)."""
    format: str = "sidecar"
    """sidecar, jsonl (metadata.jsonl) or kohya-json (meta_cap.json)."""
    ext: str = ".txt"
    """Sidecar extension."""
    progress: bool = True


@dataclass
class ExportSummary:
    written: int = 0
    """Images with their captions written."""
    kept: int = 0
    """Images already there with the same bytes (a resumed export): their captions written again."""
    missing: list[str] = field(default_factory=list)
    """Ids whose image was not found in its source any more."""

    def describe(self) -> str:
        text = f"{self.written} images and captions written, {self.kept} already there"
        if self.missing:
            text += f"; {len(self.missing)} not found in their sources (e.g. {self.missing[0]})"
        return text


def export(config: ExportConfig) -> ExportSummary:
    """Write `config.to` from the shards in `config.shards`; see the module docstring."""
    from tqdm.auto import tqdm

    if not config.shards or not config.to:
        raise ValueError("give the caption shards' folder and --to FOLDER")
    rows = read_captions(Path(config.shards))
    if not rows:
        raise ValueError(f"{config.shards} holds no caption shards (part-*.parquet)")
    wanted = {row["id"]: row for row in rows}
    to = Path(config.to).expanduser()
    to.mkdir(parents=True, exist_ok=True)
    tags = looks_like_tags(r["caption"] for r in rows)
    store = open_store(config.format, to.resolve(), ext=config.ext, tags=tags)
    recorded = read_source(Path(config.shards))
    columns = {"image_column": recorded.get("image_column"), "id_column": recorded.get("id_column")}
    summary = ExportSummary()
    taken: dict[Path, str] = {}
    bar = tqdm(total=len(wanted), unit="img", desc="exporting", disable=not config.progress, file=sys.stderr)
    try:
        for where in dict.fromkeys(r["where"] for r in rows):
            for key, data, _ in iter_rows(open_source(where, **columns)):
                ident = row_id(key or None, data)
                row = wanted.pop(ident, None)
                if row is None:
                    continue
                path = _place(to.resolve(), key, ident, data, taken)
                if path.is_file() and path.read_bytes() == data:
                    summary.kept += 1
                else:
                    atomic_write_bytes(path, data)
                    summary.written += 1
                store.write(path, row["caption"])
                bar.update()
    finally:
        store.close()
        bar.close()
    summary.missing = sorted(wanted)
    return summary


def _place(root: Path, key: str, ident: str, data: bytes, taken: dict[Path, str]) -> Path:
    """Where an image goes: its key (safe parts only) + its format's extension; the hash is added when
    another image took that name in this export or holds it on disk."""
    parts = [_UNSAFE.sub("_", p) for p in key.split("/") if p not in ("", ".", "..")] if key else []
    stem = parts[-1] if parts else ident.split("#")[-1]
    folder = root.joinpath(*parts[:-1]) if len(parts) > 1 else root
    suffix = _extension(data)
    path = folder / f"{stem}{suffix}"
    if taken.get(path, ident) != ident or (
        path.is_file() and path.read_bytes() != data and path not in taken
    ):
        path = folder / f"{stem}-{ident.split('#')[-1][:8]}{suffix}"
    taken[path] = ident
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXTENSIONS.get(im.format or "", ".png")
    except Exception:  # noqa: BLE001 - a row that captioned decoded once; keep its bytes whatever they are
        return ".bin"
