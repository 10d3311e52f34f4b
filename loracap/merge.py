"""`loracap merge`: several captioned datasets become one dataset folder.

A source is a folder in any layout loracap reads (sidecar .txt/.caption, metadata.jsonl, kohya
meta_cap.json: `read_dataset`) or a dataset saved with `datasets`' save_to_disk (a folder holding
dataset_info.json, state.json or dataset_dict.json: every split of it, its image column's bytes and its
caption column). What happens, in order:

    1. everything that can be checked without copying: the settings, --to-hub (offline, no network, no
       token: one line, before anything is written), OUT (a folder holding an earlier merge needs
       --overwrite; a folder that is not one is never deleted or written into), every source readable
    2. each source read; --sample N keeps N of its images, seeded by --seed and the source's name (so a
       source's sample does not change when other sources are added)
    3. the kept images scanned as `loracap report` scans them (`scan_images`: decode, sha256, phash); one
       that does not decode is listed and skipped
    4. duplicates dropped (unless --keep-dupes): byte-identical files and the report's perceptual
       near-duplicates (`find_duplicate_groups`, its default threshold), within and across sources; of
       each group the image with a caption, then the most pixels, then the first given is kept
    5. --split: a seeded shuffle of what is left, cut into train/, validation/ and test/ (the folder names
       datasets' imagefolder makes splits of, and loracap's stores and reader treat as split folders)
    6. names: an image keeps its file name, flat (its subfolders are not kept); a name already taken
       (case-insensitively; for sidecar captions the stem, since a.jpg and a.png share a.txt) gets the
       source's name as a prefix, then a counter: nothing is overwritten, and the caption follows the name
    7. the images copied (--link: hard-linked, copied where that fails) into a hidden folder beside OUT,
       the captions written through the caption stores (jsonl: with a "source" field per line), and
       merge-manifest.jsonl (every image written, dropped or unreadable: file, source, original path,
       sha256, why); then that folder is renamed to OUT. A failed or interrupted run leaves OUT as it was.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loracap.dataset.jsonl import JsonlStore
from loracap.dataset.kohya import METADATA_FILE as KOHYA_FILE
from loracap.dataset.read import LAYOUTS, read_dataset
from loracap.dataset.sidecar import normalize_ext
from loracap.dataset.stores import FORMATS, CaptionStore, open_store
from loracap.files import atomic_write_text
from loracap.hub import offline_mode

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FILE",
    "SPLIT_FOLDERS",
    "DroppedDuplicate",
    "MergeConfig",
    "MergeSummary",
    "SourceCounts",
    "Unreadable",
    "merge",
    "parse_split",
]

MANIFEST_FILE = "merge-manifest.jsonl"
SPLIT_FOLDERS = ("train", "validation", "test")
"""--split's shares go to these folders, in this order."""

_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_CAPTION_COLUMNS = ("text", "caption")
_UNSAFE = re.compile(r"[^\w.\-]+")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
# A full disk or a read-only OUT fails the run; any other error copying one image skips that image.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass
class MergeConfig:
    """Every setting of `loracap merge`."""

    sources: list[str | Path] = field(default_factory=list)
    """The datasets to merge, in order: folders in any layout loracap reads, or saved Hugging Face
    datasets. The first one given keeps its file names when names clash."""
    out: str | Path | None = None
    """The merged dataset folder (created; an earlier merge there is replaced only with `overwrite`)."""
    format: str = "sidecar"
    """How the captions are written: sidecar, jsonl (metadata.jsonl) or kohya-json (meta_cap.json)."""
    ext: str = ".txt"
    """Sidecar extension written; sidecar sources are read with it first, then .txt and .caption."""
    layout: str = "auto"
    """How the source folders hold their captions (auto: each detected on its own)."""
    image_column: str = "image"
    """Saved Hugging Face datasets: the image column."""
    caption_column: str | None = None
    """Saved Hugging Face datasets: the caption column (default: text, else caption)."""
    link: bool = False
    """Hard-link the images instead of copying them (copied where a link cannot be made: another file
    system). A linked image is the source's file: editing one edits the other."""
    keep_dupes: bool = False
    """Keep byte-identical and perceptually near-identical images instead of dropping them."""
    hash_threshold: int | None = None
    """Perceptual-hash bits apart that still count as duplicates (default: the report's, 6 of 64)."""
    sample: int | None = None
    """Keep at most N images of each source, drawn before duplicates are dropped."""
    seed: int = 0
    """Seeds --sample and --split."""
    split: str | list[float] | tuple[float, ...] | None = None
    """Shares for train, validation, test: "0.9,0.05,0.05" (one or two shares also work)."""
    to_hub: str | None = None
    """Push the merged dataset to this Hugging Face dataset id (org/name) once written."""
    overwrite: bool = False
    """Replace an earlier merge in `out` (a folder holding merge-manifest.jsonl; nothing else is ever
    deleted)."""
    progress: bool = True


