"""Image-level dataset checks: near-duplicates, resolutions, aspect ratios and a kohya bucketing preview.

Everything here works on the files alone (no captions, no model). One pass over the files reads each
header (display size), a hash of the bytes and a perceptual hash of a shrunken decode; every other check
is pure arithmetic on those results, so it can be unit-tested without images.

A file that cannot be decoded becomes an ImageError and is left out of every statistic: a trainer would
fail on it (or skip it) too, and one bad download must not stop a report over thousands of files.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loracap.dataset.buckets import (
    Bucket,
    BucketAssignment,
    BucketSettings,
    assign_buckets,
)
from loracap.inputs import ImageDecodeError, file_sha256, load_image, map_ahead, read_size
from loracap.quality.unionfind import UnionFind

# Shorter-side minimum per base model: below it a trainer upscales the image (blurry training data).
SIDE_PRESETS: dict[str, int] = {"sd15": 512, "sd1.5": 512, "sdxl": 1024, "flux": 1024}

# 6 differing bits out of 64 is the usual "same picture" cut-off for phash: re-encodes, resizes and
# small colour edits stay well under it, unrelated photos sit around 32.
DEFAULT_THRESHOLD_64 = 6

# Perceptual hashing only looks at a 32x32 (hash_size * 4) greyscale thumbnail, so decoding at full size
# is wasted work; 256 px keeps a resampling margin and lets libjpeg decode at 1/8 scale.
DEFAULT_HASH_SIDE = 256

# Shorter-side bin edges for the resolution histogram, chosen around the training resolutions.
RESOLUTION_EDGES: tuple[int, ...] = (256, 512, 768, 1024, 1536, 2048, 3072, 4096)

# Named aspect ratios (width:height) for the aspect histogram, from tall to wide.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (9, 21),
    (9, 16),
    (2, 3),
    (3, 4),
    (1, 1),
    (4, 3),
    (3, 2),
    (16, 9),
    (21, 9),
)

# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """One decodable image: display size (EXIF rotation applied), file digest and perceptual hash."""

    path: Path
    width: int
    height: int
    sha256: str
    phash: np.ndarray = field(repr=False, compare=False)  # flat bool array, hash_size**2 bits

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class ImageError:
    """A file left out of the report, with the one-line reason from the decoder."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Files showing the same picture. ``exact``: all byte-identical. ``max_distance``: the largest
    Hamming distance between two members (it can exceed the threshold: grouping is transitive).
    ``keep``: the member with the most pixels, the one to keep when pruning."""

    paths: tuple[Path, ...]
    exact: bool
    max_distance: int
    keep: Path


@dataclass(frozen=True)
class HistogramBin:
    """``low <= value < high`` holds ``count`` images."""

    label: str
    low: float
    high: float
    count: int


@dataclass(frozen=True)
class SmallImage:
    path: Path
    width: int
    height: int

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)


@dataclass
class ImageReport:
    images: list[ImageInfo]
    errors: list[ImageError]
    duplicate_groups: list[DuplicateGroup]
    resolution_histogram: list[HistogramBin]
    aspect_histogram: list[HistogramBin]
    min_side: int
    small_images: list[SmallImage]
    bucket_settings: BucketSettings
    assignments: list[BucketAssignment]
    buckets: list[Bucket]  # most populated first
    timing: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    """Seconds: "scan_s" (decode, hash, digest every file), "duplicates_s", "sizes_s" (the rest)."""

    @property
    def single_image_buckets(self) -> list[Bucket]:
        return [b for b in self.buckets if b.single]


# --- scanning ---------------------------------------------------------------------------------------


def resolve_side(value: int | str) -> int:
    """A pixel count, or a preset name ("sd15", "sdxl", "flux") for it."""
    if isinstance(value, str):
        try:
            return SIDE_PRESETS[value.lower()]
        except KeyError:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(SIDE_PRESETS))}") from None
    if value < 1:
        raise ValueError(f"side must be >= 1, got {value}")
    return value


def default_threshold(hash_size: int) -> int:
    """DEFAULT_THRESHOLD_64 scaled to the hash's bit count (a 16x16 hash has 4x the bits)."""
    return max(1, round(DEFAULT_THRESHOLD_64 * hash_size * hash_size / 64))


