"""Instances (and class images) -> training batches: buckets, the batch sampler, the dataset, collate.

Every image has a `Placement`: the bucket (width, height) it trains at and the size it is resized to
before the crop. With buckets (the default) that is kohya's assignment, `loracap.dataset.buckets` (the one
`loracap report` previews); without, every image is cropped square at the training side. A batch holds one
bucket: a class image paired with an instance image is cropped to the instance's bucket.

An epoch is one pass over the instance images: a seeded order, grouped by bucket into batches, the batches
in a seeded order. The sampler yields each batch as `Draw`s, an item's indices and a seed of its own, from
which the item draws its crop, flip, caption dropout and tag order; with prior preservation each instance
item is paired with one class image, the class images cycling in their own seeded order across epochs. A
resumed run (which skips the batches it already trained) sees exactly the items the interrupted one would
have, whatever the data loader workers did.

With the latent cache an item carries the VAE's stored distribution of its exact crop and flip instead of
pixels, looked up by the item's own image (never by position, so it cannot be paired with another image's
caption). Batches put the instance items first and the class items after them (`Batch.instance_count`):
one forward pass of the denoiser serves both losses, as in the DreamBooth paper.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from loracap.dataset.buckets import BucketSettings, assign_buckets, cover_size, crop_top_left, fit_to_bucket
from loracap.dreambooth.captions import Instance, training_caption
from loracap.inputs import ImageDecodeError, load_image, read_size

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "BucketBatchSampler",
    "Draw",
    "DreamBoothDataset",
    "Placement",
    "Sample",
    "bucket_settings",
    "collate",
    "place_images",
]

_MIX = 1_000_003  # a prime: seed, epoch and position mixed into one item seed


@dataclass(frozen=True)
class Placement:
    """Where one image trains: its bucket (width, height) and the size it is resized to before the crop."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


def bucket_settings(config: Any, side: int) -> BucketSettings:
    """kohya's bucket settings for a run at `side` pixels (`DreamBoothConfig`'s bucket options), with the
    defaults `loracap report` previews."""
    return BucketSettings.at(
        side,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps,
        no_upscale=config.bucket_no_upscale,
    )


def place_images(
    sizes: Sequence[tuple[Path, int, int]], settings: BucketSettings | None, side: int
) -> list[Placement]:
    """Each image's placement from (path, width, height): kohya's bucket with `settings`, or (None) a
    `side` square."""
    if settings is None:
        return [Placement((side, side), cover_size(w, h, (side, side))) for _, w, h in sizes]
    assignments, _ = assign_buckets(sizes, settings)
    placements = []
    for (path, width, height), a in zip(sizes, assignments, strict=True):
        if min(a.bucket) < 1:  # --bucket-no-upscale floors a tiny image's side to 0 steps
            raise ValueError(
                f"{path.name} ({width}x{height}) is smaller than one --bucket-reso-steps "
                f"({settings.bucket_reso_steps} px) and --bucket-no-upscale keeps it so: leave it out or "
                "allow upscaling"
            )
        placements.append(Placement(a.bucket, a.resized))
    return placements


@dataclass(frozen=True)
class Draw:
    """What the sampler hands the dataset for one item."""

    instance: int
    klass: int | None
    seed: int


class BucketBatchSampler(Sampler[list[Draw]]):
    """Batches of one bucket each: every epoch a fresh seeded instance order, chunked per bucket, the
    batches shuffled; class images follow their own fixed seeded order, continuing where the last item left
    off (so every class image is used before any repeats). The last batch of a bucket may be smaller."""

    def __init__(self, buckets: Sequence[tuple[int, int]], classes: int, batch_size: int, seed: int) -> None:
        self.buckets, self.classes, self.batch_size = list(buckets), classes, batch_size
        self.seed, self.epoch = seed, 0
        gen = torch.Generator().manual_seed(seed * _MIX + 7)
        self.class_order = torch.randperm(classes, generator=gen).tolist() if classes else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The instance indices of each batch of `epoch`, in training order."""
        gen = torch.Generator().manual_seed(self.seed * _MIX + epoch)
        order = torch.randperm(len(self.buckets), generator=gen).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            groups.setdefault(self.buckets[index], []).append(index)
        chunks = [
            group[i : i + self.batch_size]
            for group in groups.values()
            for i in range(0, len(group), self.batch_size)
        ]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]

    def __iter__(self) -> Iterator[list[Draw]]:
        position = self.epoch * len(self.buckets)
        for chunk in self.batches(self.epoch):
            draws = []
            for index in chunk:
                klass = self.class_order[position % self.classes] if self.classes else None
                draws.append(Draw(index, klass, (self.seed * _MIX + position) % (2**63)))
                position += 1
            yield draws

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())


@dataclass
class Sample:
    """One item: decoded and cropped pixels (or its cached latent distribution) and its caption."""

    pixels: torch.Tensor | None
    """(3, height, width) in [-1, 1]; None when the latents come from the cache."""
    latent_parameters: torch.Tensor | None
    """The VAE's stored distribution of this exact crop and flip (latent cache); None otherwise."""
    caption: str
    original_size: tuple[int, int]
    """(height, width) of the file: SDXL is conditioned on it."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image: SDXL is conditioned on it too."""
    target_size: tuple[int, int]
    """(height, width) of the bucket."""


