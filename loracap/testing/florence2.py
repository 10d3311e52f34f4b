"""Florence-2 as transformers ships it natively: DaViT / BART dimensions (tiny, large), processor, model.

`make_tiny_model("florence2", out)` writes a `Florence2ForConditionalGeneration` + `Florence2Processor`
checkpoint (a CLIP image processor configured as Florence-2's, a BART tokenizer trained here with the 1024
Florence-2 task/location tokens and `<image>`). `size="full"` builds the published Florence-2-large.

The dimensions, preprocessing constants and native model here are shared with `florence2_original`, which
writes the same weights in the original remote-code layout.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.seeding import SPREAD, seeded_model, set_generation_ids
from loracap.testing.tokenizer import FLORENCE2_ADDED_TOKENS, build_bart_tokenizer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Florence-2 preprocessing (ImageNet mean/std, bicubic), identical in both layouts: the same pixels.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BICUBIC = 3
_RESCALE = 1 / 255

# The real vocabulary size (50265 BART + 1024 Florence-2 task/location tokens). Full-size builds pad their
# embedding / lm_head to it so the per-token cost of the output projection matches the published model,
# even though the locally trained tokenizer is much smaller (the extra rows are never produced).
FLORENCE2_FULL_VOCAB = 51289

# Keys of the native Florence2Processor `post_processor_config`. transformers' Florence2PostProcessor reads
# the upper-case "PATTERN" / "AREA_THRESHOLD" keys (as the original remote-code post-processor did), so those
# spellings are the ones written; `post_process_generation` raises for a task whose type is missing here.
_FLORENCE2_POST_PROCESSOR_CONFIG: dict[str, dict[str, Any]] = {
    "pure_text": {},
    "ocr": {
        "PATTERN": r"(.+?)" + r"<loc_(\d+)>" * 8,
        "AREA_THRESHOLD": 0.0,
    },
    "phrase_grounding": {
        "FILTER_BY_BLACK_LIST": True,
        "banned_grounding_tokens": ["it", "its", "this", "that", "the image", "image", "the", "a", "an"],
    },
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


@dataclass(frozen=True)
class Florence2Dims:
    """The hyper-parameters that differ between the tiny test model and Florence-2-large."""

    image_size: int
    depths: tuple[int, ...]
    embed_dim: tuple[int, ...]
    num_heads: tuple[int, ...]
    num_groups: tuple[int, ...]
    window_size: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    max_positions: int

    @property
    def image_seq_length(self) -> int:
        # DaViT downsamples by 4*2*2*2 = 32; the projector appends one temporally pooled token.
        return (self.image_size // 32) ** 2 + 1


# Tiny: 64 px -> 2x2 final feature map (window 2) -> 5 image tokens; ~0.2 M parameters.
_FLORENCE2_TINY = Florence2Dims(
    image_size=64,
    depths=(1, 1, 1, 1),
    embed_dim=(16, 16, 32, 32),
    num_heads=(1, 1, 2, 2),
    num_groups=(1, 1, 2, 2),
    window_size=2,
    d_model=32,
    layers=1,
    heads=2,
    ffn=64,
    max_positions=1024,  # as the published decoder: room for every mode's default decode length
)
# The published Florence-2-large (0.77 B): DaViT [1,1,9,1] + BART-large, 768 px -> 577 image tokens.
_FLORENCE2_LARGE = Florence2Dims(
    image_size=768,
    depths=(1, 1, 9, 1),
    embed_dim=(256, 512, 1024, 2048),
    num_heads=(8, 16, 32, 64),
    num_groups=(8, 16, 32, 64),
    window_size=12,
    d_model=1024,
    layers=12,
    heads=16,
    ffn=4096,
    max_positions=1024,
)
# DaViT patch embedding, the same at every size.
DAVIT_PATCH_SIZE = (7, 3, 3, 3)
DAVIT_PATCH_STRIDE = (4, 2, 2, 2)
DAVIT_PATCH_PADDING = (3, 1, 1, 1)
DAVIT_PATCH_PRENORM = (False, True, True, True)


def write_florence2(out: Path, *, size: str, seed: int) -> None:
    """Build the native Florence-2 of `size` with `seed`; save model, processor and tokenizer into `out`."""
    model, processor = build_florence2(size, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    mark_bart_tokenizer(out)


def mark_bart_tokenizer(out: Path) -> None:
    """Name the tokenizer class "BartTokenizer" in tokenizer_config.json, as Florence-2 checkpoints do.

    In transformers 5 `BartTokenizer` is an alias of `RobertaTokenizer`, so save_pretrained writes
    "RobertaTokenizer"; both load the same, but a hub-faithful file says "BartTokenizer".
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "BartTokenizer"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def florence2_dims(size: str) -> Florence2Dims:
    """The dimensions of `size`: "full" is Florence-2-large, anything else the tiny test model."""
    return _FLORENCE2_LARGE if size == "full" else _FLORENCE2_TINY


