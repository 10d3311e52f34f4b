"""Chat vision-language models (JoyCaption / LLaVA, Qwen2-VL / 2.5-VL / 3-VL, Idefics3 / SmolVLM, PaliGemma).

One backend for every model that transformers loads through `AutoModelForImageTextToText`: the image goes
inside the user message of the model's own chat template, the instruction (a caption style turned into
words by the caller) is the message text, and only the newly generated tokens are decoded.

Batches are left-padded: a decoder-only model continues from the last position of every row, so the prompt
must end there, not be followed by padding.

Qwen2-VL / 2.5-VL / 3-VL see each image at its own resolution (a varying number of image tokens per
image). A batch of differently sized images is not resized to one size: the processor concatenates every
image's patches and expands each image's placeholder to its own token count, and left padding evens out
the text lengths.
The resolution is capped (`QWEN_MAX_PIXELS`) so a 4K photo does not become 16k image tokens.

PaliGemma has no chat template and follows task prompts ("caption en"), not instructions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .base import (
    ANY_MODE,
    BackendError,
    Generation,
    GenerationSettings,
    SuppressTokens,
    check_mode,
    fit_decoder,
    generations,
)
from .device import Placement, default_batch_size, image_side, load_model, quantization_kwargs

DEFAULT_MAX_NEW_TOKENS = 256
PALIGEMMA_PROMPT = "caption en"
# ~1 megapixel: plenty for a caption, and ~1300 image tokens at most per image (28 px per merged token in
# Qwen2-VL / 2.5-VL; ~980 in Qwen3-VL, whose merged tokens are 32 px, with the same image processor class).
QWEN_MAX_PIXELS = 1280 * 28 * 28
# Processors whose hub class cannot be built without torchvision (they hold a video processor), by
# config.json model_type; the video slot is left empty, which is all captioning needs.
_LOC_SEG = re.compile(r"<(loc\d{4}|seg\d{3})>")
_VIDEO_SLOT_PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "smolvlm": "SmolVLMProcessor",
    "idefics3": "Idefics3Processor",
}


class ChatVLMBackend:
    tag_modes: frozenset[str] = frozenset()

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from transformers import AutoModelForImageTextToText

        self.name = name
        self.placement = placement
        self.model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
        self.paligemma = self.model_type == "paligemma"
        # A chat model follows free-text instructions, so any caption style works; PaliGemma knows tasks.
        self.instructions = not self.paligemma
        self.modes: tuple[str, ...] = ("caption",) if self.paligemma else (ANY_MODE,)
        quantization_kwargs(quant, placement)  # refuse a --quant that cannot work before loading anything
        self.processor = load_processor(Path(folder), self.model_type)
        self.tokenizer = self.processor.tokenizer
        # Left padding: every row's prompt must end at the last position, where generation continues.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(AutoModelForImageTextToText, folder, placement, quant)
        self.default_batch_size = default_batch_size(placement, gpu_batch=16)
        self.image_side = chat_input_side(self.processor.image_processor)
        # PaliGemma's <locXXXX> / <segXXX> tokens (boxes, masks) are not caption words; a user's own
        # task prompt ("detect cat") keeps them. Other models have none, so their vocab is not scanned.
        self.non_caption_ids: list[int] = []
        if self.paligemma:
            vocab = self.tokenizer.get_vocab()
            self.non_caption_ids = [i for t, i in vocab.items() if _LOC_SEG.fullmatch(t)]
        # Its mask is built once, not at every decoding step as `generate(suppress_tokens=...)` would.
        self.suppress = SuppressTokens(self.non_caption_ids)

    def prompt_text(self, prompt: str, system: str | None = None) -> str:
        """The full text for one image: the chat template around the instruction (after a system message
        when there is one), or PaliGemma's task."""
        if self.paligemma:
            return "<image>" + prompt
        return chat_prompt(self.processor, prompt, system)

    def prepare(
        self, images: list, mode: str, prompt: str | list[str] | None = None, *, system: str | None = None
    ) -> dict[str, Any]:
        """`prompt`: one instruction for the batch, or one per image (styles with {tags} or {folder}).
        `system`: a system message before every instruction (chat models only)."""
        caption_only = prompt is None
        if self.paligemma:
            check_mode(self, mode)
            prompt = prompt or PALIGEMMA_PROMPT
        elif prompt is None:
            raise BackendError(f"{self.name} follows instructions: it needs a prompt saying what to write")
        prompts = prompt if isinstance(prompt, list) else [prompt] * len(images)
        if system and self.paligemma:
            raise BackendError(f"{self.name} has no chat template: it takes no system message")
        texts = [self.prompt_text(p, system) for p in prompts]
        # Templates that write the BOS themselves must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and texts[0].startswith(bos))
        # Idefics3 / SmolVLM take one list of images per sample.
        batch_images = [[image] for image in images] if self.model_type in ("idefics3", "smolvlm") else images
        batch = self.processor(
            text=texts,
            images=batch_images,
            padding=True,
            add_special_tokens=add_special_tokens,
            return_tensors="pt",
        )
        # PaliGemma's processor also returns training `labels`; generation needs only the model inputs.
        tensors = {
            k: v.to(self.placement.dtype) if v.is_floating_point() else v
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k != "labels"
        }
        if self.placement.device.type == "cuda":  # page-locked memory lets the copy overlap compute
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return {"tensors": tensors, "caption_only": caption_only}

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
        batch = {k: v.to(device, non_blocking=True) for k, v in inputs["tensors"].items()}
        kwargs = settings.generate_kwargs(DEFAULT_MAX_NEW_TOKENS, interrupt=interrupt)
        # The prompt (image tokens included) and the caption share the language model's positions.
        kwargs = fit_decoder(kwargs, self.model, batch["input_ids"].shape[1], self.name)
        kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if inputs["caption_only"] and self.non_caption_ids:
            kwargs["logits_processor"] = [self.suppress]
        out = self.model.generate(**batch, **kwargs)
        # generate returns prompt + continuation; with left padding every prompt ends at the same column.
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts = [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        # The prompt as the model read it: the image's placeholder tokens included, left padding not.
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        config, limit = self.model.generation_config, kwargs["max_new_tokens"]
        return generations(texts, prompt_tokens, new_tokens, config, limit)


def chat_prompt(processor: Any, prompt: str, system: str | None = None) -> str:
    """The model's chat template around one image and the instruction (after a system message when there
    is one), ending where the model's answer begins: the same text for every engine that runs the model."""
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]
    if system:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    # Rendered through the tokenizer with the processor's template, not `processor.apply_chat_template`:
    # SmolVLM's override of the latter reads its video processor, which is absent without torchvision.
    tokenizer = processor.tokenizer
    template = processor.chat_template or tokenizer.chat_template
    return tokenizer.apply_chat_template(
        conversation, chat_template=template, add_generation_prompt=True, tokenize=False
    )


