"""Captioners trained with `loracap train`: one style, the one they were taught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loracap.prefix.batching import pad_id, prompt_ids

from .base import BackendError, GenerationSettings, check_mode
from .device import Placement, default_batch_size, load_model


class PrefixCaptionerBackend:
    modes = ("caption",)
    instructions = False  # it writes the house style it was trained on, whatever the prompt

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        # Heavy (transformers, which loracap.prefix.modeling imports at its top): loaded with a model, as in
        # every backend module, not when the backend registry or training imports this one.
        from transformers import AutoImageProcessor, AutoTokenizer

        from loracap.prefix.modeling import PrefixCaptioner

        if quant:
            raise BackendError(
                f"{name}: --quant is not supported for loracap-trained captioners (they are small)"
            )
        model = load_model(PrefixCaptioner, folder, placement)
        self._attach(
            model,
            AutoImageProcessor.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder),
            name,
            placement,
        )

    @classmethod
    def from_parts(
        cls,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        placement: Placement,
        *,
        name: str = "captioner in training",
    ) -> PrefixCaptionerBackend:
        """A backend around a captioner already in memory (training's validation captions), on
        `placement` as it is: the model is neither moved nor cast."""
        backend = cls.__new__(cls)
        backend._attach(model, image_processor, tokenizer, name, placement)
        return backend

    def _attach(
        self, model: Any, image_processor: Any, tokenizer: Any, name: str, placement: Placement
    ) -> None:
        self.name = name
        self.placement = placement
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        config = model.config
        self.tag_modes = (
            frozenset({"caption"}) if getattr(config, "caption_format", "prose") == "tags" else frozenset()
        )
        self.prompt_ids = prompt_ids(tokenizer, config.prompt)
        self.max_new_tokens = config.max_caption_tokens
        self.default_batch_size = default_batch_size(placement, gpu_batch=128, cpu_batch=8)
        self.image_side = input_side(image_processor)

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> dict[str, Any]:
        check_mode(self, mode)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.placement.dtype)}

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], settings: GenerationSettings) -> list[str]:
        out = self.model.generate_captions(
            inputs["pixel_values"].to(self.placement.device),
            self.prompt_ids,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_id(self.tokenizer),
            **settings.generate_kwargs(self.max_new_tokens, inputs=inputs),
        )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def input_side(image_processor: Any) -> int:
    """The side the image processor resizes to (0 when it names none)."""
    size = image_processor.size
    return max(size.get("height", 0), size.get("width", 0), size.get("shortest_edge", 0))