@dataclass
class SourceCounts:
    """What happened to one source's images."""

    name: str
    """The source's name: its folder's name, made unique; the "source" recorded for its images."""
    path: str
    layout: str
    """sidecar, jsonl, kohya-json, or hf (a saved Hugging Face dataset)."""
    read: int = 0
    sampled: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    unreadable: int = 0
    written: int = 0
    uncaptioned: int = 0
    """Written without a caption (the source had none for them)."""


@dataclass(frozen=True)
class DroppedDuplicate:
    source: str
    original: str
    """Its path in its source ("sub/a.png", "train[3]" for a saved dataset's row)."""
    exact: bool
    """Byte-identical to the kept image; otherwise a perceptual near-duplicate."""
    distance: int
    """Perceptual-hash bits between it and the kept image."""
    kept: str
    """The kept image's file in OUT ("train/a.png")."""
    kept_source: str

    @property
    def reason(self) -> str:
        return "exact duplicate" if self.exact else "near duplicate"


@dataclass(frozen=True)
class Unreadable:
    source: str
    original: str
    reason: str


@dataclass
class MergeSummary:
    out: Path
    format: str
    sources: list[SourceCounts] = field(default_factory=list)
    duplicates: list[DroppedDuplicate] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    """(source, original file name, name in OUT) of every image renamed because its name was taken."""
    splits: dict[str, int] = field(default_factory=dict)
    """Images per split folder; {"": n} without --split."""
    linked: int = 0
    copied: int = 0
    extracted: int = 0
    """Images written from the rows of saved Hugging Face datasets."""
    problems: list[str] = field(default_factory=list)
    """Captions a source holds but that could not be read ("A: sub/a.txt: unreadable: ..."); their
    images are merged without one."""
    pushed: str | None = None

    @property
    def written(self) -> int:
        return sum(s.written for s in self.sources)

    def describe(self, limit: int = 10) -> str:
        exact = sum(s.exact_duplicates for s in self.sources)
        near = sum(s.near_duplicates for s in self.sources)
        ways = (
            (self.linked, "hard-linked"),
            (self.copied, "copied"),
            (self.extracted, "from saved datasets"),
        )
        how = ", ".join(f"{n} {way}" for n, way in ways if n)
        lines = [
            f"merged {len(self.sources)} dataset(s) into {self.out} ({self.format}): {self.written} images "
            f"written{f' ({how})' if how else ''}; dropped {exact} exact and {near} near duplicate(s), "
            f"{len(self.unreadable)} unreadable"
        ]
        if any(self.splits):
            lines.append("  splits: " + ", ".join(f"{name} {n}" for name, n in self.splits.items()))
        for s in self.sources:
            lines.append(
                f"  {s.name} ({s.layout}, {s.path}): {s.read} read, {s.sampled} sampled, "
                f"{s.exact_duplicates} exact and {s.near_duplicates} near duplicate(s) dropped, "
                f"{s.unreadable} unreadable, "
                f"{s.written} written" + (f" ({s.uncaptioned} without caption)" if s.uncaptioned else "")
            )
        for d in self.duplicates[:limit]:
            how = "an exact duplicate" if d.exact else f"a near duplicate (phash distance {d.distance})"
            lines.append(f"  dropped {d.source}:{d.original}, {how} of {d.kept} (from {d.kept_source})")
        for u in self.unreadable[:limit]:
            lines.append(f"  skipped {u.source}:{u.original}: {u.reason}")
        for source, original, name in self.renamed[:limit]:
            lines.append(f"  renamed {source}:{original} -> {name} (name taken)")
        for problem in self.problems[:limit]:
            lines.append(f"  caption not read: {problem}")
        if max(len(self.duplicates), len(self.unreadable), len(self.renamed), len(self.problems)) > limit:
            lines.append(f"  (first {limit} of each shown)")
        lines.append(f"  every image: {self.out / MANIFEST_FILE}")
        if self.pushed:
            lines.append(f"  pushed to https://huggingface.co/datasets/{self.pushed}")
        return "\n".join(lines)