@dataclass
class Batch:
    pixel_values: torch.Tensor | None
    """(B, 3, height, width): the instance items, then the class items; None with cached latents."""
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    instance_count: int
    """How many of the B items are instance images; the rest are class images."""
    target_size: tuple[int, int] = (0, 0)
    """(height, width) of the batch's bucket."""
    latent_parameters: torch.Tensor | None = None
    """(B, 2 x latent channels, h, w) from the latent cache, in place of pixels."""


class LatentLookup:
    """Where the dataset finds an item's cached latents: the cache and each (image, bucket, flip)'s key."""

    def __init__(self, cache: Any, keys: dict[tuple[Path, tuple[int, int], bool], Any]) -> None:
        self.cache, self.keys = cache, keys

    def get(self, path: Path, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
        key = self.keys.get((path, bucket, flip))
        if key is None:  # it could not be read when the cache was filled: left out, as without the cache
            raise ImageDecodeError(path, "it could not be read when the latent cache was filled")
        parameters = self.cache.load(key)
        if parameters is None:
            raise RuntimeError(
                f"the latent cache lost {path.name}'s entry during training ({self.cache.path(key)}); "
                "resume the run (--resume) to encode it again"
            )
        return parameters


class DreamBoothDataset(Dataset):
    """Decodes, resizes and crops one instance image (and its class image) per `Draw`, or reads their
    cached latents. An image that no longer decodes is reported by name and left out of its batch;
    training goes on."""

    def __init__(
        self,
        instances: list[Instance],
        placements: list[Placement],
        class_images: list[Path],
        class_prompt: str | None,
        *,
        random_crop: bool,
        random_flip: bool,
        tags: bool,
        caption_dropout: float,
        shuffle_tags: bool,
        keep_tokens: int,
        latents: LatentLookup | None = None,
    ) -> None:
        self.instances, self.placements = instances, placements
        self.class_images, self.class_prompt = class_images, class_prompt
        self.random_crop, self.random_flip, self.latents = random_crop, random_flip, latents
        self.caption_options = {
            "tags": tags,
            "dropout": caption_dropout,
            "shuffle": shuffle_tags,
            "keep_tokens": keep_tokens,
        }

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, draw: Draw) -> tuple[Sample | None, Sample | None]:
        rng = random.Random(draw.seed)
        instance = self.instances[draw.instance]
        placement = self.placements[draw.instance]
        caption = training_caption(instance.caption, rng, **self.caption_options)
        first = self._sample(instance.image, caption, placement, rng, instance.size)
        second = None
        if draw.klass is not None:
            path = self.class_images[draw.klass]
            second = self._sample(path, self.class_prompt or "", placement.bucket, rng, None)
        return first, second

    def _sample(
        self,
        path: Path,
        caption: str,
        placement: Placement | tuple[int, int],
        rng: random.Random,
        size: tuple[int, int] | None,
    ) -> Sample | None:
        # Drawn before decoding, so an unreadable image does not shift the draws of the next one.
        where, flip = rng.random(), rng.random()
        flip_it = self.random_flip and flip < 0.5
        try:
            width, height = size or read_size(path)
            if not isinstance(placement, Placement):  # a class image, cropped to its partner's bucket
                placement = Placement(placement, cover_size(width, height, placement))
            bucket, resized = placement.bucket, placement.resized
            if self.latents is not None:
                top_left = crop_top_left(bucket, resized)
                parameters = self.latents.get(path, bucket, flip_it)
                return Sample(None, parameters, caption, (height, width), top_left, (bucket[1], bucket[0]))
            image = load_image(path, min_side=min(resized))
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", path.name, exc.reason)
            return None
        image, top_left = crop_image(image, placement, where if self.random_crop else None, flip_it)
        return Sample(to_pixels(image), None, caption, (height, width), top_left, (bucket[1], bucket[0]))


def crop_image(
    image: Image.Image, placement: Placement, where: float | None, flip: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """The image as it trains: resized and cropped to its bucket (centred, or at `where`), mirrored when
    `flip`. Returns it and the crop's (top, left)."""
    # The placement was made from the header's size; a decode shrunk by the loader (min_side) is resized
    # from there, which lands on the same size.
    image, top_left = fit_to_bucket(image, placement.bucket, placement.resized, where)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, top_left


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, height, width) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def collate(items: list[tuple[Sample | None, Sample | None]]) -> Batch | None:
    """Dataset items -> a `Batch`, instance samples first; None when every instance image was unreadable."""
    firsts = [a for a, _ in items if a is not None]
    seconds = [b for _, b in items if b is not None]
    if not firsts:
        return None
    samples = firsts + seconds
    cached = samples[0].latent_parameters is not None
    return Batch(
        pixel_values=None if cached else torch.stack([s.pixels for s in samples]),
        latent_parameters=torch.stack([s.latent_parameters for s in samples]) if cached else None,
        captions=[s.caption for s in samples],
        original_sizes=[s.original_size for s in samples],
        crop_top_lefts=[s.crop_top_left for s in samples],
        instance_count=len(firsts),
        target_size=samples[0].target_size,
    )