def _imagehash():
    # Optional dependency (the "report" extra): captioning alone must not need it.
    try:
        import imagehash
    except ImportError as e:
        # ModuleNotFoundError naming the module: the CLI turns it into its one-line "pip install" hint.
        raise ModuleNotFoundError(
            'image checks need imagehash: pip install "loracap[report]"', name="imagehash"
        ) from e
    return imagehash


def scan_image(path: str | Path, *, hash_size: int = 8, hash_side: int = DEFAULT_HASH_SIDE) -> ImageInfo:
    """Size, byte digest and perceptual hash of one file. Raises ImageDecodeError for a bad file."""
    imagehash = _imagehash()
    path = Path(path)
    width, height = read_size(path)  # header only: the full-size decode never happens
    image = load_image(path, max_side=hash_side)  # upright per EXIF, so rotated copies hash alike
    bits = np.asarray(imagehash.phash(image, hash_size=hash_size).hash, dtype=bool).ravel()
    try:
        sha = file_sha256(path)
    except OSError as e:  # vanished or unreadable between decode and digest
        raise ImageDecodeError(path, f"cannot read file: {e.strerror or e}") from e
    return ImageInfo(path=path, width=width, height=height, sha256=sha, phash=bits)


def scan_images(
    paths: Iterable[str | Path],
    *,
    hash_size: int = 8,
    hash_side: int = DEFAULT_HASH_SIDE,
    workers: int = 2,
    progress: bool = False,
) -> tuple[list[ImageInfo], list[ImageError]]:
    """scan_image over many files in worker threads (decoding releases the GIL), in input order."""
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _imagehash()  # fail once, up front, rather than in every worker
    paths = [Path(p) for p in paths]

    def one(path: Path) -> ImageInfo | ImageError:
        try:
            return scan_image(path, hash_size=hash_size, hash_side=hash_side)
        except ImageDecodeError as e:
            return ImageError(path=e.path, reason=e.reason)

    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="img", desc="images", disable=not progress, file=sys.stderr) as bar:
        results = []
        for result in map_ahead(one, paths, workers, name="loracap-scan"):
            results.append(result)
            bar.update()
    infos = [r for r in results if isinstance(r, ImageInfo)]
    errors = [r for r in results if isinstance(r, ImageError)]
    return infos, errors