@dataclass
class _Item:
    """One image of one source, on its way to OUT."""

    source: int
    original: str
    text: str | None
    path: Path | None = None
    """The file: in the source folder, or a saved dataset's row written to the staging folder."""
    row: tuple[Any, int, str, str] | None = None
    """(table, row index, image column, fallback stem) of a saved dataset's row, until staged."""
    wanted: str = ""
    """The file name it asks for in OUT."""
    staged: bool = False
    info: Any = None
    """Its ImageInfo once scanned."""
    problem: str | None = None
    """Why it is skipped (unreadable)."""
    duplicate_of: _Item | None = None
    """The image kept in its place, when it is a duplicate."""
    split: str = ""
    name: str = ""
    """Its file name in OUT, once placed."""
    written: bool = False


def parse_split(value: str | list[float] | tuple[float, ...] | None) -> tuple[float, ...] | None:
    """--split "0.9,0.05,0.05" -> (0.9, 0.05, 0.05): one to three shares for train, validation, test,
    none negative, adding up to 1."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        shares = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--split takes shares such as 0.9,0.05,0.05, not {value!r}") from None
    if not 1 <= len(shares) <= len(SPLIT_FOLDERS) or any(s < 0 for s in shares):
        raise ValueError(
            f"--split takes one to three shares (train,validation,test), none negative: {value!r}"
        )
    if abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"--split shares must add up to 1, not {sum(shares):g}: {value!r}")
    return shares


def merge(config: MergeConfig) -> MergeSummary:
    """Merge `config.sources` into `config.out`; see the module docstring."""
    fmt, ext, shares = _check_settings(config)
    if config.to_hub:
        _check_hub(config.to_hub)
    paths = [Path(os.path.abspath(Path(s).expanduser())) for s in config.sources]
    out = Path(os.path.abspath(Path(config.out).expanduser()))  # type: ignore[arg-type]
    real = Path(os.path.realpath(out))
    state = _check_out(out, real, paths, config.overwrite)
    import imagehash  # noqa: F401 - the scan needs it (the "report" extra): fail here, before any work

    names = _source_names(paths)
    summary = MergeSummary(out=out, format=fmt)
    items: list[_Item] = []
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        counts, found, problems = _read_source(path, index, name, config, ext)
        counts.read = len(found)
        found = _sample(found, config.sample, config.seed, name)
        counts.sampled = len(found)
        summary.sources.append(counts)
        summary.problems += problems
        items += found

    real.parent.mkdir(parents=True, exist_ok=True)
    staging = real.parent / f".{real.name}.loracap-merge-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _stage_rows(items, staging / ".rows")
        _scan(items, config.progress)
        if not config.keep_dupes:
            _drop_duplicates(items, config.hash_threshold, summary)
        kept = [it for it in items if it.problem is None and it.duplicate_of is None]
        _assign_splits(kept, shares, config.seed)
        _assign_names(kept, summary, fmt)
        _write(kept, staging, real, fmt, ext, config, summary)
        _finish_counts(items, summary)
        _write_manifest(items, staging, summary)
        shutil.rmtree(staging / ".rows", ignore_errors=True)
        _swap(staging, real, state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if config.to_hub:
        _push(real, [it for it in items if it.written], summary, config.to_hub)
    return summary


# --- checks before any work -----------------------------------------------------------------------------


def _check_settings(config: MergeConfig) -> tuple[str, str, tuple[float, ...] | None]:
    if not config.sources:
        raise ValueError("give the datasets to merge and --out FOLDER")
    if not config.out:
        raise ValueError("give the folder to write with --out")
    if config.format not in FORMATS:
        raise ValueError(f"unknown caption format {config.format!r}: expected one of {', '.join(FORMATS)}")
    if config.layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {config.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if config.sample is not None and config.sample < 1:
        raise ValueError(f"--sample must be 1 or more, not {config.sample}")
    if config.hash_threshold is not None and not 0 <= config.hash_threshold <= 64:
        raise ValueError(f"--hash-threshold must be in 0..64, not {config.hash_threshold}")
    return config.format, normalize_ext(config.ext), parse_split(config.split)


def _check_hub(repo_id: str) -> None:
    """Everything --to-hub needs, checked before anything is copied: each failure one line."""
    if not _HUB_ID.fullmatch(repo_id):
        raise ValueError(f"--to-hub takes a dataset id such as org/name, not {repo_id!r}")
    if offline_mode():
        raise ValueError(
            f"--to-hub {repo_id}: the Hugging Face hub is offline here (HF_HUB_OFFLINE=1); merge without "
            "--to-hub and push the folder from a machine with internet"
        )
    from huggingface_hub import constants, get_token

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=10).close()
    except OSError as exc:
        raise ValueError(
            f"--to-hub {repo_id}: cannot reach {constants.ENDPOINT} ({exc.strerror or exc}); merge without "
            "--to-hub and push the folder from a machine with internet"
        ) from None
    if get_token() is None:
        raise ValueError(f"--to-hub {repo_id}: no Hugging Face token: run `hf auth login` or set HF_TOKEN")


def _check_out(out: Path, real: Path, sources: list[Path], overwrite: bool) -> str:
    """What OUT is now: "new" (nothing), "empty" (an empty folder) or "earlier" (an earlier merge, which
    only --overwrite replaces)."""
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"dataset not found: {source}")
        if not source.is_dir():
            raise NotADirectoryError(f"not a folder: {source}")
        inside = Path(os.path.realpath(source))
        if real == inside or real.is_relative_to(inside) or inside.is_relative_to(real):
            raise ValueError(f"--out {out} and the dataset {source} must not be inside one another")
    if not os.path.lexists(real):
        return "new"
    if not real.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (real / MANIFEST_FILE).is_file():
        if not overwrite:
            raise ValueError(f"{out} already holds a merge ({MANIFEST_FILE}): pass --overwrite to replace it")
        return "earlier"
    if any(real.iterdir()):
        raise ValueError(
            f"{out} is not empty and holds no earlier merge ({MANIFEST_FILE}): give a new or empty --out "
            "(loracap never deletes a folder it did not write)"
        )
    return "empty"


def _source_names(paths: list[Path]) -> list[str]:
    """Each source's name: its folder's name, safe in a file name, made unique with -2, -3, ..."""
    names: list[str] = []
    for path in paths:
        base = _UNSAFE.sub("_", path.name).strip("._") or "dataset"
        name = base
        for n in itertools.count(2):
            if name.casefold() not in {x.casefold() for x in names}:
                break
            name = f"{base}-{n}"
        names.append(name)
    return names


# --- reading --------------------------------------------------------------------------------------------


def _read_source(
    path: Path, index: int, name: str, config: MergeConfig, ext: str
) -> tuple[SourceCounts, list[_Item], list[str]]:
    if any((path / f).is_file() for f in _SAVED_DATASET_FILES):
        return _read_saved(path, index, name, config)
    ds = read_dataset(path, layout=config.layout, ext=ext)
    texts = {record.image: record.text for record in ds.records}
    if ds.layout == "sidecar":
        # .txt and .caption are both sidecar captions trainers read: an image without one gets the other.
        for other in (e for e in (".txt", ".caption") if e != ext):
            if all(image in texts for image in ds.images):
                break
            more = read_dataset(path, layout="sidecar", ext=other)
            texts.update({r.image: r.text for r in more.records if r.image not in texts})
    problems = [f"{name}: {p.path}: {p.reason}" for p in ds.problems]
    items = [
        _Item(index, image.relative_to(ds.root).as_posix(), texts.get(image), path=image, wanted=image.name)
        for image in ds.images
    ]
    return SourceCounts(name, str(path), ds.layout), items, problems


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "reading a saved Hugging Face dataset or --to-hub needs datasets: pip install 'loracap[train]'"
        ) from None
    return datasets


def _read_saved(path: Path, index: int, name: str, config: MergeConfig) -> tuple[SourceCounts, list, list]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise ValueError(f"cannot load the saved dataset {path}: {str(exc).splitlines()[0]}") from None
    tables = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    items: list[_Item] = []
    for split, table in tables:
        columns = table.column_names
        image = config.image_column
        if image not in columns:
            raise ValueError(
                f"{path} has no image column {image!r} (columns: {', '.join(columns)}); name it with "
                "--image-column"
            )
        caption = config.caption_column or next((c for c in _CAPTION_COLUMNS if c in columns), None)
        if caption not in columns:
            wanted = repr(caption) if caption else "text or caption"
            raise ValueError(
                f"{path} has no caption column {wanted} (columns: {', '.join(columns)}); name it with "
                "--caption-column"
            )
        if isinstance(table.features[image], datasets.Image):
            table = table.cast_column(image, datasets.Image(decode=False))  # bytes, copied as they are
        for i, text in enumerate(table[caption]):
            stem = f"{name}-{split}-{i}" if len(tables) > 1 else f"{name}-{i}"
            text = None if text is None else str(text).strip()
            items.append(
                _Item(index, f"{split}[{i}]" if split else f"[{i}]", text, row=(table, i, image, stem))
            )
    return SourceCounts(name, str(path), "hf"), items, []


def _sample(items: list[_Item], n: int | None, seed: int, name: str) -> list[_Item]:
    if n is None or len(items) <= n:
        return items
    chosen = random.Random(f"{seed}:{name}").sample(range(len(items)), n)
    return [items[k] for k in sorted(chosen)]


# --- scanning and duplicates ----------------------------------------------------------------------------


def _stage_rows(items: list[_Item], folder: Path) -> None:
    """A saved dataset's rows become files (in the staging folder), so they are scanned like any image."""
    for k, item in enumerate(items):
        if item.row is None:
            continue
        table, i, column, stem = item.row
        item.row = None
        try:
            data, stored = _row_image(table[i][column])
        except (OSError, ValueError) as exc:
            item.problem = str(exc) if isinstance(exc, ValueError) else f"cannot read: {exc.strerror or exc}"
            continue
        item.wanted = _row_name(stored, stem, data)
        folder.mkdir(exist_ok=True)
        item.path = folder / f"{k}{os.path.splitext(item.wanted)[1]}"
        item.path.write_bytes(data)
        item.staged = True


