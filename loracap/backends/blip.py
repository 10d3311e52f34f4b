"""BLIP (Salesforce/blip-image-captioning-base/large): one-line captions, optionally continuing a prefix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .base import Generation, GenerationSettings, check_mode, fit_decoder, generations
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
        if self.placement.device.type == "cuda":  # page-locked memory lets the copy overlap compute
            return {k: v.pin_memory() for k, v in batch.items()}
        return dict(batch)

    def generate(self, inputs: dict[str, Any], settings: GenerationSettings) -> list[str]:
        return [g.text for g in self.generate_detailed(inputs, settings)]

    @torch.inference_mode()
    def generate_detailed(
        self,
        inputs: dict[str, Any],
        settings: GenerationSettings,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        device = self.placement.device
        # The decoder continues from its start token, or from the prompt ("a photo of"), whose trailing
        # [SEP] BLIP's generate drops.
        start = inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1
        kwargs = settings.generate_kwargs(40, interrupt=interrupt, inputs=inputs)
        kwargs = fit_decoder(kwargs, self.model, start, self.name)
        out = self.model.generate(**{k: v.to(device, non_blocking=True) for k, v in inputs.items()}, **kwargs)
        texts = [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]
        config, limit = self.model.generation_config, kwargs["max_new_tokens"]
        return generations(texts, [start] * len(texts), out[:, start:], config, limit)
