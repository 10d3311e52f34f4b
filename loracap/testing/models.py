"""Builders for random-weight captioning models of the real architectures, saved as hub checkpoints are.

Every builder constructs the published architecture from a config (tiny or full size), a tokenizer trained
locally (see `loracap.testing.tokenizer`) and the real processor, seeds torch, and writes the result with
`save_pretrained`, so a test or benchmark loads it through the same Auto classes and code paths as a hub
checkpoint, with no network. Weights are random: a model's text is junk, only its behaviour can be asserted.

`florence2-original` additionally writes the original remote-code layout in which microsoft/Florence-2-* and
MiaoshouAI/Florence-2-*-PromptGen-* are published; it is the independent reference for loracap's converter.

Besides captioners, the kit builds the parts `loracap train` assembles: `siglip`, a SigLIP vision tower (saved
as the full `SiglipModel` the hub publishes, see `clip_models`), and `llama`, a SmolLM2-shaped causal LM with
its tokenizer (see `text_models`).

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.chat_models import CHAT_ARCHS, build_chat_model
from loracap.testing.clip_models import CLIP_ARCHS, VISION_ARCHS, build_clip_model
from loracap.testing.seeding import SPREAD, seeded_model, set_generation_ids
from loracap.testing.text_models import TEXT_ARCHS, build_text_model
from loracap.testing.tokenizer import (
    FLORENCE2_ADDED_TOKENS,
    build_bart_tokenizer,
    build_blip_tokenizer,
    build_gpt2_tokenizer,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ARCHS: tuple[str, ...] = (
    "florence2",
    "florence2-original",
    "blip",
    "vit-gpt2",
    *CHAT_ARCHS,
    *CLIP_ARCHS,
    *VISION_ARCHS,
    *TEXT_ARCHS,
)
SIZES: tuple[str, ...] = ("tiny", "full")
WEIGHTS_FORMATS: tuple[str, ...] = ("safetensors", "bin")

# Florence-2 preprocessing (ImageNet mean/std, bicubic), identical in both layouts: the same pixels.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_BICUBIC = 3
_RESCALE = 1 / 255

# Real vocabulary sizes. Full-size builds pad their embedding / lm_head to these so the per-token cost of the
# output projection matches the published model, even though the locally trained tokenizer is much smaller
# (the extra rows are simply never produced by the tokenizer).
FLORENCE2_FULL_VOCAB = 51289  # 50265 BART + 1024 Florence-2 task/location tokens
BLIP_FULL_VOCAB = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
GPT2_FULL_VOCAB = 50257

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
class _Florence2Dims:
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
_FLORENCE2_TINY = _Florence2Dims(
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
_FLORENCE2_LARGE = _Florence2Dims(
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
_DAVIT_PATCH_SIZE = (7, 3, 3, 3)
_DAVIT_PATCH_STRIDE = (4, 2, 2, 2)
_DAVIT_PATCH_PADDING = (3, 1, 1, 1)
_DAVIT_PATCH_PRENORM = (False, True, True, True)


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    weights_format: str = "safetensors",
) -> Path:
    """Build a random-weight `arch` model with its tokenizer and processor and save it into `out_dir`.

    `size="tiny"` (the default) builds in well under a second and takes a few MB, for tests; `size="full"`
    builds the published architecture (Florence-2-large, BLIP-large, ViT-GPT2) for benchmarks. The same `seed`
    gives byte-identical weights; the global torch RNG state is left as it was. `weights_format="bin"` writes
    `pytorch_model.bin` instead of `model.safetensors`; only `florence2-original` offers it, because only the
    original Florence-2 checkpoints (microsoft/*) are published that way. Returns `out_dir` as a `Path`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights_format {weights_format!r}; valid: {', '.join(WEIGHTS_FORMATS)}")
    if weights_format != "safetensors" and arch != "florence2-original":
        raise ValueError(
            "weights_format='bin' is only offered for 'florence2-original' (microsoft/* ship .bin)"
        )
    if size != "tiny" and arch not in _SIZED_ARCHS:
        raise ValueError(f"only size='tiny' is offered for {arch!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch in _SIZED_ARCHS:
        _sized_builders()[arch](out, size=size, seed=seed, weights_format=weights_format)
    else:
        family = next(build for archs, build in _TINY_FAMILIES if arch in archs)
        family(arch, out, seed=seed)
    return out


# The families built in their own modules, tiny only: build(arch, out, seed=...).
_TINY_FAMILIES: tuple[tuple[tuple[str, ...], Callable[..., None]], ...] = (
    (CHAT_ARCHS, build_chat_model),
    ((*CLIP_ARCHS, *VISION_ARCHS), build_clip_model),
    (TEXT_ARCHS, build_text_model),
)
# The archs built here, which also come in the published size; their builders are `_sized_builders`.
_SIZED_ARCHS: tuple[str, ...] = ("florence2", "florence2-original", "blip", "vit-gpt2")


def _sized_builders() -> dict[str, Callable[..., None]]:
    """arch -> build(out, size=, seed=, weights_format=) for `_SIZED_ARCHS` (a function: they are defined
    further down)."""
    return {
        "florence2": _write_florence2,
        "florence2-original": _build_florence2_original,
        "blip": _write_blip,
        "vit-gpt2": _write_vit_gpt2,
    }


def _write_florence2(out: Path, *, size: str, seed: int, **_: Any) -> None:
    model, processor = _build_florence2(size, seed)
    _save_hf(model, processor, out)
    _mark_bart_tokenizer(out)


def _write_blip(out: Path, *, size: str, seed: int, **_: Any) -> None:
    model, processor = _build_blip(size, seed)
    _save_hf(model, processor, out)


def _write_vit_gpt2(out: Path, *, size: str, seed: int, **_: Any) -> None:
    model, image_processor, tokenizer = _build_vit_gpt2(size, seed)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------------- helpers


def _save_hf(model: PreTrainedModel, processor: Any, out: Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _mark_bart_tokenizer(out: Path) -> None:
    """Name the tokenizer class "BartTokenizer" in tokenizer_config.json, as Florence-2 checkpoints do.

    In transformers 5 `BartTokenizer` is an alias of `RobertaTokenizer`, so save_pretrained writes
    "RobertaTokenizer"; both load the same, but a hub-faithful file says "BartTokenizer".
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "BartTokenizer"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ Florence-2 native


def _florence2_dims(size: str) -> _Florence2Dims:
    return _FLORENCE2_LARGE if size == "full" else _FLORENCE2_TINY


def _florence2_image_processor(dims: _Florence2Dims) -> Any:
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
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
        resample=_BICUBIC,
        do_convert_rgb=None,
        image_seq_length=dims.image_seq_length,
    )


def _florence2_tokenizer() -> PreTrainedTokenizerBase:
    """Base BART BPE + the 1024 Florence-2 tokens in the remote processor's order + `<image>` last."""
    return build_bart_tokenizer(FLORENCE2_ADDED_TOKENS, image_token=True)


def _build_florence2(size: str, seed: int) -> tuple[PreTrainedModel, Any]:
    """The native transformers Florence-2 (`Florence2ForConditionalGeneration` + `Florence2Processor`)."""
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    dims = _florence2_dims(size)
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
        patch_size=list(_DAVIT_PATCH_SIZE),
        patch_stride=list(_DAVIT_PATCH_STRIDE),
        patch_padding=list(_DAVIT_PATCH_PADDING),
        patch_prenorm=list(_DAVIT_PATCH_PRENORM),
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


# ---------------------------------------------------------------------------------------- Florence-2 original


def _build_florence2_original(out: Path, *, size: str, seed: int, weights_format: str) -> None:
    """Write the original remote-code Florence-2 layout, from the native model built with the same seed.

    The original tokenizer is the bare BART one (V_base ids); its processor adds the 1024 task/location tokens
    at load time, so config vocab_size V = V_base + 1024 and the embeddings have exactly V rows, equal to the
    native model's rows [0:V]. The native model's extra `<image>` row (id V) is dropped: a converter that
    re-adds the 1024 tokens and `<image>` and resizes reproduces the native logits over the first V ids.
    """
    import torch

    native, _ = _build_florence2(size, seed)
    base_tokenizer = build_bart_tokenizer()
    dims = _florence2_dims(size)
    # Tiny: V = base + 1024, one row fewer than native (no <image>). Full: the real 51289, all native rows.
    vocab = len(base_tokenizer) + len(FLORENCE2_ADDED_TOKENS)
    if size == "full":
        vocab = max(vocab, FLORENCE2_FULL_VOCAB)
    native_vocab = native.config.text_config.vocab_size
    if vocab > native_vocab:  # pragma: no cover - guards the invariant the converter test relies on
        raise RuntimeError(f"original vocab {vocab} exceeds native {native_vocab}")

    state = _florence2_original_state_dict(native, vocab=vocab, seed=seed)
    # Most tensors in `state` share the module's storage (no copy); only the vocab-sized ones are clones.
    del native
    if weights_format == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state

    _write_json(out / "config.json", _florence2_original_config(dims, vocab))
    _write_json(out / "preprocessor_config.json", _florence2_original_preprocessor_config(dims))
    base_tokenizer.save_pretrained(out)
    _mark_bart_tokenizer(out)
    (out / "processing_florence2.py").write_text(_FLORENCE2_ORIGINAL_PROCESSING_PY, encoding="utf-8")
    (out / "README.md").write_text(_FLORENCE2_PROMPTGEN_README, encoding="utf-8")


def _florence2_original_state_dict(
    native: PreTrainedModel, *, vocab: int, seed: int
) -> dict[str, torch.Tensor]:
    """Rename the native Florence-2 weights to the original remote-code key names, written out explicitly.

    Original names come from microsoft/Florence-2-*'s modeling_florence2.py (DaViT with `PreNorm` / `Residual`
    wrappers, so `fn.` and `norm` sit where the native model has `norm1` / `norm2`; a `dw` depth-wise conv; a
    `net` MLP). Every tensor is made contiguous and unshared (`clone`) so safetensors can write tied weights.
    """
    import torch

    sd = native.state_dict()
    vis = native.config.vision_config
    out: dict[str, torch.Tensor] = {}

    def take(native_key: str) -> torch.Tensor:
        return sd.pop(native_key).detach().contiguous()

    for i, depth in enumerate(vis.depths):
        n = f"model.vision_tower.convs.{i}"
        o = f"vision_tower.convs.{i}"
        for p in ("weight", "bias"):
            out[f"{o}.proj.{p}"] = take(f"{n}.conv.{p}")
            out[f"{o}.norm.{p}"] = take(f"{n}.norm.{p}")
        for j in range(depth):
            n = f"model.vision_tower.blocks.{i}.{j}"
            o = f"vision_tower.blocks.{i}.{j}"
            for p in ("weight", "bias"):
                # Spatial block: conv -> window attention -> conv -> FFN.
                out[f"{o}.spatial_block.conv1.fn.dw.{p}"] = take(f"{n}.spatial_block.conv1.{p}")
                out[f"{o}.spatial_block.window_attn.norm.{p}"] = take(f"{n}.spatial_block.norm1.{p}")
                out[f"{o}.spatial_block.window_attn.fn.qkv.{p}"] = take(
                    f"{n}.spatial_block.window_attn.qkv.{p}"
                )
                out[f"{o}.spatial_block.window_attn.fn.proj.{p}"] = take(
                    f"{n}.spatial_block.window_attn.proj.{p}"
                )
                out[f"{o}.spatial_block.conv2.fn.dw.{p}"] = take(f"{n}.spatial_block.conv2.{p}")
                out[f"{o}.spatial_block.ffn.norm.{p}"] = take(f"{n}.spatial_block.norm2.{p}")
                out[f"{o}.spatial_block.ffn.fn.net.fc1.{p}"] = take(f"{n}.spatial_block.ffn.fc1.{p}")
                out[f"{o}.spatial_block.ffn.fn.net.fc2.{p}"] = take(f"{n}.spatial_block.ffn.fc2.{p}")
                # Channel block: conv -> channel (group) attention -> conv -> FFN.
                out[f"{o}.channel_block.conv1.fn.dw.{p}"] = take(f"{n}.channel_block.conv1.{p}")
                out[f"{o}.channel_block.channel_attn.norm.{p}"] = take(f"{n}.channel_block.norm1.{p}")
                out[f"{o}.channel_block.channel_attn.fn.qkv.{p}"] = take(
                    f"{n}.channel_block.channel_attn.qkv.{p}"
                )
                out[f"{o}.channel_block.channel_attn.fn.proj.{p}"] = take(
                    f"{n}.channel_block.channel_attn.proj.{p}"
                )
                out[f"{o}.channel_block.conv2.fn.dw.{p}"] = take(f"{n}.channel_block.conv2.{p}")
                out[f"{o}.channel_block.ffn.norm.{p}"] = take(f"{n}.channel_block.norm2.{p}")
                out[f"{o}.channel_block.ffn.fn.net.fc1.{p}"] = take(f"{n}.channel_block.ffn.fc1.{p}")
                out[f"{o}.channel_block.ffn.fn.net.fc2.{p}"] = take(f"{n}.channel_block.ffn.fc2.{p}")

    # Real checkpoints carry DaViT's final LayerNorm although Florence-2 never applies it: random values here,
    # from their own generator so the native weights stay those of `seed`.
    gen = torch.Generator().manual_seed(seed + 1)
    last = vis.embed_dim[-1]
    out["vision_tower.norms.weight"] = 1.0 + 0.02 * torch.randn(last, generator=gen)
    out["vision_tower.norms.bias"] = 0.02 * torch.randn(last, generator=gen)

    # The projection is a bare [vision_dim, text_dim] parameter used as `x @ W`, i.e. the Linear weight
    # transposed.
    mm = "model.multi_modal_projector"
    out["image_projection"] = take(f"{mm}.image_projection.weight").t().contiguous()
    for p in ("weight", "bias"):
        out[f"image_proj_norm.{p}"] = take(f"{mm}.image_proj_norm.{p}")
    out["image_pos_embed.row_embeddings.weight"] = take(f"{mm}.image_position_embed.row_embeddings.weight")
    out["image_pos_embed.column_embeddings.weight"] = take(
        f"{mm}.image_position_embed.column_embeddings.weight"
    )
    out["visual_temporal_embed.pos_idx_to_embed"] = take(f"{mm}.visual_temporal_embed.pos_idx_to_embed")

    # BART: every native `model.language_model.<rest>` becomes `language_model.model.<rest>`; vocab-sized
    # tensors keep rows [0:vocab] and are cloned, since they are tied (one storage) in the native model.
    vocab_sized = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    prefix = "model.language_model."
    for key in [k for k in sd if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        tensor = sd.pop(key).detach()
        if rest in vocab_sized:
            tensor = tensor[:vocab].clone()
        out[f"language_model.model.{rest}"] = tensor.contiguous()
    out["language_model.lm_head.weight"] = sd.pop("lm_head.weight").detach()[:vocab].clone()
    out["language_model.final_logits_bias"] = torch.zeros(1, vocab)

    if sd:  # pragma: no cover - a new native parameter this mapping does not know about
        raise RuntimeError(f"native Florence-2 weights left unmapped: {sorted(sd)}")
    return out


def _florence2_original_config(dims: _Florence2Dims, vocab: int) -> dict[str, Any]:
    """config.json of the original remote-code layout: florence2 + auto_map, DaViT vision_config."""
    text_config = {
        "model_type": "florence2_language",
        "vocab_size": vocab,
        "d_model": dims.d_model,
        "encoder_layers": dims.layers,
        "decoder_layers": dims.layers,
        "encoder_attention_heads": dims.heads,
        "decoder_attention_heads": dims.heads,
        "encoder_ffn_dim": dims.ffn,
        "decoder_ffn_dim": dims.ffn,
        "max_position_embeddings": dims.max_positions,
        "activation_function": "gelu",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.1,
        "init_std": 0.02,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "classifier_dropout": 0.0,
        "scale_embedding": False,
        "use_cache": True,
        "is_encoder_decoder": True,
        "add_bias_logits": False,
        "add_final_layer_norm": False,
        "normalize_before": False,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_bos_token_id": 0,
        "forced_eos_token_id": 2,
    }
    vision_config = {
        "model_type": "davit",
        "drop_path_rate": 0.1,
        "patch_size": list(_DAVIT_PATCH_SIZE),
        "patch_stride": list(_DAVIT_PATCH_STRIDE),
        "patch_padding": list(_DAVIT_PATCH_PADDING),
        "patch_prenorm": list(_DAVIT_PATCH_PRENORM),
        "enable_checkpoint": False,
        "dim_embed": list(dims.embed_dim),
        "num_heads": list(dims.num_heads),
        "num_groups": list(dims.num_groups),
        "depths": list(dims.depths),
        "window_size": dims.window_size,
        "projection_dim": dims.d_model,
        "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        },
        "model_type": "florence2",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "ignore_index": -100,
        "projection_dim": dims.d_model,
        "vocab_size": vocab,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "text_config": text_config,
        "vision_config": vision_config,
    }


def _florence2_original_preprocessor_config(dims: _Florence2Dims) -> dict[str, Any]:
    """preprocessor_config.json in the original style; the same pixels as the native CLIP processor."""
    side = dims.image_size
    return {
        "processor_class": "Florence2Processor",
        "image_processor_type": "CLIPImageProcessor",
        "image_seq_length": dims.image_seq_length,
        "do_resize": True,
        "size": {"height": side, "width": side},
        "crop_size": {"height": side, "width": side},
        "do_normalize": True,
        "image_mean": _IMAGENET_MEAN,
        "image_std": _IMAGENET_STD,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "resample": _BICUBIC,
        "do_center_crop": False,
        "do_convert_rgb": None,
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
    }


# A stand-in for the remote processing_florence2.py of a PromptGen checkpoint. It is never imported or
# executed (loracap reads the task-prompt dict literals out of it as text); only its shape matters: a class
# whose __init__ assigns both dicts as plain literals, with PromptGen's extra task token.
_FLORENCE2_ORIGINAL_PROCESSING_PY = '''\
"""Processor class for Florence-2 (remote code; test fixture written by loracap.testing, never executed)."""

from transformers.processing_utils import ProcessorMixin


class Florence2Processor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "CLIPImageProcessor"
    tokenizer_class = ("BartTokenizer", "BartTokenizerFast")

    def __init__(self, image_processor=None, tokenizer=None):
        if image_processor is None:
            raise ValueError("You need to specify an `image_processor`.")
        if tokenizer is None:
            raise ValueError("You need to specify a `tokenizer`.")
        if not hasattr(image_processor, "image_seq_length"):
            raise ValueError("Image processor is missing an `image_seq_length` attribute.")

        self.image_seq_length = image_processor.image_seq_length

        tokens_to_add = {
            "additional_special_tokens": tokenizer.additional_special_tokens
            + ["<od>", "</od>", "<ocr>", "</ocr>"]
            + [f"<loc_{x}>" for x in range(1000)]
            + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
               "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
               "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
        }
        tokenizer.add_special_tokens(tokens_to_add)

        self.tasks_answer_post_processing_type = {
            '<OCR>': 'pure_text',
            '<OCR_WITH_REGION>': 'ocr',
            '<CAPTION>': 'pure_text',
            '<DETAILED_CAPTION>': 'pure_text',
            '<MORE_DETAILED_CAPTION>': 'pure_text',
            '<OD>': 'description_with_bboxes',
            '<GENERATE_TAGS>': 'pure_text',
        }

        self.task_prompts_without_inputs = {
            '<OCR>': 'What is the text in the image?',
            '<OCR_WITH_REGION>': 'What is the text in the image, with regions?',
            '<CAPTION>': 'What does the image describe?',
            '<DETAILED_CAPTION>': 'Describe in detail what is shown in the image.',
            '<MORE_DETAILED_CAPTION>': 'Describe with a paragraph what is shown in the image.',
            '<OD>': 'Locate the objects with category name in the image.',
            '<DENSE_REGION_CAPTION>': 'Locate the objects in the image, with their descriptions.',
            '<REGION_PROPOSAL>': 'Locate the region proposals in the image.',
            '<GENERATE_TAGS>': '<GENERATE_TAGS>',
        }

        self.task_prompts_with_input = {
            '<CAPTION_TO_PHRASE_GROUNDING>': "Locate the phrases in the caption: {input}",
            '<REFERRING_EXPRESSION_SEGMENTATION>': 'Locate {input} in the image with mask',
            '<REGION_TO_SEGMENTATION>': 'What is the polygon mask of region {input}',
            '<OPEN_VOCABULARY_DETECTION>': 'Locate {input} in the image.',
            '<REGION_TO_CATEGORY>': 'What is the region {input}?',
            '<REGION_TO_DESCRIPTION>': 'What does the region {input} describe?',
            '<REGION_TO_OCR>': 'What text is in the region {input}?',
        }

        super().__init__(image_processor, tokenizer)

    def _construct_prompts(self, text):
        prompts = []
        for _text in text:
            for task_token, task_prompt in self.task_prompts_without_inputs.items():
                if task_token in _text:
                    assert _text == task_token, f"Task token {task_token} should be the only token."
                    _text = task_prompt
                    break
            for task_token, task_prompt in self.task_prompts_with_input.items():
                if task_token in _text:
                    _text = task_prompt.format(input=_text.replace(task_token, ""))
                    break
            prompts.append(_text)
        return prompts
'''

# Model card in the style of MiaoshouAI/Florence-2-*-PromptGen: the task tokens appear only in prose. The
# `<MIX_CAPTION>` spelling is deliberate: loracap must read whatever spelling a checkpoint's card uses.
_FLORENCE2_PROMPTGEN_README = """\
---
license: mit
pipeline_tag: image-to-text
tags:
  - florence-2
  - prompt-generation
---

# Florence-2 PromptGen (random-weight test fixture)

Written by `loracap.testing` in the original remote-code layout of the Florence-2 PromptGen checkpoints.
The weights are random: the model produces junk text and exists only to exercise loading code.

## Instructions

Besides the standard Florence-2 tasks (`<CAPTION>`, `<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`), this
model was fine-tuned for prompt generation:

- Use `<GENERATE_TAGS>` for danbooru tags.
- Use `<MIX_CAPTION>` for a caption followed by tags.
- Use `<ANALYZE>` for composition: subject, framing, lighting and color.

```python
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
inputs = processor(text="<GENERATE_TAGS>", images=image, return_tensors="pt")
```
"""


# ------------------------------------------------------------------------------------------------------ BLIP


def _build_blip(size: str, seed: int) -> tuple[PreTrainedModel, Any]:
    """`BlipForConditionalGeneration` + `BlipProcessor`; full = Salesforce/blip-image-captioning-large."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    tokenizer = build_blip_tokenizer()
    full = size == "full"
    image_size = 384 if full else 32
    vision_config = BlipVisionConfig(
        hidden_size=1024 if full else 32,
        intermediate_size=4096 if full else 64,
        num_hidden_layers=24 if full else 1,
        num_attention_heads=16 if full else 2,
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
    )
    model = seeded_model(seed, lambda: BlipForConditionalGeneration(config), spread=None)
    set_generation_ids(
        model, tokenizer, eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.bos_token_id
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


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
