"""Tiny random-weight dual encoders (CLIP, SigLIP) for image-text scoring tests, built offline.

`make_tiny_model("clip", out)` writes an `openai/clip-vit-*` style checkpoint: `CLIPModel`, `CLIPProcessor`
with `CLIPImageProcessorPil` and a `CLIPTokenizer` trained here with the real CLIP pipeline (NFC + lower-case
normaliser, CLIP's split regex + byte-level pre-tokeniser, `</w>` end-of-word suffix, `<|startoftext|>` and
`<|endoftext|>` as the two last ids, max length 77).

`make_tiny_model("siglip-clip", out)` writes a `google/siglip-*` style checkpoint: `SiglipModel` and
`SiglipProcessor`. The hub's `SiglipTokenizer` is a sentencepiece model and sentencepiece is neither installed
here nor trainable offline in milliseconds, so the tokenizer is a `tokenizers` BPE trained on the spot with
sentencepiece's layout: lower-casing, `Metaspace` ("▁") word boundaries, `<pad>`=0, `</s>`=1 (eos, also the
pad token, as on the hub), `<unk>`=2, `</s>` appended, no BOS, max length 64, and only `input_ids` returned
(the hub tokenizer returns no attention mask: SigLIP reads the last position, so texts are padded to 64).
It is saved as a `PreTrainedTokenizerFast` (tokenizer.json), which `AutoTokenizer` / `AutoProcessor` reload
without sentencepiece.

`make_tiny_model("siglip", out)` is the vision tower one passes as `--vision google/siglip-base-patch16-224`.
That hub checkpoint is a full `SiglipModel` (a dual encoder) whose loaders take its `.vision_model`, so this
is built by the "siglip-clip" builder (full `SiglipModel` + `SiglipProcessor`), not as a bare
`SiglipVisionModel`: the folder loads with `AutoModel` (tower at `model.vision_model`) and also directly with
`SiglipVisionModel.from_pretrained` (config read from `vision_config`; the `text_model.*` weights are
reported unexpected and skipped), as the hub one does. Its only difference from "siglip-clip" is a 2-layer
vision tower, so "the second-to-last layer" and "unfreeze the last layer" mean something. 32 px images in
8 px patches give a 4x4 grid, 16 patch tokens (hub: 224 / 16 -> 14x14 = 196), a square with an even side,
so a 2x2 pixel shuffle folds it into 4 tokens.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.seeding import seeded_model
from loracap.testing.tokenizer import caption_corpus

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

CLIP_ARCHS: tuple[str, ...] = ("clip", "siglip-clip")
# Vision towers users pass as `--vision`; built here because on the hub they are dual-encoder checkpoints.
VISION_ARCHS: tuple[str, ...] = ("siglip",)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
SIGLIP_SPECIALS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
SIGLIP_MAX_LENGTH = 64

_IMAGE_SIZE = 32
_PATCH = 8
_WIDTH = 32
_PROJECTION = 16
_SIGLIP_TOWER_LAYERS = 2  # "siglip": hidden_states[-2] is a real layer's output, not the patch embeddings


def build_clip_model(arch: str, out: Path, *, seed: int = 0) -> None:
    """Build the tiny `arch` dual encoder (or "siglip" tower) and save it into `out` (an existing folder)."""
    builders = {
        "clip": _build_clip,
        "siglip-clip": _build_siglip,
        "siglip": lambda o, s: _build_siglip(o, s, vision_layers=_SIGLIP_TOWER_LAYERS),
    }
    builders[arch](out, seed)


def _tower(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": _WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        **extra,
    }


# ----------------------------------------------------------------------------------------------------- CLIP


def build_clip_tokenizer(*, vocab_size: int = 700) -> PreTrainedTokenizerBase:
    """A `CLIPTokenizer` whose vocab and merges are trained on the caption corpus with CLIP's own pipeline.

    `CLIPTokenizer` rebuilds its normaliser, pre-tokeniser and `</w>` BPE from vocab + merges, so the BPE is
    trained under that same pipeline and handed over as vocab + merges. As in the real vocab, every byte
    exists both bare and with `</w>` (any text encodes without `<unk>`), and the two specials come last,
    so the highest id is `<|endoftext|>`: both of CLIPTextModel's pooling rules pick the same position.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # empty vocab: only borrowed for its normaliser and pre-tokeniser
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = template.backend_tokenizer.normalizer
    tok.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    trained = tok.get_vocab()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*alphabet, *(c + "</w>" for c in alphabet)]
    pieces += sorted((p for p in trained if p not in set(pieces)), key=trained.__getitem__)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=_merges(tok), model_max_length=CLIP_MAX_LENGTH)


def _merges(tok: Any) -> list[tuple[str, str]]:
    import json

    model = json.loads(tok.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _build_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _tower(
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = _tower(image_size=_IMAGE_SIZE, patch_size=_PATCH)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=_PROJECTION)
    model = seeded_model(seed, lambda: CLIPModel(config))
    model.save_pretrained(out)
    processor.save_pretrained(out)


# --------------------------------------------------------------------------------------------------- SigLIP


def build_siglip_tokenizer(*, vocab_size: int = 600) -> PreTrainedTokenizerBase:
    """A sentencepiece-shaped BPE for SigLIP (see the module docstring for why it is not sentencepiece)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = SIGLIP_SPECIALS
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SIGLIP_SPECIALS),
        initial_alphabet=sorted(set(string.printable.lower()) - set(string.whitespace)),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=eos,  # google/siglip-* pad with </s>
        unk_token=unk,
        model_max_length=SIGLIP_MAX_LENGTH,
        model_input_names=["input_ids"],
    )


def _build_siglip(out: Path, seed: int, *, vision_layers: int = 1) -> None:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    tokenizer = build_siglip_tokenizer()
    image_processor = SiglipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _tower(
        vocab_size=len(tokenizer),
        max_position_embeddings=SIGLIP_MAX_LENGTH,
        projection_size=_WIDTH,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,  # SigLIP has no BOS; the hub config's 49406 is unused
    )
    vision = _tower(image_size=_IMAGE_SIZE, patch_size=_PATCH, num_hidden_layers=vision_layers)
    config = SiglipConfig(text_config=text, vision_config=vision)
    model = seeded_model(seed, lambda: SiglipModel(config))
    model.save_pretrained(out)
    processor.save_pretrained(out)