def _row_image(value: Any) -> tuple[bytes, str | None]:
    """(bytes, stored path) of an image cell: a datasets Image struct {bytes, path}, bytes, or a path."""
    stored = None
    if isinstance(value, dict):
        stored, value = value.get("path") or None, value.get("bytes")
        if value is None and stored and os.path.isfile(stored):
            value = Path(stored).read_bytes()
    elif isinstance(value, str) and os.path.isfile(value):
        stored, value = value, Path(value).read_bytes()
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value), stored
    raise ValueError("no image bytes in the row")


def _row_name(stored: str | None, stem: str, data: bytes) -> str:
    """The row's stored file name where it has one (an image extension added if it lacks one), else
    `stem` and the extension of its format."""
    from loracap.inputs import supported_extensions

    name = _UNSAFE.sub("_", re.split(r"[\\/]", stored)[-1]).lstrip(".") if stored else ""
    if name and os.path.splitext(name)[1].lower() in supported_extensions():
        return name
    return f"{os.path.splitext(name)[0] or stem}{_format_extension(data)}"


def _format_extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXTENSIONS.get(im.format or "", ".png")
    except Exception:  # noqa: BLE001 - the scan reports it unreadable; the name only needs an extension
        return ".png"


def _scan(items: list[_Item], progress: bool) -> None:
    from loracap.quality.images import scan_images

    todo = [it for it in items if it.problem is None]
    infos, errors = scan_images(
        [it.path for it in todo], workers=max(1, min(4, os.cpu_count() or 1)), progress=progress
    )
    found: dict[str, Any] = {os.fspath(info.path): info for info in infos}
    failed = {os.fspath(error.path): error.reason for error in errors}
    for it in todo:
        key = os.fspath(it.path)  # type: ignore[arg-type]
        it.info = found.get(key)
        if it.info is None:
            it.problem = failed.get(key, "could not be read")