def _florence2_image_processor(dims: Florence2Dims) -> Any:
    """CLIP image processor as Florence-2 configures it: square resize, no crop, ImageNet normalisation.

    `image_seq_length` is read by `Florence2Processor` to expand `<image>` into that many placeholders; it
    must equal the number of image features the model produces or the forward pass fails.
    """
    from transformers import CLIPImageProcessorPil

    side = dims.image_size
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=_RESCALE,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=BICUBIC,
        do_convert_rgb=None,
        image_seq_length=dims.image_seq_length,
    )


def _florence2_tokenizer() -> PreTrainedTokenizerBase:
    """Base BART BPE + the 1024 Florence-2 tokens in the remote processor's order + `<image>` last."""
    return build_bart_tokenizer(FLORENCE2_ADDED_TOKENS, image_token=True)


def build_florence2(size: str, seed: int) -> tuple[PreTrainedModel, Any]:
    """The native transformers Florence-2 (`Florence2ForConditionalGeneration` + `Florence2Processor`)."""
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    dims = florence2_dims(size)
    tokenizer = _florence2_tokenizer()
    processor = Florence2Processor(
        image_processor=_florence2_image_processor(dims),
        tokenizer=tokenizer,
        post_processor_config=_FLORENCE2_POST_PROCESSOR_CONFIG,
    )
    # Tiny: vocab = len(tokenizer) exactly. Full: pad to the real 51289 rows. Decoding cost per token is
    # dominated by the 12 decoder layers, but the lm_head over a 51k vocab is not free on CPU, so a
    # benchmark on the full build pays for it as the real model does.
    vocab = len(tokenizer) if size == "tiny" else max(len(tokenizer), FLORENCE2_FULL_VOCAB)
    text_config = BartConfig(
        vocab_size=vocab,
        d_model=dims.d_model,
        encoder_layers=dims.layers,
        decoder_layers=dims.layers,
        encoder_attention_heads=dims.heads,
        decoder_attention_heads=dims.heads,
        encoder_ffn_dim=dims.ffn,
        decoder_ffn_dim=dims.ffn,
        max_position_embeddings=dims.max_positions,
        activation_function="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        scale_embedding=False,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # BART decodes from </s>, then emits <s>: Florence-2 output reads "</s><s>caption</s>".
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = Florence2VisionConfig(
        depths=list(dims.depths),
        embed_dim=list(dims.embed_dim),
        num_heads=list(dims.num_heads),
        num_groups=list(dims.num_groups),
        window_size=dims.window_size,
        patch_size=list(DAVIT_PATCH_SIZE),
        patch_stride=list(DAVIT_PATCH_STRIDE),
        patch_padding=list(DAVIT_PATCH_PADDING),
        patch_prenorm=list(DAVIT_PATCH_PRENORM),
        projection_dim=dims.d_model,
        drop_path_rate=0.1,
    )
    config = Florence2Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
    )
    model = seeded_model(
        seed, lambda: Florence2ForConditionalGeneration(config), spread=SPREAD if size == "tiny" else None
    )
    set_generation_ids(
        model,
        tokenizer,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    return model, processor
