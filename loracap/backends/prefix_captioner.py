"""Captioners trained with `loracap train`: one style, the one they were taught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import BackendError, GenerationSettings
from .device import Placement, default_batch_size


class PrefixCaptionerBackend:
    modes = ("caption",)
    instructions = False  # it writes the house style it was trained on, whatever the prompt

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from loracap.prefix.batching import prompt_ids
        from loracap.prefix.io import load_captioner

        if quant:
            raise BackendError(
                f"{name}: --quant is not supported for loracap-trained captioners (they are small)"
            )
        self.name = name
        self.placement = placement
        loaded = load_captioner(folder, device=placement.device, dtype=placement.dtype)
        self.model, self.image_processor, self.tokenizer = (
            loaded.model,
            loaded.image_processor,
            loaded.tokenizer,
        )
        config = self.model.config
        self.tag_modes = (
            frozenset({"caption"}) if getattr(config, "caption_format", "prose") == "tags" else frozenset()
        )
        self.prompt_ids = prompt_ids(self.tokenizer, config.prompt)
        self.max_new_tokens = config.max_caption_tokens
        self.default_batch_size = default_batch_size(placement, gpu_batch=128, cpu_batch=8)
        size = self.image_processor.size
        self.image_side = max(size.get("height", 0), size.get("width", 0), size.get("shortest_edge", 0))

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> dict[str, Any]:
        if mode != "caption":
            raise BackendError(f"{self.name} cannot caption in mode {mode!r}; it can do: caption")
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.placement.dtype)}

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], settings: GenerationSettings) -> list[str]:
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        out = self.model.generate_captions(
            inputs["pixel_values"].to(self.placement.device),
            self.prompt_ids,
            eos_token_id=eos,
            pad_token_id=pad,
            **settings.generate_kwargs(self.max_new_tokens),
        )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