def _drop_duplicates(items: list[_Item], threshold: int | None, summary: MergeSummary) -> None:
    """Mark every duplicate but one per group (see the module docstring for which one stays)."""
    from loracap.quality.images import find_duplicate_groups

    scanned = [it for it in items if it.info is not None]
    # Numbered paths: one file may be in two sources (a folder given twice, or nested in another).
    infos = [replace(it.info, path=Path(str(k))) for k, it in enumerate(scanned)]
    for group in find_duplicate_groups(infos, threshold):
        members = [int(p.name) for p in group.paths]
        best = max(members, key=lambda k: (bool(scanned[k].text), infos[k].width * infos[k].height, -k))
        for k in members:
            if k != best:
                scanned[k].duplicate_of = scanned[best]


# --- placing --------------------------------------------------------------------------------------------


def _assign_splits(kept: list[_Item], shares: tuple[float, ...] | None, seed: int) -> None:
    if shares is None:
        return
    n = len(kept)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = [round(n * share) for share in shares[1:]]  # validation, test; train gets the rest
    for j in range(len(sizes)):
        sizes[j] = min(sizes[j], n - sum(sizes[:j]))  # rounding up twice must not take more than n
    bounds = list(itertools.accumulate([n - sum(sizes), *sizes]))
    start = 0
    for folder, end in zip(SPLIT_FOLDERS, bounds, strict=False):
        for k in order[start:end]:
            kept[k].split = folder
        start = end


