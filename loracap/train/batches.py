"""Examples -> training batches: the image dataset, the epoch sampler and the collate function.

`CaptionDataset` decodes the images, `EpochSampler` orders them (the same order again on a resume) and
`Collate` makes a batch of the items: pixels (or cached features, from `loracap.train.features`'
`FeatureDataset`) and the tokenized captions. (Not named `datasets`: that is the Hugging Face package
`loracap.train.data` reads tables with.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from loracap.backends.prefix_captioner import input_side
from loracap.inputs import ImageDecodeError
from loracap.prefix.batching import encode_captions
from loracap.train.data import Example, visit_of

log = logging.getLogger(__name__)

__all__ = ["CaptionDataset", "Collate", "EpochSampler", "make_collate"]


class CaptionDataset(Dataset):
    """Decoded images with their captions (the image processor runs once per batch, in `make_collate`).
    An image that cannot be decoded is reported with its name and left out of its batch; training goes on.

    Files are decoded as `loracap caption` decodes them, shrunk to the processor's input side while
    decoding, so the captioner trains on the pixels it will later caption from."""

    def __init__(self, examples: list[Example], image_processor: Any) -> None:
        self.examples = examples
        self.min_side = input_side(image_processor) or None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        position, visit = visit_of(index, len(self.examples))  # see EpochSampler
        example = self.examples[position]
        try:
            image = example.image(min_side=self.min_side)
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", example.key, exc.reason)
            return None
        return {"image": image, "caption": example.caption_for(visit)}


class EpochSampler(Sampler[int]):
    """A fresh seeded order every epoch: epoch e always visits the same order, so a resumed run sees
    the batches the interrupted one would have seen. Indices carry the visit (seed and epoch) as
    `i + n * visit`, which the datasets read back (`visit_of`) to draw the epoch's line of a caption with
    several."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        visit = self.seed * 100_003 + self.epoch
        generator = torch.Generator().manual_seed(visit)
        return iter(i + self.n * visit for i in torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def make_collate(tokenizer: Any, image_processor: Any, prompt: str, max_caption_tokens: int) -> Collate:
    return Collate(tokenizer, image_processor, prompt, max_caption_tokens)


@dataclass
class Collate:
    """Dataset items -> a training batch; None when every image of the batch was unreadable.

    A class, not a closure: DataLoader workers started with "spawn" (macOS, Windows) receive it pickled."""

    tokenizer: Any
    image_processor: Any
    prompt: str
    max_caption_tokens: int

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [item for item in items if item is not None]
        if not items:
            return None
        captions = [item["caption"] for item in items]
        batch = encode_captions(
            self.tokenizer, captions, prompt=self.prompt, max_caption_tokens=self.max_caption_tokens
        )
        if "features" in items[0]:  # FeatureDataset: the tower already ran on these images
            batch["vision_features"] = torch.stack([item["features"] for item in items])
        else:
            # One processor call per batch (in the loader's worker) rather than one per image.
            images = [item["image"] for item in items]
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        batch["captions"] = captions
        return batch
