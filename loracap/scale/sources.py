"""What `loracap caption --engine ray` reads: a folder, webdataset tar shards, parquet, or a Hugging Face
dataset, as rows of (key, image bytes, where).

    folder      DIR: the images `loracap caption` finds there (the local engine's plan decides which)
    webdataset  shard paths or URLs ending in .tar, with brace ranges (`shards/{00000..00999}.tar`,
                `s3://bucket/shards/{00000..00999}.tar`); a sample's key is its `__key__`, its image the
                member named by --image-column (default: the first of jpg, jpeg, png, webp)
    parquet     a .parquet file, a folder of them or a glob; --image-column (default "image", "jpg" or
                "png") holds the image bytes (or a {bytes, path} struct, as `datasets` stores images);
                --id-column, when given, names the key column
    hf          a dataset saved with `datasets`' save_to_disk (a folder with dataset_info.json), or a hub
                dataset id (owner/name, split "train"), images in --image-column (default "image")

A row's stable id is its key and a hash of its bytes (`row_id`): the same image under the same key is the
same row in every run, and an edited image is a new one. Without a key (parquet with no --id-column) the
hash alone is the id.

`ray_dataset(source)` reads a source with Ray Data's readers (on every node of a cluster, from s3:// and
other pyarrow filesystems too); `iter_rows(source)` reads it in this process (for `loracap export`).
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "Source",
    "expand_braces",
    "id_from_digest",
    "iter_rows",
    "open_source",
    "ray_dataset",
    "row_id",
]

KINDS = ("folder", "webdataset", "parquet", "hf")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_HUB_DATASET = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Source:
    kind: str
    location: str
    """What the user gave."""
    paths: list[str] = field(default_factory=list)
    """The shard or parquet files (expanded); the folder for a folder; the dataset for hf."""
    image_column: str | None = None
    id_column: str | None = None

    def describe(self) -> str:
        count = f"{len(self.paths)} file(s)" if self.kind in ("webdataset", "parquet") else self.location
        return f"{self.kind} ({count})"


def row_id(key: str | None, data: bytes) -> str:
    """The row's stable id: its key and the first 16 hex digits of its bytes' SHA-256."""
    return id_from_digest(key, hashlib.sha256(data).hexdigest())


def id_from_digest(key: str | None, digest: str) -> str:
    """`row_id` from the bytes' SHA-256 (hex) already computed."""
    return f"{key}#{digest[:16]}" if key else digest[:16]


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (zero padding kept; several ranges nest)."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    low, high = match.group(1), match.group(2)
    width = len(low) if low.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        expanded
        for n in range(int(low), int(high) + 1)
        for expanded in expand_braces(f"{head}{str(n).zfill(width)}{tail}")
    ]


def open_source(spec: str | Path, *, image_column: str | None = None, id_column: str | None = None) -> Source:
    """The source `spec` names; ValueError (one line) when it names none of the kinds."""
    text = str(spec)
    is_url = "://" in text
    path = Path(text).expanduser()
    if not is_url and path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return Source("hf", text, [str(path)], image_column, id_column)
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        tars = sorted(str(p) for p in path.rglob("*.tar"))
        if parquet and not tars:
            return Source("parquet", text, parquet, image_column, id_column)
        if tars and not parquet:
            return Source("webdataset", text, tars, image_column, id_column)
        return Source("folder", text, [str(path.resolve())], image_column, id_column)
    expanded = [p for part in expand_braces(text) for p in (_glob(part) if not is_url else [part])]
    if expanded and all(p.endswith(".tar") for p in expanded):
        return Source("webdataset", text, expanded, image_column, id_column)
    if expanded and all(p.endswith(".parquet") for p in expanded):
        return Source("parquet", text, expanded, image_column, id_column)
    if not is_url and not path.exists() and _HUB_DATASET.match(text):
        return Source("hf", text, [text], image_column, id_column)
    raise ValueError(
        f"{text} is not a folder of images, webdataset .tar shards, parquet files or a Hugging Face dataset"
    )


def _glob(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern] if Path(pattern).exists() else []


# --- Ray -------------------------------------------------------------------------------------------------