def _assign_names(kept: list[_Item], summary: MergeSummary, fmt: str) -> None:
    taken: set[str] = set()
    by_stem = fmt == "sidecar"  # a.jpg and a.png would share a.txt
    for it in kept:
        prefix = summary.sources[it.source].name
        it.name = _free_name(it.wanted, prefix, taken, by_stem)
        if it.name != it.wanted:
            summary.renamed.append((prefix, it.original, it.name))


def _free_name(wanted: str, prefix: str, taken: set[str], by_stem: bool) -> str:
    stem, suffix = os.path.splitext(wanted)
    tries = itertools.chain(
        [wanted, f"{prefix}-{wanted}"], (f"{prefix}-{stem}-{n}{suffix}" for n in itertools.count(2))
    )
    for name in tries:
        key = (os.path.splitext(name)[0] if by_stem else name).casefold()
        if key not in taken:
            taken.add(key)
            return name
    raise AssertionError("unreachable")


def _relative(it: _Item) -> str:
    return f"{it.split}/{it.name}" if it.split else it.name


def _write(
    kept: list[_Item],
    staging: Path,
    real: Path,
    fmt: str,
    ext: str,
    config: MergeConfig,
    summary: MergeSummary,
) -> None:
    from tqdm.auto import tqdm

    from loracap.postprocess import looks_like_tags

    tags = fmt == "kohya-json" and looks_like_tags(it.text or "" for it in kept)
    stores: dict[str, CaptionStore] = {}
    jsonl_extra: dict[str, dict[str, tuple[str, bool]]] = {}
    bar = tqdm(total=len(kept), unit="img", desc="merging", disable=not config.progress, file=sys.stderr)
    try:
        for it in kept:
            folder = staging / it.split if it.split else staging
            if it.split not in stores:
                folder.mkdir(exist_ok=True)
                stores[it.split] = _open_store(fmt, folder, real / it.split if it.split else real, ext, tags)
            dest = folder / it.name
            try:
                how = _place(it, dest, config.link)
            except OSError as exc:
                if exc.errno in _FATAL_ERRNOS:
                    raise
                it.problem = f"cannot copy: {exc.strerror or exc}"
                bar.update()
                continue
            summary.linked += how == "linked"
            summary.copied += how == "copied"
            summary.extracted += how == "moved"
            it.written = True
            # kohya-json keys are absolute paths: the image's path in OUT, where it will be.
            target = (real / _relative(it)) if fmt == "kohya-json" else dest
            if it.text is not None or fmt == "jsonl":
                stores[it.split].write(target, it.text or "")
            if fmt == "jsonl":
                source = summary.sources[it.source].name
                jsonl_extra.setdefault(it.split, {})[it.name] = (source, it.text is None)
            bar.update()
        for split, store in stores.items():
            if isinstance(store, JsonlStore):
                _add_jsonl_fields(store, jsonl_extra.get(split, {}))
    finally:
        bar.close()
        for store in stores.values():
            store.close()
    for split in ("", *SPLIT_FOLDERS):
        count = sum(it.written and it.split == split for it in kept)
        if count:
            summary.splits[split] = count


def _open_store(fmt: str, folder: Path, final: Path, ext: str, tags: bool) -> CaptionStore:
    never = float("inf")  # one write per file, when the store is closed
    if fmt == "kohya-json":
        return open_store(fmt, final, metadata_file=folder / KOHYA_FILE, tags=tags, flush_interval_s=never)
    return open_store(fmt, folder, ext=ext, flush_interval_s=never)


