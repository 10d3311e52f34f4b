"""Vision-language models that transformers loads through `AutoModelForImageTextToText`, in one backend.

Chat models (JoyCaption / LLaVA, Qwen2-VL / 2.5-VL / 3-VL, Idefics3 / SmolVLM, Llama-3.2-Vision, Gemma 3,
InternVL 3.x, MiniCPM-V 4.x, Molmo2): the image goes inside the user message of the model's own chat
template, the instruction (a caption style turned into words by the caller) is the message text, and only
the newly generated tokens are decoded. Llama-3.2-Vision's image is no tokens: its text attends to it
through cross-attention layers, masked per row by the processor.

Models without a chat template (PaliGemma, BLIP-2, InstructBLIP, GIT) get their prompt as plain text, as
`FAMILIES` says for each: the few ways a family differs are data there, not branches in the code.

Batches are left-padded: a decoder-only model continues from the last position of every row, so the prompt
must end there, not be followed by padding. An encoder-decoder language model (BLIP-2 / InstructBLIP with
Flan-T5) is padded on the right instead: its encoder reads the whole prompt, and T5's relative positions
would count padding between the image and the text; its output is the caption alone.

Qwen2-VL / 2.5-VL / 3-VL see each image at its own resolution (a varying number of image tokens per
image). A batch of differently sized images is not resized to one size: the processor concatenates every
image's patches and expands each image's placeholder to its own token count, and left padding evens out
the text lengths.
The resolution is capped (`QWEN_MAX_PIXELS`) so a 4K photo does not become 16k image tokens.

PaliGemma follows task prompts ("caption en"), not instructions; BLIP-2 and GIT continue a text (none for a
plain caption) and keep it in the caption, as BLIP does.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
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
# ~1 megapixel: plenty for a caption, and ~1300 image tokens at most per image (28 px per merged token in
# Qwen2-VL / 2.5-VL; ~980 in Qwen3-VL, whose merged tokens are 32 px, with the same image processor class).
QWEN_MAX_PIXELS = 1280 * 28 * 28


@dataclass(frozen=True)
class Family:
    """How a model type differs from a chat model with a chat template (the default, `Family()`)."""

    plain: str = ""
    """Without a chat template: the text the model reads, `{prompt}` standing for the prompt."""
    instructions: bool = True
    """It follows free-text instructions (any caption style); otherwise it writes plain captions, and a
    user's prompt is raw text for it (a task, a text to continue)."""
    caption_prompt: str = ""
    """The prompt for a plain caption, for a model that does not follow instructions."""
    keeps_prompt: bool = False
    """The prompt is the caption's first words (a text the model continues), so the caption keeps them."""
    tokenizer_specials: bool = True
    """The tokenizer adds its special tokens; False where `plain` writes the ones the model needs."""
    non_caption_tokens: str = ""
    """Tokens that are not caption words (a regular expression), kept out of plain captions."""


CHAT = Family()
FAMILIES: dict[str, Family] = {
    # Boxes (<locXXXX>) and masks (<segXXX>) are not caption words; a user's own task prompt keeps them.
    "paligemma": Family(
        plain="<image>{prompt}",
        instructions=False,
        caption_prompt="caption en",
        non_caption_tokens=r"<(loc\d{4}|seg\d{3})>",
    ),
    "blip-2": Family(plain="{prompt}", instructions=False, keeps_prompt=True),
    "instructblip": Family(plain="{prompt}"),
    # bert-base-uncased's [CLS] starts GIT's text, and no [SEP] may end it: [SEP] ends the caption.
    "git": Family(plain="[CLS]{prompt}", instructions=False, keeps_prompt=True, tokenizer_specials=False),
}

# Processors whose hub class cannot be built without torchvision (they hold a video processor), by
# config.json model_type; the video slot holds `_NoVideo`, which is all captioning needs.
_VIDEO_SLOT_PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "smolvlm": "SmolVLMProcessor",
    "idefics3": "Idefics3Processor",
    "internvl": "InternVLProcessor",
    "minicpmv4_6": "MiniCPMV4_6Processor",
}
_PROCESSOR_PARTS = ("image_processor", "tokenizer", "video_processor", "chat_template")