def ray_dataset(source: Source) -> Any:
    """The source as a Ray dataset of rows {key, image (bytes), where}; not for folders (the engine
    plans those itself)."""
    import ray.data

    if source.kind == "webdataset":
        ds = ray.data.read_webdataset(source.paths, decoder=None, include_paths=True)
        column = source.image_column

        def rows(batch: dict[str, Any]) -> dict[str, Any]:
            # Columns are the union of the members of all samples in the block: a sample lacking one has
            # None there, so each row takes the first image member it has.
            names = [column] if column else [s for s in IMAGE_SUFFIXES if s in batch]
            images = []
            for i in range(len(batch["__key__"])):
                found = next((batch[n][i] for n in names if n in batch and _is_bytes(batch[n][i])), None)
                images.append(_image_bytes(found))
            return {"key": batch["__key__"], "image": _objects(images), "where": batch["path"]}

        return ds.map_batches(rows, batch_format="numpy")
    if source.kind == "parquet":
        ds = ray.data.read_parquet(source.paths, include_paths=True)
    elif source.kind == "hf":
        ds = ray.data.from_huggingface(_load_hf(source))
    else:
        raise ValueError(f"ray_dataset reads shards and tables, not a {source.kind}")
    image, key = _table_columns(ds.schema().names, source)

    def table_rows(batch: dict[str, Any]) -> dict[str, Any]:
        images = [_image_bytes(v) for v in batch[image]]
        keys = [str(k) for k in batch[key]] if key else [""] * len(images)
        where = [str(w) for w in batch["path"]] if "path" in batch else [source.location] * len(images)
        return {"key": _objects(keys), "image": _objects(images), "where": _objects(where)}

    return ds.map_batches(table_rows, batch_format="numpy")


# --- in this process ------------------------------------------------------------------------------------


def iter_rows(source: Source) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, where) of every row, read here (local files, or any pyarrow filesystem URL)."""
    if source.kind == "webdataset":
        for shard in source.paths:
            yield from _tar_rows(shard, source.image_column)
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        for file in source.paths:
            table = pq.read_table(file)
            image, key = _table_columns(table.column_names, source)
            keys = table.column(key).to_pylist() if key else [""] * table.num_rows
            for k, value in zip(keys, table.column(image).to_pylist(), strict=True):
                yield str(k or ""), _image_bytes(value), file
    elif source.kind == "hf":
        dataset = _load_hf(source)
        image, key = _table_columns(dataset.column_names, source)
        for row in dataset:
            yield str(row[key]) if key else "", _image_bytes(row[image]), source.location
    else:
        raise ValueError(f"iter_rows reads shards and tables, not a {source.kind}")


def _tar_rows(shard: str, column: str | None) -> Iterator[tuple[str, bytes, str]]:
    """webdataset's grouping: members with the same name up to the first dot after the last slash are one
    sample; its image is the member with suffix `column` (or the first image suffix present)."""
    with _open_binary(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        current, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            base, _, suffix = name.partition(".")
            key = f"{folder}/{base}" if folder else base
            if key != current and current is not None:
                yield from _sample(current, members, column, shard)
                members = {}
            current = key
            data = tar.extractfile(member)
            members[suffix.lower()] = data.read() if data else b""
        if current is not None:
            yield from _sample(current, members, column, shard)


def _sample(key: str, members: dict[str, bytes], column: str | None, shard: str) -> Iterator:
    name = column or next((s for s in IMAGE_SUFFIXES if s in members), None)
    if name in members:
        yield key, members[name], shard


def _open_binary(location: str) -> Any:
    if "://" not in location:
        return open(location, "rb")  # noqa: SIM115 - closed by the caller's with
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(location)
    return filesystem.open_input_stream(path)


def _load_hf(source: Source) -> Any:
    import datasets

    location = source.paths[0]
    local = Path(location).is_dir()
    loaded = datasets.load_from_disk(location) if local else datasets.load_dataset(location)
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    image = source.image_column or "image"
    if image in loaded.column_names and isinstance(loaded.features[image], datasets.Image):
        loaded = loaded.cast_column(image, datasets.Image(decode=False))  # bytes, decoded by loracap
    return loaded


def _table_columns(names: list[str], source: Source) -> tuple[str, str | None]:
    image = source.image_column or next((c for c in _PARQUET_IMAGE_COLUMNS if c in names), None)
    if image is None or image not in names:
        raise ValueError(
            f"{source.location} has no image column {source.image_column or '(image, jpg, png)'}: its "
            f"columns are {', '.join(names)}; name it with --image-column"
        )
    if source.id_column is not None and source.id_column not in names:
        raise ValueError(f"{source.location} has no column {source.id_column!r} (--id-column)")
    return image, source.id_column


def _is_bytes(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview, dict)) or (
        hasattr(value, "tobytes") and getattr(value, "dtype", None) is not None and value.dtype.kind in "SVO"
    )


def _objects(values: list[Any]) -> Any:
    import numpy as np

    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _image_bytes(value: Any) -> bytes:
    """Image bytes from a bytes cell, or a {bytes, path} struct (how `datasets` stores an Image)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if hasattr(value, "tobytes"):  # a numpy bytes scalar
        return value.tobytes()
    return b"" if value is None else io.BytesIO(value).getvalue()
