"""Captioners trained with `loracap train` (vision tower -> projector -> decoder-only LM) as ONNX, in the
three-graph layout transformers.js uses for its image-text-to-text models (LLaVA, Idefics3, SmolVLM):

    onnx/vision_encoder.onnx         pixel_values -> image_features (B, P, hidden): tower and projector fused
    onnx/embed_tokens.onnx           input_ids -> inputs_embeds
    onnx/decoder_model_merged.onnx   inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key /
                                     .value -> logits, present.{i}.key / .value

A decoder-only LM needs no `If` to merge its first and later steps: the first step feeds empty caches
(length 0) and the same graph serves both. The LM's LoRA was merged when the captioner was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .graphs import QUANTIZATIONS, as_module, dim, export_graph, quantize

VISION, EMBED, DECODER = "vision_encoder", "embed_tokens", "decoder_model_merged"


def load(folder: Path) -> Any:
    from loracap.prefix.modeling import PrefixCaptioner

    return PrefixCaptioner.from_pretrained(folder).eval()


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def export(model: Any, out: Path, *, opset: int, quantizations: list[str]) -> None:
    import torch

    vision = model.config.vision()
    side = getattr(vision, "vision_config", vision).image_size
    pixels = torch.randn(2, 3, side, side)
    batch, sequence = dim("batch"), dim("sequence")
    vision_encoder = as_module(model, lambda m, p: m.prefix(p))  # tower and projector, fused
    export_graph(
        vision_encoder, (pixels,), out / f"{VISION}.onnx", inputs=["pixel_values"],
        outputs=["image_features"], dynamic_shapes=({0: batch},), opset=opset,
    )  # fmt: skip
    ids = torch.tensor([[1, 2, 3]] * 2)
    embed_tokens = as_module(model.get_input_embeddings(), lambda e, i: e(i))
    export_graph(
        embed_tokens, (ids,), out / f"{EMBED}.onnx", inputs=["input_ids"],
        outputs=["inputs_embeds"], dynamic_shapes=({0: batch, 1: sequence},), opset=opset,
    )  # fmt: skip
    _export_decoder(model.language_model, out / f"{DECODER}.onnx", opset)
    for kind in quantizations:
        for name in (VISION, EMBED, DECODER):
            quantize(out / f"{name}.onnx", out / f"{name}{QUANTIZATIONS[kind]}.onnx", kind)


def _export_decoder(lm: Any, path: Path, opset: int) -> None:
    import torch
    from transformers.cache_utils import DynamicCache

    config = lm.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, inputs_embeds: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)])
            output = self.lm(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            flat = []
            for layer in output.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (output.logits, *flat)

    rows, new, old = 2, 5, 3
    embeds = torch.randn(rows, new, config.hidden_size)
    mask = torch.ones(rows, old + new, dtype=torch.int64)
    positions = torch.arange(old, old + new).expand(rows, -1)
    past = [torch.randn(rows, kv_heads, old, head_dim) for _ in range(2 * layers)]
    batch, sequence, past_sequence = dim("batch"), dim("sequence"), dim("past_sequence")
    names = cache_names("past_key_values", layers)
    export_graph(
        Decoder(), (embeds, mask, positions, *past), path,
        inputs=["inputs_embeds", "attention_mask", "position_ids", *names],
        outputs=["logits", *cache_names("present", layers)],
        dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: dim("total_sequence")},
                        {0: batch, 1: sequence}, tuple({0: batch, 2: past_sequence} for _ in names)),
        opset=opset,
    )  # fmt: skip


def reference(model: Any, inputs: Any, max_new_tokens: int, runtime: Any) -> tuple[Any, list[list[int]]]:
    """PyTorch's first-step logits (B, V) and greedy tokens per image (up to and with the end token), for
    the pixels the onnxruntime backend prepared (`inputs`)."""
    import torch

    pixels, tokenizer = torch.from_numpy(inputs), runtime.tokenizer
    from loracap.prefix.batching import pad_id, prompt_ids

    ids = prompt_ids(tokenizer, model.config.prompt)
    with torch.inference_mode():
        embeds = model.prefix(pixels)
        if ids:
            text = model.get_input_embeddings()(torch.tensor([ids]).expand(len(pixels), -1))
            embeds = torch.cat([embeds, text], dim=1)
        logits = model.language_model(inputs_embeds=embeds).logits[:, -1].numpy()
        out = model.generate_captions(
            pixels, ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer),
            max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
        )  # fmt: skip
    eos = tokenizer.eos_token_id
    return logits, [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]