def chat_input_side(image_processor: Any) -> int:
    """The side images are decoded at for a chat model's image processor. Qwen's (native resolution) is
    capped at QWEN_MAX_PIXELS here, in place (see the module doc); its size bounds are areas in pixels."""
    if hasattr(image_processor, "merge_size"):
        size = dict(image_processor.size)
        size["longest_edge"] = min(size.get("longest_edge", QWEN_MAX_PIXELS), QWEN_MAX_PIXELS)
        image_processor.size = size
        return math.isqrt(size["longest_edge"])
    return image_side(image_processor)


def load_processor(folder: Path, model_type: str | None) -> Any:
    """`AutoProcessor`, or the processor class built from its image processor, tokenizer and template.

    Without torchvision `AutoProcessor` fails for processors that hold a video processor (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, SmolVLM); the parts it needs for images load fine on their own.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError) as err:
        if model_type not in _VIDEO_SLOT_PROCESSORS:
            raise BackendError(f"cannot load the processor of {folder}: {err}") from err
    return processor_from_parts(folder, model_type)


def processor_from_parts(folder: Path, model_type: str) -> Any:
    """The model's processor class from `AutoImageProcessor` (PIL variant), `AutoTokenizer` and template."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_class = getattr(transformers, _VIDEO_SLOT_PROCESSORS[model_type])
    image_processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {"chat_template": _read_chat_template(folder) or tokenizer.chat_template}
    if "video_processor" in processor_class.get_attributes():
        # The stock argument check looks the video processor's class up in a mapping that does not
        # exist without torchvision; an empty video slot is fine for images.
        processor_class = _without_video(processor_class)
        kwargs["video_processor"] = None
    if model_type in ("idefics3", "smolvlm"):
        # image_seq_len lives in processor_config.json, which AutoProcessor would have read.
        saved = _read_json(folder / "processor_config.json")
        if "image_seq_len" in saved:
            kwargs["image_seq_len"] = saved["image_seq_len"]
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def _without_video(processor_class: type) -> type:
    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {
            "check_argument_for_proper_class": check_argument_for_proper_class,
        },
    )


def _read_chat_template(folder: Path) -> str | None:
    """The chat template as hub checkpoints ship it: chat_template.jinja, or chat_template.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
