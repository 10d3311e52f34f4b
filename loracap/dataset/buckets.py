"""Aspect-ratio buckets as kohya sd-scripts makes them: the one assignment the report previews and
`loracap dreambooth` trains with.

sd-scripts (library/train_util.py `BucketManager`, `--enable_bucket`): a fixed list of (width, height)
buckets of about resolution^2 pixels, sides multiples of --bucket-reso-steps between --min-bucket-reso and
--max-bucket-reso; each image goes to the bucket nearest its aspect ratio, is resized to cover it and
cropped to it (centred, or at a random place with random crops). With --bucket-no-upscale, images are not
enlarged: an image over the area is shrunk to it, and its bucket is its own size floored to the steps.
A batch holds images of one bucket only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = [
    "Bucket",
    "BucketAssignment",
    "BucketSettings",
    "assign_buckets",
    "cover_size",
    "crop_top_left",
    "fit_to_bucket",
    "make_bucket_resolutions",
    "select_bucket",
]


@dataclass(frozen=True)
class BucketAssignment:
    """Where kohya would put one image: bucket (w, h), the size it is resized to before the crop."""

    path: Path
    bucket: tuple[int, int]
    resized: tuple[int, int]
    aspect_error: float  # bucket aspect minus image aspect: how much gets cropped away


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    paths: tuple[Path, ...]

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def single(self) -> bool:
        # A one-image bucket is a batch of one every epoch (batch size silently drops), and with
        # batch_size > 1 the image is trained less evenly: worth cropping it into a common bucket.
        return self.count == 1


@dataclass(frozen=True)
class BucketSettings:
    """kohya sd-scripts' bucket arguments (--resolution, --min/max_bucket_reso, --bucket_reso_steps,
    --bucket_no_upscale)."""

    resolution: int = 1024
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if self.bucket_reso_steps < 1:
            raise ValueError(f"bucket_reso_steps must be >= 1, got {self.bucket_reso_steps}")
        if not 0 < self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ValueError(
                "need 0 < min_bucket_reso <= resolution <= max_bucket_reso, got "
                f"{self.min_bucket_reso}, {self.resolution}, {self.max_bucket_reso}"
            )
        if self.min_bucket_reso % self.bucket_reso_steps or self.max_bucket_reso % self.bucket_reso_steps:
            # Bucket sides run from min to max in steps: off the grid they would not be whole steps (nor
            # whole latent patches).
            raise ValueError(
                f"min_bucket_reso ({self.min_bucket_reso}) and max_bucket_reso ({self.max_bucket_reso}) must "
                f"be multiples of bucket_reso_steps ({self.bucket_reso_steps})"
            )

    @classmethod
    def at(
        cls,
        resolution: int,
        *,
        min_bucket_reso: int | None = None,
        max_bucket_reso: int | None = None,
        bucket_reso_steps: int = 64,
        no_upscale: bool = False,
    ) -> BucketSettings:
        """The settings at `resolution`, the limits not given taking loracap's defaults (the same in
        `loracap report` and `loracap dreambooth`): min(256, resolution) and 2 x resolution."""
        return cls(
            resolution=resolution,
            min_bucket_reso=min_bucket_reso or min(256, resolution),
            max_bucket_reso=max_bucket_reso or 2 * resolution,
            bucket_reso_steps=bucket_reso_steps,
            no_upscale=no_upscale,
        )

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution


# --- kohya bucketing --------------------------------------------------------------------------------


def make_bucket_resolutions(settings: BucketSettings) -> list[tuple[int, int]]:
    """The (width, height) buckets sd-scripts predefines: for each width from min to max bucket reso in
    steps, the tallest height (a multiple of steps, within the limits) keeping the area <= resolution^2,
    plus its transpose and the square."""
    step, area = settings.bucket_reso_steps, settings.max_area
    side = int(math.sqrt(area) // step) * step
    resos = {(side, side)}
    for width in range(settings.min_bucket_reso, settings.max_bucket_reso + 1, step):
        height = min(settings.max_bucket_reso, (area // width) // step * step)
        if height >= settings.min_bucket_reso:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _round_to_steps(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def select_bucket(
    width: int, height: int, settings: BucketSettings, resos: Sequence[tuple[int, int]] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized size) for an image of ``width`` x ``height``, the way sd-scripts' BucketManager
    picks them. The image is later resized to ``resized`` and centre-cropped to ``bucket``.

    Default: the predefined bucket with the nearest aspect ratio (an exact size match wins), the image
    scaled (up or down) to cover it. ``no_upscale``: images over the area are first shrunk to it, with
    whichever side rounded to steps keeps the aspect closer; the bucket is the size floored to steps.
    """
    aspect = width / height
    step = settings.bucket_reso_steps
    if not settings.no_upscale:
        resos = make_bucket_resolutions(settings) if resos is None else resos
        if (width, height) in resos:
            bucket = (width, height)
        else:
            # First minimum, like numpy's argmin over the sorted list: ties go to the narrower bucket.
            bucket = min(resos, key=lambda r: abs(r[0] / r[1] - aspect))
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return bucket, resized

    if width * height > settings.max_area:
        target_w = math.sqrt(settings.max_area * aspect)
        target_h = settings.max_area / target_w
        w_rounded = _round_to_steps(target_w, step)
        h_in_w = _round_to_steps(w_rounded / aspect, step)
        h_rounded = _round_to_steps(target_h, step)
        w_in_h = _round_to_steps(h_rounded * aspect, step)
        err_w = abs(w_rounded / h_in_w - aspect) if h_in_w else math.inf
        err_h = abs(w_in_h / h_rounded - aspect) if h_rounded else math.inf
        if err_w < err_h:
            resized = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            resized = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return bucket, resized


