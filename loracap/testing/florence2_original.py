"""Florence-2 in the original remote-code layout: the reference loracap's converter is tested against.

`make_tiny_model("florence2-original", out)` writes the layout in which microsoft/Florence-2-* and
MiaoshouAI/Florence-2-*-PromptGen-* are published: a `florence2` config with `auto_map` and a DaViT
`vision_config`, the original weight names (built from the native model of `florence2` with the same seed, so
a correct conversion reproduces it), the bare BART tokenizer, an original-style preprocessor config, a
`processing_florence2.py` and a PromptGen model card. The last two are package data (`fixtures/`), written
verbatim; they are never imported or executed.

torch and transformers are imported inside the functions so `import loracap.testing` stays light.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.testing.florence2 import (
    BICUBIC,
    DAVIT_PATCH_PADDING,
    DAVIT_PATCH_PRENORM,
    DAVIT_PATCH_SIZE,
    DAVIT_PATCH_STRIDE,
    FLORENCE2_FULL_VOCAB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Florence2Dims,
    build_florence2,
    florence2_dims,
    mark_bart_tokenizer,
)
from loracap.testing.tokenizer import FLORENCE2_ADDED_TOKENS, build_bart_tokenizer

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel

# Package data under loracap/testing/fixtures/, written into the checkpoint as (name in the checkpoint, file).
# processing_florence2.py stands in for a PromptGen checkpoint's remote processor: loracap reads the
# task-prompt dict literals out of it as text, so only its shape matters (a class whose __init__ assigns both
# dicts as plain literals, with PromptGen's extra task token). README.md is a model card in the style of
# MiaoshouAI/Florence-2-*-PromptGen, where the task tokens appear only in prose; its `<MIX_CAPTION>` spelling
# is deliberate: loracap must read whatever spelling a checkpoint's card uses.
_FIXTURES: tuple[tuple[str, str], ...] = (
    ("processing_florence2.py", "florence2_processing.py.txt"),
    ("README.md", "florence2_promptgen_README.md"),
)


def write_florence2_original(out: Path, *, size: str, seed: int, weights_format: str) -> None:
    """Write the original remote-code Florence-2 layout, from the native model built with the same seed.

    The original tokenizer is the bare BART one (V_base ids); its processor adds the 1024 task/location tokens
    at load time, so config vocab_size V = V_base + 1024 and the embeddings have exactly V rows, equal to the
    native model's rows [0:V]. The native model's extra `<image>` row (id V) is dropped: a converter that
    re-adds the 1024 tokens and `<image>` and resizes reproduces the native logits over the first V ids.
    """
    import torch

    native, _ = build_florence2(size, seed)
    base_tokenizer = build_bart_tokenizer()
    dims = florence2_dims(size)
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
    mark_bart_tokenizer(out)
    for written_as, fixture in _FIXTURES:
        (out / written_as).write_text(_fixture_text(fixture), encoding="utf-8")


def _fixture_text(name: str) -> str:
    """The text of package data file `fixtures/<name>`."""
    return (resources.files("loracap.testing") / "fixtures" / name).read_text(encoding="utf-8")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


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


def _florence2_original_config(dims: Florence2Dims, vocab: int) -> dict[str, Any]:
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
        "patch_size": list(DAVIT_PATCH_SIZE),
        "patch_stride": list(DAVIT_PATCH_STRIDE),
        "patch_padding": list(DAVIT_PATCH_PADDING),
        "patch_prenorm": list(DAVIT_PATCH_PRENORM),
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


def _florence2_original_preprocessor_config(dims: Florence2Dims) -> dict[str, Any]:
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
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "resample": BICUBIC,
        "do_center_crop": False,
        "do_convert_rgb": None,
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
    }
