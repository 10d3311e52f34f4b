"""More tiny random-weight chat vision-language models: the families beyond `chat_models`.

Llama-3.2-Vision (mllama: images reach the text through cross-attention layers, not tokens), Gemma 3,
InternVL 3.x (the `-hf` layout), MiniCPM-V 4.x, Molmo2, BLIP-2, InstructBLIP and GIT. Each is the real
architecture with a tiny config, a byte-level BPE with the family's special tokens, and the real processor,
written with `save_pretrained` as the hub checkpoints are, so they load through the product's own loader.

Chat models get the family's chat template reduced to what captioning uses (as in `chat_models`). BLIP-2,
InstructBLIP and GIT have none: their checkpoints ship no template, and loracap gives them a plain prompt.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loracap.testing.chat_models import _name_processor_class, _tokenizer
from loracap.testing.seeding import seeded_model, set_generation_ids

FAMILY_ARCHS: tuple[str, ...] = (
    "mllama",
    "gemma3",
    "internvl",
    "minicpmv",
    "molmo2",
    "blip2",
    "instructblip",
    "git",
)

_WIDTH = 32


def build_family_model(arch: str, out: Path, *, seed: int = 0) -> None:
    """Build the tiny `arch` model and save it into `out` (an existing folder)."""
    builders = {
        "mllama": _build_mllama,
        "gemma3": _build_gemma3,
        "internvl": _build_internvl,
        "minicpmv": _build_minicpmv,
        "molmo2": _build_molmo2,
        "blip2": _build_blip2,
        "instructblip": _build_instructblip,
        "git": _build_git,
    }
    builders[arch](out, seed)


def _chat_template(
    turn: str, end: str, image: str, *, bos: bool = False, answer_role: str = "assistant"
) -> str:
    """A chat template reduced to what captioning uses: string or [image, text] content, the answer prompt.

    `turn` opens a turn, with `{role}` where the role goes (the assistant's written `answer_role`, as Gemma's
    "model"), `end` closes one, `image` is what an image item becomes; `bos`: the template writes the BOS.
    Whitespace the model sees is written as string literals, so jinja's `{%-` trimming cannot eat it.
    """
    role = f"(message['role'] | replace('assistant', '{answer_role}'))"
    open_turn = "'" + turn.replace("{role}", f"' + {role} + '") + "'"
    answer = turn.replace("{role}", answer_role)
    return "".join(
        [
            "{{- bos_token }}" if bos else "",
            "{%- for message in messages %}",
            "{{- " + open_turn + " }}",
            "{%- if message['content'] is string %}{{- message['content'] }}",
            "{%- else %}{%- for item in message['content'] %}",
            "{%- if item['type'] == 'image' %}{{- '" + image + "' }}",
            "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}",
            "{%- endfor %}{%- endif %}",
            "{{- '" + end + "' }}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}{{- '" + answer + "' }}{%- endif %}",
        ]
    )


def _save_processor_parts(
    out: Path, processor_class: str, image_processor: Any, tokenizer: Any, template: str, **settings: Any
) -> None:
    """What a hub checkpoint ships for a processor that holds a video processor (which needs torchvision
    to build): the image processor naming its processor class, the processor's own settings, the tokenizer
    and the chat template. A loader builds the processor from these parts."""
    image_processor.save_pretrained(out)
    _name_processor_class(out, processor_class)
    (out / "processor_config.json").write_text(
        json.dumps({**settings, "processor_class": processor_class}, indent=2) + "\n", encoding="utf-8"
    )
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def _open_gates(model: Any) -> None:
    """Set the model's scalar tanh gates to 1. They start at 0 (closed), so the image would change nothing
    in an untrained model; a trained one has them open, and a test must see the image matter."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "gate" in name.rsplit(".", 1)[-1]:
                param.fill_(1.0)


# ---------------------------------------------------------------------------------- Llama-3.2-Vision (mllama)

_LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
)