class ChatVLMBackend:
    tag_modes: frozenset[str] = frozenset()

    def __init__(self, folder: Path, name: str, placement: Placement, *, quant: str | None = None):
        from transformers import AutoModelForImageTextToText

        self.name = name
        self.placement = placement
        self.model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
        self.family = FAMILIES.get(self.model_type, CHAT)
        # A chat model follows free-text instructions, so any caption style works; the others caption.
        self.instructions = self.family.instructions
        self.modes: tuple[str, ...] = (ANY_MODE,) if self.instructions else ("caption",)
        quantization_kwargs(quant, placement)  # refuse a --quant that cannot work before loading anything
        self.processor = load_processor(Path(folder), self.model_type)
        self.tokenizer = self.processor.tokenizer
        self.model = load_model(AutoModelForImageTextToText, folder, placement, quant)
        # What the processor returns besides: PaliGemma's training `labels`, BERT's `token_type_ids` (GIT).
        self.model_inputs = set(inspect.signature(self.model.forward).parameters) - {"labels"}
        # Flan-T5 under BLIP-2 / InstructBLIP: the encoder reads the prompt, the decoder writes the caption.
        self.seq2seq = bool(self.model.config.get_text_config().is_encoder_decoder)
        # Left padding: every row's prompt must end at the last position, where generation continues; a
        # seq2seq encoder reads it whole, and T5's relative positions must not count padding inside it.
        self.tokenizer.padding_side = "right" if self.seq2seq else "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.default_batch_size = default_batch_size(placement, gpu_batch=16)
        self.image_side = chat_input_side(self.processor.image_processor)
        # Only a family with non-caption tokens has its vocab scanned.
        self.non_caption_ids: list[int] = []
        if self.family.non_caption_tokens:
            pattern = re.compile(self.family.non_caption_tokens)
            self.non_caption_ids = [i for t, i in self.tokenizer.get_vocab().items() if pattern.fullmatch(t)]
        # Its mask is built once, not at every decoding step as `generate(suppress_tokens=...)` would.
        self.suppress = SuppressTokens(self.non_caption_ids)

    def prompt_text(self, prompt: str, system: str | None = None) -> str:
        """The full text for one image: the chat template around the instruction (after a system message
        when there is one), or the family's plain prompt."""
        if self.family.plain:
            if system:
                raise BackendError(f"{self.name} has no chat template: it takes no system message")
            return self.family.plain.replace("{prompt}", prompt)
        return chat_prompt(self.processor, prompt, system)

    def prepare(
        self, images: list, mode: str, prompt: str | list[str] | None = None, *, system: str | None = None
    ) -> dict[str, Any]:
        """`prompt`: one instruction for the batch, or one per image (styles with {tags} or {folder}).
        `system`: a system message before every instruction (chat models only)."""
        caption_only = prompt is None
        if not self.instructions:
            check_mode(self, mode)
            prompt = self.family.caption_prompt if prompt is None else prompt
        elif prompt is None:
            raise BackendError(f"{self.name} follows instructions: it needs a prompt saying what to write")
        prompts = prompt if isinstance(prompt, list) else [prompt] * len(images)
        texts = [self.prompt_text(p, system) for p in prompts]
        # Templates that write the BOS themselves must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        add_special_tokens = self.family.tokenizer_specials and not (bos and texts[0].startswith(bos))
        batch = self.processor(
            text=texts,
            # One list of images per prompt: what every processor here reads as "this image is this row's".
            images=[[image] for image in images],
            padding=True,
            add_special_tokens=add_special_tokens,
            return_tensors="pt",
        )
        tensors = {
            k: v.to(self.placement.dtype) if v.is_floating_point() else v
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k in self.model_inputs
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
        kwargs = settings.generate_kwargs(DEFAULT_MAX_NEW_TOKENS, interrupt=interrupt, inputs=inputs)
        # The prompt (image tokens included) and the caption share a decoder-only model's positions; a
        # seq2seq decoder starts from its start token alone.
        prompt_width = 1 if self.seq2seq else batch["input_ids"].shape[1]
        kwargs = fit_decoder(kwargs, self.model, prompt_width, self.name)
        kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if inputs["caption_only"] and self.non_caption_ids:
            kwargs["logits_processor"] = [self.suppress, *kwargs.get("logits_processor", [])]
        out = self.model.generate(**batch, **kwargs)
        # A decoder-only model returns prompt + continuation (with left padding every prompt ends at the
        # same column), a seq2seq one its start token + the caption. A model that continues the prompt's
        # words keeps them (image and pad tokens are special, so decoding skips them).
        new_tokens = out[:, prompt_width:]
        caption_tokens = out if self.family.keeps_prompt else new_tokens
        texts = [t.strip() for t in self.tokenizer.batch_decode(caption_tokens, skip_special_tokens=True)]
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
    Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL, MiniCPM-V 4.x); the parts it needs for images load fine on
    their own. Molmo2's image processor itself needs torchvision: its error says so.
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
        kwargs["video_processor"] = _NoVideo(downsample_mode=getattr(image_processor, "downsample_mode", ""))
    # The processor's own settings (image_seq_len, image_seq_length) live in processor_config.json, which
    # AutoProcessor would have read.
    accepted = inspect.signature(processor_class.__init__).parameters
    saved = _read_json(folder / "processor_config.json")
    kwargs.update({k: v for k, v in saved.items() if k in accepted and k not in _PROCESSOR_PARTS})
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


@dataclass(frozen=True)
class _NoVideo:
    """The empty video slot of a processor built without torchvision. No video ever reaches it; MiniCPM-V's
    constructor reads these two settings of its video processor."""

    slice_mode: bool = False
    downsample_mode: str = ""


def _without_video(processor_class: type) -> type:
    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, _NoVideo):
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
