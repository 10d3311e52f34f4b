"""VisionEncoderDecoderModel captioners such as nlpconnect/vit-gpt2-image-captioning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .base import BackendError, Generation, GenerationSettings, check_mode, fit_decoder, generations
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
        pixels = pixels.to(self.placement.dtype)
        # Page-locked memory lets the copy to the GPU overlap compute.
        return pixels.pin_memory() if self.placement.device.type == "cuda" else pixels

    def generate(self, inputs: Any, settings: GenerationSettings) -> list[str]:
        return [g.text for g in self.generate_detailed(inputs, settings)]

    @torch.inference_mode()
    def generate_detailed(
        self, inputs: Any, settings: GenerationSettings, interrupt: Callable[[], bool] | None = None
    ) -> list[Generation]:
        # The decoder starts from one start token.
        kwargs = settings.generate_kwargs(32, interrupt=interrupt, inputs=inputs)
        kwargs = fit_decoder(kwargs, self.model, 1, self.name)
        out = self.model.generate(pixel_values=inputs.to(self.placement.device, non_blocking=True), **kwargs)
        texts = [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        # No text input: the decoder continues from its one start token.
        config, limit = self.model.generation_config, kwargs["max_new_tokens"]
        return generations(texts, [1] * len(texts), out[:, 1:], config, limit)