def _build_mllama(out: Path, seed: int) -> None:
    """meta-llama/Llama-3.2-11B-Vision-Instruct layout: a tiled ViT (local and global encoders), Llama 3 text
    whose cross-attention layers attend to the image; the prompt holds one <|image|> token, not features."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
    )

    tokenizer = _tokenizer(
        (*_LLAMA3_SPECIALS, "<|image|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        image_token="<|image|>",
    )
    eos_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    tile, patch = 16, 8
    # The vision output is the last hidden state concatenated with the listed intermediate layers'.
    vision = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": tile,
        "patch_size": patch,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [0],
        "vision_output_dim": 2 * _WIDTH,
    }
    # Layer 1 cross-attends to the image, layer 0 self-attends (the real model has one in five).
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "cross_attention_layers": [1],
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id)
    model = seeded_model(seed, lambda: MllamaForConditionalGeneration(config))
    _open_gates(model)
    set_generation_ids(model, tokenizer, eos_token_id=eos_id)
    template = _chat_template(
        "<|start_header_id|>{role}<|end_header_id|>\\n\\n", "<|eot_id|>", "<|image|>", bos=True
    )
    # Up to 4 tiles of 16 px per image, as the real one cuts 560 px tiles.
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# -------------------------------------------------------------------------------------------------- Gemma 3


def _build_gemma3(out: Path, seed: int) -> None:
    """google/gemma-3-4b-it layout: SigLIP tower, pooled to a fixed number of soft tokens, Gemma 3 text with
    sliding-window and global layers; image tokens attend to each other both ways."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tokenizer = _tokenizer(
        (
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        image_token="<image_soft_token>",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    ids = {
        t: tokenizer.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<start_of_image>", "<end_of_image>")
    }
    image_size, patch, tokens = 32, 8, 4  # 4x4 patches average-pooled to 2x2 soft tokens
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 512,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = seeded_model(seed, lambda: Gemma3ForConditionalGeneration(config))
    # Gemma 3 answers end with <end_of_turn>; <eos> ends a document.
    set_generation_ids(model, tokenizer, eos_token_id=[tokenizer.eos_token_id, ids["<end_of_turn>"]])
    template = _chat_template(
        "<start_of_turn>{role}\\n", "<end_of_turn>\\n", "<start_of_image>", bos=True, answer_role="model"
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=tokens
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ----------------------------------------------------------------------------------------- InternVL 3.x (-hf)


def _build_internvl(out: Path, seed: int) -> None:
    """OpenGVLab/InternVL3-*-hf layout: InternViT, pixel shuffle to a quarter of the tokens, MLP projector,
    Qwen2 text; each image is cut into up to 4 tiles plus a thumbnail, so token counts vary by shape."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
    )

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = _tokenizer(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named=named,
    )
    image_size, patch = 32, 8
    image_seq_length = (image_size // patch) ** 2 // 4  # 16 patches, pixel-shuffled by 0.5: 4 tokens a tile
    text = {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": [image_size, image_size],
        "patch_size": [patch, patch],
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        vision_feature_select_strategy="default",  # InternViT has a CLS token; the features drop it
    )
    model = seeded_model(seed, lambda: InternVLForConditionalGeneration(config))
    set_generation_ids(model, tokenizer)
    template = _chat_template("<|im_start|>{role}\\n", "<|im_end|>\\n", "<IMG_CONTEXT>\\n")
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, max_patches=4
    )
    model.save_pretrained(out)
    # The processor holds a video processor, which cannot be built without torchvision: write its parts.
    _save_processor_parts(
        out, "InternVLProcessor", image_processor, tokenizer, template, image_seq_length=image_seq_length
    )


# --------------------------------------------------------------------------------------------- MiniCPM-V 4.x


def _build_minicpmv(out: Path, seed: int) -> None:
    """openbmb/MiniCPM-V-4.6 layout: a NaViT SigLIP (native aspect ratio) with a window-attention merger
    inside, an MLP merger (16 patches to a token), Qwen3.5 text (linear-attention and full-attention
    layers); a large image is cut into slices besides its overview, so token counts vary by size."""
    from transformers import (
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        MiniCPMV4_6ImageProcessorPil,
    )

    named = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "image_start_token": "<image>",
        "image_end_token": "</image>",
        "slice_start_token": "<slice>",
        "slice_end_token": "</slice>",
        "image_id_start_token": "<image_id>",
        "image_id_end_token": "</image_id>",
    }
    tokenizer = _tokenizer(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named=named,
    )
    resolution, patch = 32, 8  # a 32 px overview or slice: 4x4 patches, merged twice to 1 token
    # Qwen3.5 rotates a quarter of each 32-wide head: 8 dims, 4 frequencies split over t, h, w (mrope).
    text = {
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_conv_kernel_dim": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": resolution,
        "patch_size": patch,
    }
    config = MiniCPMV4_6Config(
        text_config=text,
        vision_config=vision,
        image_size=resolution,
        insert_layer_id=0,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    model = seeded_model(seed, lambda: MiniCPMV4_6ForConditionalGeneration(config))
    set_generation_ids(model, tokenizer)
    template = _chat_template("<|im_start|>{role}\\n", "<|im_end|>\\n", "<|image_pad|>\\n")
    image_processor = MiniCPMV4_6ImageProcessorPil(
        scale_resolution=resolution, patch_size=patch, max_slice_nums=4
    )
    model.save_pretrained(out)
    # The processor holds a video processor, which cannot be built without torchvision: write its parts.
    _save_processor_parts(out, "MiniCPMV4_6Processor", image_processor, tokenizer, template)


# --------------------------------------------------------------------------------------------------- Molmo2

# Molmo2's image tokens live in an extra vocabulary after the text model's own, in this order.
_MOLMO2_EXTRA = (
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
)


def _build_molmo2(out: Path, seed: int) -> None:
    """allenai/Molmo2-*B layout: a SigLIP-style ViT over a low-res view and overlapping crops, an adapter
    that attention-pools 2x2 patches from two ViT layers, Qwen3 text; image tokens attend both ways.

    Molmo2's image processor exists only for torchvision, so its settings are written as the hub's
    preprocessor_config.json would hold them: building one here would need torchvision too."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    tokenizer = _tokenizer(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>", pad="<|endoftext|>"
    )
    vocab = len(tokenizer)
    tokenizer.add_tokens(list(_MOLMO2_EXTRA), special_tokens=True)
    ids = dict(zip(_MOLMO2_EXTRA, range(vocab, vocab + len(_MOLMO2_EXTRA)), strict=True))
    crop, patch = 32, 8  # 4x4 patches a crop, pooled 2x2: 4 tokens a crop
    attention = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
    vision = {
        **attention,
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "image_size": [crop, crop],
        "patch_size": patch,
    }
    # The adapter pools the features of the last ViT layer and the first, concatenated.
    adapter = {
        **attention,
        "vision_feature_layer": [-1, 0],
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "text_hidden_size": _WIDTH,
    }
    text = {
        **attention,
        "num_key_value_heads": 1,
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "vocab_size": vocab,
        "additional_vocab_size": 16,
        "max_position_embeddings": 512,
    }
    config = Molmo2Config(
        vision_config=vision,
        adapter_config=adapter,
        text_config=text,
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )
    model = seeded_model(seed, lambda: Molmo2ForConditionalGeneration(config))
    set_generation_ids(model, tokenizer, bos_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    image_processor = {
        "image_processor_type": "Molmo2ImageProcessor",
        "processor_class": "Molmo2Processor",
        "size": {"height": crop, "width": crop},
        "patch_size": patch,
        "pooling_size": [2, 2],
        "max_crops": 4,
        "overlap_margins": [1, 1],  # the real 27-patch crops overlap by 4 patches a side
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(
        json.dumps(image_processor, indent=2) + "\n", encoding="utf-8"
    )
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Molmo2Processor"}, indent=2) + "\n", encoding="utf-8"
    )
    tokenizer.save_pretrained(out)
    template = _chat_template("<|im_start|>{role}\\n", "<|im_end|>\\n", "<|image|>")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


# ------------------------------------------------------------------------------------ BLIP-2 and InstructBLIP


def _qformer_parts() -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The vision tower and Q-Former shared by BLIP-2 and InstructBLIP (a ViT, then learned queries that
    cross-attend to it), and the image processor. Each image becomes as many text positions as queries."""
    from transformers import BlipImageProcessorPil

    vision = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    qformer = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "encoder_hidden_size": _WIDTH,
        "cross_attention_frequency": 1,
    }
    # CLIP's mean and std, at a fixed square size (224 px in the real ones).
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return vision, qformer, image_processor


def _build_blip2(out: Path, seed: int) -> None:
    """Salesforce/blip2-opt-2.7b layout: ViT, Q-Former, OPT text. It continues a text (empty for a plain
    caption) after the image's query tokens; its captions end at a newline. No chat template."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    # "<image>" is in the vocab, not named as the tokenizer's image_token: Blip2Processor wraps it in an
    # AddedToken itself when unnamed, and reads a named one as an AddedToken, which a name (a str) is not.
    tokenizer = _tokenizer(("<pad>", "</s>", "<unk>", "<image>"), bos="</s>", eos="</s>", pad="<pad>")
    queries = 4
    vision, qformer, image_processor = _qformer_parts()
    text = {
        "model_type": "opt",
        "vocab_size": len(tokenizer),
        "hidden_size": _WIDTH,
        "ffn_dim": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "word_embed_proj_dim": _WIDTH,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = seeded_model(seed, lambda: Blip2ForConditionalGeneration(config))
    newline = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n", as OPT's 50118
    set_generation_ids(model, tokenizer, eos_token_id=newline)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_instructblip(out: Path, seed: int) -> None:
    """Salesforce/instructblip-flan-t5-xl layout: ViT, a Q-Former that also reads the instruction, Flan-T5
    (an encoder-decoder: the caption is the decoder's output alone). No chat template: the instruction as
    it is."""
    from tokenizers import processors
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        PreTrainedTokenizerFast,
    )

    from loracap.testing.tokenizer import build_blip_tokenizer, train_byte_level_bpe

    # T5 writes no BOS and ends every input with </s>.
    bpe = train_byte_level_bpe(("<pad>", "</s>", "<unk>", "<image>"))
    bpe.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", bpe.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
    qformer_tokenizer = build_blip_tokenizer()  # the Q-Former is BERT: it reads the instruction with BERT's
    queries = 4
    vision, qformer, image_processor = _qformer_parts()
    qformer["vocab_size"] = len(qformer_tokenizer)
    text = {
        "model_type": "t5",
        "vocab_size": len(tokenizer),
        "d_model": _WIDTH,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 1,
        "num_heads": 2,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "decoder_start_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = seeded_model(seed, lambda: InstructBlipForConditionalGeneration(config))
    set_generation_ids(model, tokenizer, decoder_start_token_id=tokenizer.pad_token_id, bos_token_id=None)
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=queries,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------------------ GIT


def _build_git(out: Path, seed: int) -> None:
    """microsoft/git-large-coco layout: a CLIP ViT whose features precede the text in one BERT-style decoder
    (image positions see each other, text is causal), bert-base-uncased's tokenizer: a caption starts at
    [CLS] and ends at [SEP]. No chat template: a text to continue, as BLIP."""
    from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    from loracap.testing.tokenizer import build_blip_tokenizer

    tokenizer = build_blip_tokenizer()
    vision = {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    config = GitConfig(
        vision_config=vision,
        vocab_size=len(tokenizer),
        hidden_size=_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = seeded_model(seed, lambda: GitForCausalLM(config))
    set_generation_ids(
        model,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
