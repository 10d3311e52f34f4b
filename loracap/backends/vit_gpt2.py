"""VisionEncoderDecoderModel captioners such as nlpconnect/vit-gpt2-image-captioning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import BackendError, GenerationSettings, check_mode
from .device import Placement, default_batch_size, image_side, load_model


class VisionEncoderDecoderBackend:
    modes = ("caption",)
    tag_modes: frozenset[str] = frozenset()
    instructions = False  # task tokens / a text prefix, not free-text instructions

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        self.name = name
        self.placement = placement
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = load_model(VisionEncoderDecoderModel, folder, placement, quant)
        self.default_batch_size = default_batch_size(placement, gpu_batch=128)
        self.image_side = image_side(self.image_processor)

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> torch.Tensor:
        check_mode(self, mode)
        if prompt:
            raise BackendError(f"{self.name} takes no prompt: it only captions from the image")
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.placement.dtype)

    @torch.inference_mode()
    def generate(self, inputs: Any, settings: GenerationSettings) -> list[str]:
        out = self.model.generate(
            pixel_values=inputs.to(self.placement.device), **settings.generate_kwargs(32)
        )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
