"""BLIP (Salesforce/blip-image-captioning-base/large): one-line captions, optionally continuing a prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import GenerationSettings, check_mode
from .device import Placement, default_batch_size, image_side, load_model


class BlipBackend:
    modes = ("caption",)
    tag_modes: frozenset[str] = frozenset()
    instructions = False  # task tokens / a text prefix, not free-text instructions

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.name = name
        self.placement = placement
        self.processor = BlipProcessor.from_pretrained(folder)
        self.model = load_model(BlipForConditionalGeneration, folder, placement, quant)
        self.default_batch_size = default_batch_size(placement, gpu_batch=64)
        self.image_side = image_side(self.processor.image_processor)  # BLIP processors give height/width

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> dict[str, Any]:
        check_mode(self, mode)
        # With a prompt ("a photo of") BLIP continues it, and the caption keeps those words.
        text = [prompt] * len(images) if prompt else None
        batch = self.processor(images=images, text=text, return_tensors="pt")
        batch["pixel_values"] = batch["pixel_values"].to(self.placement.dtype)
        return dict(batch)

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], settings: GenerationSettings) -> list[str]:
        device = self.placement.device
        out = self.model.generate(
            **{k: v.to(device) for k, v in inputs.items()}, **settings.generate_kwargs(40)
        )
        return [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]
