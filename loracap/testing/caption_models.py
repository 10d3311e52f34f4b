"""The two encoder-decoder captioners besides Florence-2: BLIP and ViT-GPT2, tiny or published size, and
BLIP's image-text matching model.

`make_tiny_model("blip", out)` writes `BlipForConditionalGeneration` + `BlipProcessor` (a BERT WordPiece
tokenizer trained here); `size="full"` is Salesforce/blip-image-captioning-large. `make_tiny_model("blip-itm",
out)` writes `BlipForImageTextRetrieval` (the ITM head `loracap report --itm-model` scores with) with the same
tokenizer and processor; `size="full"` is Salesforce/blip-itm-base-coco. `make_tiny_model("vit-gpt2",
out)` writes a `VisionEncoderDecoderModel` (ViT encoder, GPT-2 decoder) with a ViT image processor and a GPT-2
tokenizer side by side; `size="full"` is nlpconnect/vit-gpt2-image-captioning.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.seeding import SPREAD, seeded_model, set_generation_ids
from loracap.testing.tokenizer import build_blip_tokenizer, build_gpt2_tokenizer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Real vocabulary sizes. Full-size builds pad their embedding / lm_head to these so the per-token cost of the
# output projection matches the published model, even though the locally trained tokenizer is much smaller
# (the extra rows are simply never produced by the tokenizer).
BLIP_FULL_VOCAB = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
GPT2_FULL_VOCAB = 50257


def write_blip(out: Path, *, size: str, seed: int) -> None:
    """Build BLIP of `size` with `seed` and save model and processor into `out`."""
    model, processor = _build_blip(size, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def write_vit_gpt2(out: Path, *, size: str, seed: int) -> None:
    """Build ViT-GPT2 of `size` with `seed` and save model, image processor and tokenizer into `out`."""
    model, image_processor, tokenizer = _build_vit_gpt2(size, seed)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_blip(size: str, seed: int) -> tuple[PreTrainedModel, Any]:
    """`BlipForConditionalGeneration` + `BlipProcessor`; full = Salesforce/blip-image-captioning-large."""
    from transformers import BlipForConditionalGeneration

    tokenizer = build_blip_tokenizer()
    config, processor = _blip_config(size, tokenizer, large=True)
    model = seeded_model(seed, lambda: BlipForConditionalGeneration(config), spread=None)
    set_generation_ids(
        model, tokenizer, eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.bos_token_id
    )
    return model, processor


def _blip_config(
    size: str, tokenizer: PreTrainedTokenizerBase, *, large: bool, **extra: Any
) -> tuple[Any, Any]:
    """`BlipConfig` (with `extra` settings) + `BlipProcessor` of `size` around `tokenizer`: full is
    BLIP-large (ViT-L, as blip-image-captioning-large) when `large`, else BLIP-base (ViT-B, as
    blip-itm-base-coco)."""
    from transformers import (
        BlipConfig,
        BlipImageProcessorPil,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    full = size == "full"
    image_size = 384 if full else 32
    vision_config = BlipVisionConfig(
        hidden_size=(1024 if large else 768) if full else 32,
        intermediate_size=(4096 if large else 3072) if full else 64,
        num_hidden_layers=(24 if large else 12) if full else 1,
        num_attention_heads=(16 if large else 12) if full else 2,
        image_size=image_size,
        patch_size=16 if full else 8,
        projection_dim=256 if full else 32,
    )
    text_config = BlipTextConfig(
        vocab_size=max(len(tokenizer), BLIP_FULL_VOCAB) if full else len(tokenizer),
        hidden_size=768 if full else 32,
        # The text decoder cross-attends to the ViT output, so its key/value width is the vision hidden size.
        encoder_hidden_size=vision_config.hidden_size,
        intermediate_size=3072 if full else 64,
        num_hidden_layers=12 if full else 1,
        num_attention_heads=12 if full else 2,
        max_position_embeddings=512,  # as published: room for long --max-new-tokens
        projection_dim=256 if full else 32,
        # BLIP decodes from [DEC] and stops on [SEP] (generate passes sep as eos); the prompt's [CLS] is
        # replaced by [DEC] inside generate.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=256 if full else 32,
        **extra,
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return config, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ BLIP ITM


def write_blip_itm(out: Path, *, size: str, seed: int) -> None:
    """Build BLIP image-text matching of `size` with `seed` and save model and processor into `out`.

    `BlipForImageTextRetrieval` (ViT + a BERT text encoder cross-attending to it, and the 2-way `itm_head`)
    with the same tokenizer and `BlipProcessor` as "blip"; full = Salesforce/blip-itm-base-coco (ViT-B/16 at
    384 px). The tiny one's matrices are drawn with the kit's wider spread so its match probabilities differ
    from pair to pair rather than all sitting at 0.5; loads with `BlipForImageTextRetrieval.from_pretrained`.
    """
    from transformers import BlipForImageTextRetrieval

    tokenizer = build_blip_tokenizer()
    full = size == "full"
    # image_text_hidden_size: the width of the contrastive projections next to the ITM head (256 published).
    config, processor = _blip_config(size, tokenizer, large=False, image_text_hidden_size=256 if full else 16)
    spread = None if full else SPREAD
    model = seeded_model(seed, lambda: BlipForImageTextRetrieval(config), spread=spread)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# -------------------------------------------------------------------------------------------------- ViT-GPT2


def _build_vit_gpt2(size: str, seed: int) -> tuple[PreTrainedModel, Any, PreTrainedTokenizerBase]:
    """`VisionEncoderDecoderModel` (ViT encoder, GPT-2 decoder); full = nlpconnect/vit-gpt2-image-captioning.

    There is no combined processor class for this family: checkpoints ship a ViT image processor and a GPT-2
    tokenizer side by side, and so does this builder.
    """
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    tokenizer = build_gpt2_tokenizer()
    full = size == "full"
    image_size = 224 if full else 32
    eot = tokenizer.eos_token_id
    encoder = ViTConfig(
        hidden_size=768 if full else 32,
        num_hidden_layers=12 if full else 1,
        num_attention_heads=12 if full else 2,
        intermediate_size=3072 if full else 64,
        image_size=image_size,
        patch_size=16 if full else 8,
    )
    decoder = GPT2Config(
        vocab_size=max(len(tokenizer), GPT2_FULL_VOCAB) if full else len(tokenizer),
        n_embd=768 if full else 32,
        n_layer=12 if full else 1,
        n_head=12 if full else 2,
        n_positions=1024,  # as published: room for long --max-new-tokens
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # generate() reads these from the top-level config / generation config, not from the decoder's config.
    config.decoder_start_token_id = eot
    config.pad_token_id = eot
    config.eos_token_id = eot
    model = seeded_model(seed, lambda: VisionEncoderDecoderModel(config=config), spread=None)
    set_generation_ids(
        model, decoder_start_token_id=eot, bos_token_id=eot, pad_token_id=eot, eos_token_id=eot
    )
    image_processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return model, image_processor, tokenizer
