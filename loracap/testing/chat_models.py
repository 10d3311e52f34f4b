"""Tiny random-weight chat vision-language models of the real architectures, saved as hub checkpoints are.

LLaVA in JoyCaption's layout (SigLIP + Llama), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3 (SmolVLM-v1) and
PaliGemma. Each builder makes a tiny config, a byte-level BPE trained on the spot with the family's special
tokens, the real image processor and (where it can be built) the real processor, and writes them with
`save_pretrained`.

Without torchvision the Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors cannot be built (they carry a video
processor), so for them this writes what the hub checkpoints ship besides: `preprocessor_config.json` (the
image processor, naming its processor class), the tokenizer files and `chat_template.jinja`. A loader builds
the processor from those parts, exactly as it must for the real checkpoints here.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.seeding import seeded_model, set_generation_ids
from loracap.testing.tokenizer import train_byte_level_bpe

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

CHAT_ARCHS: tuple[str, ...] = (
    "llava",
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen3-vl",
    "idefics3",
    "smolvlm",
    "paligemma",
)

_TEXT_WIDTH = 32

# Chat templates reduced to what captioning uses: string or [image, text] content, the generation prompt.
# Whitespace the model sees is written as string literals, so jinja's `{%-` trimming cannot eat it.
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_QWEN2_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_IDEFICS3_TEMPLATE = (
    "{{- '<|im_start|>' }}"
    "{%- for message in messages %}"
    "{{- message['role'] | capitalize }}"
    "{%- if message['content'] is string %}{{- ': ' + message['content'] }}"
    "{%- else %}"
    "{%- if message['content'][0]['type'] == 'image' %}{{- ':' }}{%- else %}{{- ': ' }}{%- endif %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<end_of_utterance>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)


def build_chat_model(arch: str, out: Path, *, seed: int = 0) -> None:
    """Build the tiny `arch` chat VLM and save it into `out` (an existing folder)."""
    builders = {
        "llava": _build_llava,
        "qwen2-vl": lambda o, s: _build_qwen_vl(o, s, version="2"),
        "qwen2.5-vl": lambda o, s: _build_qwen_vl(o, s, version="2.5"),
        "qwen3-vl": lambda o, s: _build_qwen_vl(o, s, version="3"),
        "idefics3": _build_idefics3,
        "smolvlm": _build_idefics3,  # SmolVLM-v1 checkpoints are Idefics3 models (model_type "idefics3")
        "paligemma": _build_paligemma,
    }
    builders[arch](out, seed)


# --------------------------------------------------------------------------------------------------- helpers


def _tokenizer(
    specials: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    image_token: str | None = None,
    named: dict[str, str] | None = None,
) -> PreTrainedTokenizerBase:
    """Byte-level BPE with `specials` at the lowest ids, BOS prepended when the family does that.
    `named`: more special tokens a processor reads by name (`tokenizer.boi_token`) besides `image_token`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_level_bpe(specials)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    kwargs: dict[str, Any] = {}
    extra = {**({"image_token": image_token} if image_token else {}), **(named or {})}
    if extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=4096, **kwargs
    )


