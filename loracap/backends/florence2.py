"""Florence-2 and its PromptGen fine-tunes, through transformers' native Florence2ForConditionalGeneration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .base import Generation, GenerationSettings, SuppressTokens, check_mode, fit_decoder, generations
from .device import Placement, default_batch_size, image_side, load_model
from .florence2_convert import (
    FLORENCE_ADDED_TOKENS,
    IMAGE_TOKEN,
    TASKS_FILE,
    native_folder,
    read_task_prompts,
)
from .florence2_tasks import DEFAULT_MAX_NEW_TOKENS, resolve_modes, task_text


class Florence2Backend:
    tag_modes = frozenset({"tags"})
    instructions = False  # task tokens / a text prefix, not free-text instructions

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        folder = native_folder(folder)
        self.name = name
        self.placement = placement
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = load_model(Florence2ForConditionalGeneration, folder, placement, quant)
        # The stock tasks the native processor knows, then what this checkpoint itself declares.
        self.tasks = dict(self.processor.task_prompts_without_inputs)
        declared = folder / TASKS_FILE
        self.tasks.update(
            json.loads(declared.read_text()) if declared.is_file() else read_task_prompts(folder)
        )
        self.mode_tokens = resolve_modes(self.tasks)
        self.modes = tuple(self.mode_tokens)
        # Location and region tokens, padding and a second <s> mean nothing in a caption; raw --prompt
        # tasks (e.g. <OD>) keep them. Decoding starts from the trained "</s><s>" prefix instead of
        # forcing <s> at step one, so suppressing <s> afterwards cannot clash with the forcing.
        tokenizer = self.processor.tokenizer
        vocab = tokenizer.get_vocab()
        specials = [tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token, tokenizer.mask_token]
        self.non_caption_ids = [
            vocab[t] for t in (*FLORENCE_ADDED_TOKENS, IMAGE_TOKEN, *specials) if t in vocab
        ]
        self.suppress = SuppressTokens(self.non_caption_ids)  # its mask is built once, not every step
        generation = self.model.generation_config
        self.decoder_prefix = [generation.decoder_start_token_id]
        if generation.forced_bos_token_id is not None:
            self.decoder_prefix.append(generation.forced_bos_token_id)
        # Made once on the device: a tensor built from a list per batch is a blocking host-to-GPU copy.
        self.prefix_ids = torch.tensor([self.decoder_prefix], device=placement.device)
        self.default_batch_size = default_batch_size(placement, gpu_batch=64)
        self.image_side = image_side(self.processor.image_processor)
        self.static_cache = False
        """Decode with a preallocated (static) KV cache. On CUDA transformers then compiles the decoder
        step (torch.compile, CUDA graphs), which removes its Python and launch overhead but compiles again
        for every new batch shape; captions are the same either way. Off by default: not yet measured on a
        GPU (`benchmarks/gpu.sh` measures it)."""

    def task_text(self, mode: str, prompt: str | None) -> str:
        """The text fed to the model: the task's trained prompt, or the user's own task token / prompt."""
        if not prompt:
            check_mode(self, mode)  # self.modes are the keys of self.mode_tokens
        return task_text(self.tasks, self.mode_tokens, mode, prompt)

    def prepare(self, images: list, mode: str, prompt: str | None = None) -> dict[str, torch.Tensor]:
        text = self.task_text(mode, prompt)
        batch = self.processor(text=[text] * len(images), images=images, return_tensors="pt")
        inputs = {
            "input_ids": batch["input_ids"],
            "pixel_values": batch["pixel_values"].to(self.placement.dtype),
        }
        if self.placement.device.type == "cuda":  # page-locked memory lets the copy overlap compute
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        inputs["mode"] = mode
        inputs["caption_only"] = prompt is None
        return inputs

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
        kwargs = settings.generate_kwargs(
            DEFAULT_MAX_NEW_TOKENS.get(inputs["mode"], 256), interrupt=interrupt, inputs=inputs
        )
        input_ids = inputs["input_ids"].to(device, non_blocking=True)
        start = 1  # the decoder starts from its decoder_start_token
        if inputs["caption_only"]:
            start = len(self.decoder_prefix)
            prefix = self.prefix_ids.expand(len(input_ids), -1)
            kwargs.update(
                # Before seeded sampling's processor (if any), which must see the suppressed scores.
                logits_processor=[self.suppress, *kwargs.get("logits_processor", [])],
                decoder_input_ids=prefix,
                forced_bos_token_id=None,
            )
        kwargs = fit_decoder(kwargs, self.model, start, self.name)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        out = self.model.generate(
            input_ids=input_ids, pixel_values=inputs["pixel_values"].to(device, non_blocking=True), **kwargs
        )
        # Special tokens (<s>, </s>, <pad>, <loc_*>) are not caption text.
        texts = [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]
        # The encoder's input: the image's placeholder tokens and the task prompt, the same for every row.
        prompt_tokens = [input_ids.shape[1]] * len(texts)
        config, limit = self.model.generation_config, kwargs["max_new_tokens"]
        return generations(texts, prompt_tokens, out[:, start:], config, limit)