def _add_jsonl_fields(store: JsonlStore, extra: dict[str, tuple[str, bool]]) -> None:
    """The "source" field on each line (after file_name and text); an image its source held no caption
    for gets "text": null, so imagefolder still loads it (it drops images a metadata file does not list)."""
    for file in store.files.values():
        for record in file.records:
            source, uncaptioned = extra.get(record.get("file_name"), (None, False))
            if source is None:
                continue
            record["source"] = source
            if uncaptioned:
                record["text"] = None
            file.dirty = True


def _place(it: _Item, dest: Path, link: bool) -> str:
    """Put the image at `dest`: "moved" (a staged row), "linked" or "copied"."""
    if it.staged:
        os.replace(it.path, dest)  # type: ignore[arg-type]
        return "moved"
    if link:
        try:
            os.link(it.path, dest)  # type: ignore[arg-type]
            return "linked"
        except OSError as exc:  # EXDEV: another file system; EPERM/ENOTSUP: one without hard links
            log.debug("cannot hard-link %s (%s): copying it", it.path, exc.strerror or exc)
    shutil.copy2(it.path, dest)  # type: ignore[arg-type]
    return "copied"


def _finish_counts(items: list[_Item], summary: MergeSummary) -> None:
    for it in items:
        counts = summary.sources[it.source]
        if it.written:
            counts.written += 1
            counts.uncaptioned += it.text is None
        elif it.duplicate_of is not None:
            dropped = _dropped(it, it.duplicate_of, summary)
            counts.exact_duplicates += dropped.exact
            counts.near_duplicates += not dropped.exact
            summary.duplicates.append(dropped)
        if it.problem is not None:
            counts.unreadable += 1
            summary.unreadable.append(Unreadable(counts.name, it.original, it.problem))


def _dropped(it: _Item, keep: _Item, summary: MergeSummary) -> DroppedDuplicate:
    return DroppedDuplicate(
        source=summary.sources[it.source].name,
        original=it.original,
        exact=it.info.sha256 == keep.info.sha256,
        distance=int((it.info.phash != keep.info.phash).sum()),
        kept=_relative(keep) if keep.written else "",
        kept_source=summary.sources[keep.source].name,
    )


def _write_manifest(items: list[_Item], staging: Path, summary: MergeSummary) -> None:
    lines = []
    for it in items:
        record: dict[str, Any] = {
            "file": _relative(it) if it.written else None,
            "source": summary.sources[it.source].name,
            "original": it.original,
            "sha256": it.info.sha256 if it.info is not None else _sha256(it.path),
        }
        if it.duplicate_of is not None:
            dropped = _dropped(it, it.duplicate_of, summary)
            record |= {"dropped": dropped.reason, "kept": dropped.kept, "distance": dropped.distance}
        elif it.problem is not None:
            record |= {"dropped": "unreadable", "reason": it.problem}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(staging / MANIFEST_FILE, "".join(lines))


def _sha256(path: Path | None) -> str | None:
    """An unreadable image's digest where its bytes can be read at all (a corrupt file)."""
    from loracap.inputs import file_sha256

    try:
        return file_sha256(path) if path is not None else None
    except OSError:
        return None


def _swap(staging: Path, real: Path, state: str) -> None:
    """The finished staging folder becomes OUT; an earlier merge there is removed only after that."""
    if state == "empty":
        real.rmdir()  # raises if something appeared in it meanwhile: nothing is lost
    if state != "earlier":
        os.rename(staging, real)
        return
    old = real.parent / f".{real.name}.loracap-old-{secrets.token_hex(4)}"
    os.rename(real, old)
    try:
        os.rename(staging, real)
    except BaseException:
        os.rename(old, real)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- pushing --------------------------------------------------------------------------------------------


def _push(out: Path, written: list[_Item], summary: MergeSummary, repo_id: str) -> None:
    """The merged dataset as imagefolder loads it (image, text, source; one split per split folder), pushed
    with datasets, whatever --format wrote the captions as."""
    datasets = _datasets()
    splits: dict[str, dict[str, list]] = {}
    for it in written:
        columns = splits.setdefault(it.split or "train", {"image": [], "text": [], "source": []})
        columns["image"].append(str(out / _relative(it)))
        columns["text"].append(it.text)
        columns["source"].append(summary.sources[it.source].name)
    dataset = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
            for split, columns in splits.items()
        }
    )
    try:
        dataset.push_to_hub(repo_id)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"merged into {summary.out}, but pushing it to {repo_id} failed: {reason}") from None
    summary.pushed = repo_id