# --- duplicates -------------------------------------------------------------------------------------


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _distance_rows(packed: np.ndarray, i: int, others: np.ndarray | slice) -> np.ndarray:
    """Hamming distances from hash i to the hashes at ``others`` (packed uint8 rows)."""
    return _POPCOUNT[packed[others] ^ packed[i]].sum(axis=1, dtype=np.int32)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """Packed uint8 rows as uint64 words (zero-padded): one XOR per 64 bits when comparing many pairs."""
    pad = -packed.shape[1] % 8
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of uint64 words."""
    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(words).sum(axis=1, dtype=np.int32)
    return _POPCOUNT[words.view(np.uint8)].sum(axis=1, dtype=np.int32)


def _close_pairs(packed: np.ndarray, nbits: int, threshold: int) -> np.ndarray:
    """Rows (i, j), i < j, of hashes at most ``threshold`` bits apart: every such pair, exactly (when every
    pair is, only (0, j) for each j: the same groups without n**2 pairs in memory).

    Multi-index hashing (pigeonhole): cut the bits into threshold + 1 disjoint chunks; two hashes that
    differ in at most ``threshold`` bits agree exactly on at least one chunk. So only hashes sharing a
    chunk value are compared: about n**2 / 2**chunk_bits pairs per chunk instead of n**2 / 2, for 64-bit
    hashes and the default 6 bits 7 chunks of 9-10 bits (100k hashes: tens of millions of vectorised
    comparisons instead of five billion).
    """
    n = len(packed)
    if threshold >= nbits:  # every pair is close; linking each row to the first one says as much
        return np.stack([np.zeros(max(n - 1, 0), dtype=np.int64), np.arange(1, n)], axis=1)
    bits = np.unpackbits(packed, axis=1, count=nbits)
    words = _as_words(packed)
    found = []
    for chunk in np.array_split(np.arange(nbits), threshold + 1):
        _, label = np.unique(np.packbits(bits[:, chunk], axis=1), axis=0, return_inverse=True)
        label = label.ravel()
        order = np.argsort(label, kind="stable")  # equal chunk values together, rows ascending in each
        starts = np.flatnonzero(np.r_[True, np.diff(label[order]) != 0])
        lengths = np.diff(np.r_[starts, n])
        for rows, cols in _pairs_in_runs(order, starts, lengths):
            close = _popcount(words[rows] ^ words[cols]) <= threshold
            found.append(np.stack([rows[close], cols[close]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)  # a pair agreeing on several chunks is found again


def _pairs_in_runs(order: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch: int = 1 << 22):
    """Every pair (order[s + a], order[s + b]), a < b, within each run [s, s + length) of ``order``,
    in batches of about ``batch`` pairs (runs of one length at a time, a long run a row at a time)."""
    for length in np.unique(lengths[lengths > 1]).tolist():
        run_starts = starts[lengths == length]
        if length * (length - 1) // 2 > batch:  # a huge run (many hashes share a chunk): row by row
            for s in run_starts.tolist():
                members = order[s : s + length]
                for k in range(length - 1):
                    yield np.full(length - 1 - k, members[k]), members[k + 1 :]
            continue
        a, b = np.triu_indices(length, k=1)
        step = max(1, batch // len(a))
        for first in range(0, len(run_starts), step):
            base = run_starts[first : first + step, None]
            yield order[(base + a).ravel()], order[(base + b).ravel()]


def find_duplicate_groups(infos: Sequence[ImageInfo], threshold: int | None = None) -> list[DuplicateGroup]:
    """Groups of 2+ images whose phashes are within ``threshold`` bits, or whose bytes are identical.

    Grouping is transitive (A~B and B~C puts A, B, C together): a chain of small edits is one picture
    to a trainer. Pairs come from multi-index hashing (see _close_pairs): the same groups as comparing all
    pairs, in about linear time (100k images in seconds). ``threshold`` defaults to default_threshold()
    for the hashes' size, read from their bit count.
    """
    n = len(infos)
    if n < 2:
        return []
    bits = {info.phash.size for info in infos}
    if len(bits) != 1:
        raise ValueError(f"all hashes must have the same size, got {sorted(bits)}")
    nbits = bits.pop()
    if threshold is None:
        threshold = default_threshold(math.isqrt(nbits))  # phash bits are hash_size squared
    if not 0 <= threshold <= nbits:
        raise ValueError(f"threshold must be in 0..{nbits}, got {threshold}")

    packed = np.packbits(np.stack([info.phash for info in infos]), axis=1)
    uf = UnionFind(n)
    by_digest: dict[str, int] = {}
    for i, info in enumerate(infos):
        first = by_digest.setdefault(info.sha256, i)
        if first != i:
            uf.union(first, i)
    # Equal hashes are 0 bits apart: join them here and search pairs among the distinct ones only.
    distinct, first_row, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    for i, d in enumerate(inverse.ravel().tolist()):
        uf.union(int(first_row[d]), i)
    for a, b in _close_pairs(distinct, nbits, threshold).tolist():
        uf.union(int(first_row[a]), int(first_row[b]))

    groups = []
    for idx in uf.groups().values():
        if len(idx) < 2:
            continue
        arr = np.array(idx)
        max_distance = max(int(_distance_rows(packed, i, arr).max()) for i in idx)
        best = max(idx, key=lambda k: (infos[k].width * infos[k].height, -k))
        groups.append(
            DuplicateGroup(
                paths=tuple(infos[k].path for k in idx),
                exact=len({infos[k].sha256 for k in idx}) == 1,
                max_distance=max_distance,
                keep=infos[best].path,
            )
        )
    return groups  # in order of each group's first file, since union-find roots are the smallest index


# --- sizes ------------------------------------------------------------------------------------------


def resolution_histogram(
    sizes: Iterable[tuple[int, int]], edges: Sequence[int] = RESOLUTION_EDGES
) -> list[HistogramBin]:
    """Counts of shorter sides per bin: ``<e0``, ``e0-e1``, ..., ``>=eN`` (every bin listed, even empty)."""
    bounds = [0, *edges, math.inf]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"edges must be positive and increasing, got {list(edges)}")
    counts = Counter(int(np.searchsorted(edges, min(w, h), side="right")) for w, h in sizes)
    bins = []
    for k, (low, high) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if k == 0:
            label = f"<{high}"
        elif high == math.inf:
            label = f">={low}"
        else:
            label = f"{low}-{high - 1}"
        bins.append(HistogramBin(label=label, low=low, high=high, count=counts.get(k, 0)))
    return bins


def aspect_histogram(
    sizes: Iterable[tuple[int, int]], ratios: Sequence[tuple[int, int]] = ASPECT_RATIOS
) -> list[HistogramBin]:
    """Counts per named aspect ratio; each image goes to the nearest one (compared in log space, so 1:2
    and 2:1 are equally far from 1:1). Bin bounds are the geometric midpoints between neighbours."""
    logs = np.log([w / h for w, h in ratios])
    if np.any(np.diff(logs) <= 0):
        raise ValueError("ratios must be listed from tallest to widest, without repeats")
    mids = np.exp((logs[1:] + logs[:-1]) / 2)
    counts = Counter(int(np.searchsorted(mids, w / h, side="right")) for w, h in sizes)
    bounds = [0.0, *map(float, mids), math.inf]
    return [
        HistogramBin(label=f"{w}:{h}", low=bounds[k], high=bounds[k + 1], count=counts.get(k, 0))
        for k, (w, h) in enumerate(ratios)
    ]


def find_small_images(infos: Iterable[ImageInfo], min_side: int | str = 1024) -> list[SmallImage]:
    """Images whose shorter side is below ``min_side`` (pixels or a preset name: sd15 512, sdxl/flux 1024)."""
    limit = resolve_side(min_side)
    return [SmallImage(i.path, i.width, i.height) for i in infos if i.short_side < limit]


def bucket_preview(
    infos: Iterable[ImageInfo], settings: BucketSettings | None = None
) -> tuple[list[BucketAssignment], list[Bucket]]:
    """Every image's bucket, and the buckets in use, most populated first (then by width, height): the
    assignment `loracap dreambooth` trains with (`loracap.dataset.buckets.assign_buckets`)."""
    return assign_buckets(((i.path, i.width, i.height) for i in infos), settings)


# --- everything -------------------------------------------------------------------------------------


def image_report(
    paths: Iterable[str | Path],
    *,
    min_side: int | str = 1024,
    resolution: int | str = 1024,
    hash_size: int = 8,
    threshold: int | None = None,
    workers: int = 2,
    hash_side: int = DEFAULT_HASH_SIDE,
    buckets: BucketSettings | None = None,
    progress: bool = False,
) -> ImageReport:
    """All image checks over ``paths``: one scan, then duplicates, histograms, small images, buckets.

    ``min_side`` and ``resolution`` take pixels or a preset ("sd15" 512, "sdxl"/"flux" 1024).
    ``buckets`` are the kohya settings to preview; without them, the defaults at ``resolution``
    (`BucketSettings.at`, as `loracap dreambooth` trains; ``resolution`` is not used when ``buckets`` is
    given). ``threshold`` (Hamming bits) defaults to 6 per
    64 hash bits. Bad files end up in ``errors``.
    """
    settings = buckets if buckets is not None else BucketSettings.at(resolve_side(resolution))
    limit = resolve_side(min_side)  # validate everything before the (long) scan
    if threshold is None:
        threshold = default_threshold(hash_size)
    if not 0 <= threshold <= hash_size * hash_size:
        raise ValueError(f"threshold must be in 0..{hash_size * hash_size}, got {threshold}")
    started = time.perf_counter()
    infos, errors = scan_images(
        paths, hash_size=hash_size, hash_side=hash_side, workers=workers, progress=progress
    )
    scanned = time.perf_counter()
    duplicate_groups = find_duplicate_groups(infos, threshold)
    grouped = time.perf_counter()
    sizes = [(i.width, i.height) for i in infos]
    assignments, buckets = bucket_preview(infos, settings)
    report = ImageReport(
        images=infos,
        errors=errors,
        duplicate_groups=duplicate_groups,
        resolution_histogram=resolution_histogram(sizes),
        aspect_histogram=aspect_histogram(sizes),
        min_side=limit,
        small_images=find_small_images(infos, limit),
        bucket_settings=settings,
        assignments=assignments,
        buckets=buckets,
    )
    report.timing = {
        "scan_s": scanned - started,
        "duplicates_s": grouped - scanned,
        "sizes_s": time.perf_counter() - grouped,
    }
    return report