def _llama_text_config(vocab: int, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ------------------------------------------------------------------------------------- LLaVA (JoyCaption)


def _build_llava(out: Path, seed: int) -> None:
    """fancyfeast/llama-joycaption-*-hf-llava layout: SigLIP tower, 2-layer MLP projector, Llama 3 text."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    specials = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        "<image>",
    )
    tokenizer = _tokenizer(
        specials,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        image_token="<image>",
    )
    image_size, patch = 32, 8
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    eos_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text_config(len(tokenizer), tokenizer, eos_id),
        image_token_id=tokenizer.image_token_id,
        # SigLIP has no CLS token, so every patch is an image feature (the default "default" drops one).
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2,
        projector_hidden_act="gelu",
    )
    model = seeded_model(seed, lambda: LlavaForConditionalGeneration(config))
    set_generation_ids(model, tokenizer, eos_token_id=eos_id)
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full",
        chat_template=_LLAMA3_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=0,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ---------------------------------------------------------------------------------- Qwen2-VL / 2.5-VL / 3-VL

_QWEN_PROCESSORS = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor", "3": "Qwen3VLProcessor"}


def _build_qwen_vl(out: Path, seed: int, *, version: str) -> None:
    """Qwen/Qwen2-VL-*, Qwen2.5-VL-* or Qwen3-VL-*-Instruct: native-resolution ViT, 2x2 merger, Qwen text."""
    from transformers import Qwen2VLImageProcessorPil

    specials = (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )
    # Qwen2 has no BOS; <|endoftext|> pads; chat turns end with <|im_end|>.
    tokenizer = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    patch, merge, temporal = 4, 2, 2
    # mrope splits the rotary half-dimension (head_dim/2 = 8) into temporal, height and width sections.
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    common_vision = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": temporal,
    }
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    # Qwen2-VL normalizes with CLIP's mean and std (the image processor's defaults); Qwen3-VL with 0.5.
    normalize: dict[str, Any] = {}
    if version == "3":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        # Qwen3 text: explicit head_dim, q/k norms, interleaved mrope (sections still sum to head_dim/2).
        text["head_dim"] = 16
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        # Learned position grid (8x8, resampled to each image's grid) besides the 2D rope; deepstack: the
        # merged features of vision block 0 are added to the first text layer's image positions.
        vision = {
            **common_vision,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": _TEXT_WIDTH,
            "num_position_embeddings": 8 * 8,
            "deepstack_visual_indexes": [0],
        }
        normalize = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        # Windowed attention: a window of 16 px = 2x2 merged tokens; block 1 attends over the whole image.
        vision = {
            **common_vision,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": _TEXT_WIDTH,
            "window_size": patch * merge * 2,
            "fullatt_block_indexes": [1],
        }
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = {**common_vision, "embed_dim": 32, "mlp_ratio": 2, "hidden_size": _TEXT_WIDTH}
    config = Config(text_config=text, vision_config=vision, **token_ids)
    model = seeded_model(seed, lambda: Model(config))
    set_generation_ids(
        model,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)
    # Pixels per image between 8x8 and 32x32 (factor patch*merge = 8): 1 to 16 merged image tokens.
    # Qwen3-VL checkpoints ship this same image processor class (the auto mapping names it for qwen3_vl).
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=temporal,
        size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32},
        **normalize,
    )
    image_processor.save_pretrained(out)
    _name_processor_class(out, _QWEN_PROCESSORS[version])
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(_QWEN2_VL_TEMPLATE, encoding="utf-8")


def _name_processor_class(out: Path, name: str) -> None:
    """Hub preprocessor_config.json files name the processor class; a standalone image processor cannot."""
    path = out / "preprocessor_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["processor_class"] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------- Idefics3 / SmolVLM


def _build_idefics3(out: Path, seed: int) -> None:
    """HuggingFaceTB/SmolVLM-Instruct layout: SigLIP tower, pixel shuffle, Llama text, image splitting."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    rows_cols = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
    specials = (
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *rows_cols,
    )
    tokenizer = _tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    image_size, patch, scale = 32, 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale**2
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=_llama_text_config(len(tokenizer), tokenizer, eos_id),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = seeded_model(seed, lambda: Idefics3ForConditionalGeneration(config))
    set_generation_ids(model, tokenizer, eos_token_id=eos_id)
    # Up to 2x2 tiles of 32 px plus the global image, as SmolVLM does with 384 px tiles.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------------ PaliGemma


def _build_paligemma(out: Path, seed: int) -> None:
    """google/paligemma-3b-*-224 layout: SigLIP tower, linear projector, Gemma text, prefix-LM prompts."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = _tokenizer(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<image>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        image_token="<image>",
    )
    image_size, patch = 32, 8
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2
    # The processor adds the 1024 <locXXXX> and 128 <segXXX> tokens: size the vocab after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=_TEXT_WIDTH,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        projection_dim=_TEXT_WIDTH,
        image_token_id=tokenizer.image_token_id,
    )
    # Gemma at 0.2 still answers "\n" to everything (stripped: an empty caption); 0.5 varies with the image.
    model = seeded_model(seed, lambda: PaliGemmaForConditionalGeneration(config), spread=0.5)
    set_generation_ids(model, tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
