"""Instances (and class images) -> training batches: the sampler, the dataset and the collate function.

An epoch is one pass over the instance images in a seeded order; with prior preservation each instance
item is paired with one class image, the class images cycling in their own seeded order across epochs.
The sampler yields a `Draw` per item, its indices and a seed of its own, from which the item draws its
crop, flip, caption dropout and tag order: a resumed run (which skips the batches it already trained)
sees exactly the items the interrupted one would have, whatever the data loader workers did.

Batches put the instance items first and the class items after them (`Batch.instance_count` says where
the halves meet): one forward pass of the denoiser serves both losses, as in the DreamBooth paper.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from loracap.dreambooth.captions import Instance, training_caption
from loracap.inputs import ImageDecodeError, load_image, read_size

log = logging.getLogger(__name__)

__all__ = ["Batch", "Draw", "DreamBoothDataset", "DrawSampler", "Sample", "collate", "square_crop"]

_MIX = 1_000_003  # a prime: seed, epoch and position mixed into one item seed


@dataclass(frozen=True)
class Draw:
    """What the sampler hands the dataset for one item."""

    instance: int
    klass: int | None
    seed: int


class DrawSampler(Sampler[Draw]):
    """A fresh seeded instance order every epoch; class images follow their own fixed seeded order,
    continuing where the last item left off (so every class image is used before any repeats)."""

    def __init__(self, instances: int, classes: int, seed: int) -> None:
        self.instances, self.classes, self.seed, self.epoch = instances, classes, seed, 0
        gen = torch.Generator().manual_seed(seed * _MIX + 7)
        self.class_order = torch.randperm(classes, generator=gen).tolist() if classes else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Draw]:
        gen = torch.Generator().manual_seed(self.seed * _MIX + self.epoch)
        order = torch.randperm(self.instances, generator=gen).tolist()
        for k, index in enumerate(order):
            position = self.epoch * self.instances + k
            klass = self.class_order[position % self.classes] if self.classes else None
            yield Draw(index, klass, (self.seed * _MIX + position) % (2**63))

    def __len__(self) -> int:
        return self.instances


@dataclass
class Sample:
    """One decoded, cropped image and the caption it trains with."""

    pixels: torch.Tensor
    """(3, side, side) in [-1, 1]."""
    caption: str
    original_size: tuple[int, int]
    """(height, width) of the file: SDXL is conditioned on it."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image: SDXL is conditioned on it too."""


@dataclass
class Batch:
    pixel_values: torch.Tensor
    """(B, 3, side, side): the instance items, then the class items."""
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    instance_count: int
    """How many of the B items are instance images; the rest are class images."""

    @property
    def target_size(self) -> tuple[int, int]:
        return (int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1]))


class DreamBoothDataset(Dataset):
    """Decodes, resizes and crops one instance image (and its class image) per `Draw`. An image that no
    longer decodes is reported by name and left out of its batch; training goes on."""

    def __init__(
        self,
        instances: list[Instance],
        class_images: list[Path],
        class_prompt: str | None,
        *,
        side: int,
        random_crop: bool,
        random_flip: bool,
        tags: bool,
        caption_dropout: float,
        shuffle_tags: bool,
        keep_tokens: int,
    ) -> None:
        self.instances, self.class_images, self.class_prompt = instances, class_images, class_prompt
        self.side, self.random_crop, self.random_flip = side, random_crop, random_flip
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
        caption = training_caption(instance.caption, rng, **self.caption_options)
        first = self._sample(instance.image, caption, rng)
        second = None
        if draw.klass is not None:
            second = self._sample(self.class_images[draw.klass], self.class_prompt or "", rng)
        return first, second

    def _sample(self, path: Path, caption: str, rng: random.Random) -> Sample | None:
        # Drawn before decoding, so an unreadable image does not shift the draws of the next one.
        where, flip = rng.random(), rng.random()
        try:
            width, height = read_size(path)
            image = load_image(path, min_side=self.side)
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", path.name, exc.reason)
            return None
        image, top_left = square_crop(image, self.side, where if self.random_crop else None)
        if self.random_flip and flip < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
        pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
        return Sample(pixels, caption, (height, width), top_left)


def square_crop(image: Image.Image, side: int, where: float | None) -> tuple[Image.Image, tuple[int, int]]:
    """The shorter side resized to `side`, then a `side` x `side` crop: centred (`where` None) or at
    `where` (0..1) along the longer side. Returns the crop and its (top, left) in the resized image."""
    width, height = image.size
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    spare_x, spare_y = size[0] - side, size[1] - side
    if where is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = round(spare_x * where), round(spare_y * where)
    return image.crop((left, top, left + side, top + side)), (top, left)


def collate(items: list[tuple[Sample | None, Sample | None]]) -> Batch | None:
    """Dataset items -> a `Batch`, instance samples first; None when every instance image was unreadable."""
    firsts = [a for a, _ in items if a is not None]
    seconds = [b for _, b in items if b is not None]
    if not firsts:
        return None
    samples = firsts + seconds
    return Batch(
        pixel_values=torch.stack([s.pixels for s in samples]),
        captions=[s.caption for s in samples],
        original_sizes=[s.original_size for s in samples],
        crop_top_lefts=[s.crop_top_left for s in samples],
        instance_count=len(firsts),
    )