def assign_buckets(
    sizes: Iterable[tuple[Path, int, int]], settings: BucketSettings | None = None
) -> tuple[list[BucketAssignment], list[Bucket]]:
    """Every image's bucket, from (path, width, height), and the buckets in use, most populated first (then
    by width, height)."""
    settings = settings or BucketSettings()
    resos = None if settings.no_upscale else make_bucket_resolutions(settings)
    assignments = []
    for path, width, height in sizes:
        bucket, resized = select_bucket(width, height, settings, resos)
        # no_upscale can floor a tiny image's side to 0; kohya would fail on it, so it shows here as is.
        error = bucket[0] / bucket[1] - width / height if bucket[1] else math.inf
        assignments.append(BucketAssignment(path, bucket, resized, error))
    by_bucket: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for a in assignments:
        by_bucket[a.bucket].append(a.path)
    buckets = [Bucket(w, h, tuple(paths)) for (w, h), paths in by_bucket.items()]
    buckets.sort(key=lambda b: (-b.count, b.width, b.height))
    return assignments, buckets


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so that it covers `bucket` (width, height) with the least excess."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def crop_top_left(
    bucket: tuple[int, int], resized: tuple[int, int], where: float | None = None
) -> tuple[int, int]:
    """(top, left) of the `bucket` crop in an image resized to `resized`: centred (`where` None) or at
    `where` (0..1) along the sides with room to spare. What SDXL is conditioned on, and part of a cached
    latent's key: the one place the crop is placed."""
    spare_x, spare_y = max(0, resized[0] - bucket[0]), max(0, resized[1] - bucket[1])
    if where is None:
        return spare_y // 2, spare_x // 2
    return round(spare_y * where), round(spare_x * where)


def fit_to_bucket(
    image: Image.Image, bucket: tuple[int, int], resized: tuple[int, int], where: float | None
) -> tuple[Image.Image, tuple[int, int]]:
    """`image` resized to `resized` (which covers `bucket`), then cropped to `bucket` (width, height):
    centred (`where` None) or at `where` (0..1) along the sides with room to spare. Returns the crop and its
    (top, left) in the resized image, which SDXL is conditioned on."""
    resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    top, left = crop_top_left(bucket, resized, where)
    return image.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)
