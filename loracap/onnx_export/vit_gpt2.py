"""ViT-GPT2-style captioners (transformers' VisionEncoderDecoderModel with a GPT-2 decoder) as ONNX, in
optimum's `image-to-text-with-past` layout, which transformers.js reads:

    onnx/encoder_model.onnx          pixel_values -> last_hidden_state
    onnx/decoder_model_merged.onnx   input_ids, encoder_hidden_states, past_key_values.*, use_cache_branch
                                     -> logits, present.*

The cache tensors are named as optimum names them: `past_key_values.{i}.decoder.key` / `.value`
(self-attention, grown by one each step) and `past_key_values.{i}.encoder.key` / `.value`
(cross-attention, computed once at the first step). The merged decoder is two traced graphs behind one
`If`: the first step (`use_cache_branch` false, empty caches) computes every cache from the encoder's
states; the later steps (true) read them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .graphs import QUANTIZATIONS, as_module, dim, export_graph, merge_decoders, quantize

ENCODER, DECODER = "encoder_model", "decoder_model_merged"


def load(folder: Path) -> Any:
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    if getattr(model.decoder.config, "model_type", "") != "gpt2":
        raise ValueError(f"{folder}'s decoder is a {model.decoder.config.model_type}; export takes GPT-2")
    return model


def export(model: Any, out: Path, *, opset: int, quantizations: list[str]) -> None:
    """Write the encoder and the merged decoder into `out` (an onnx/ folder), and each quantized variant."""
    import torch

    config = model.config
    side = config.encoder.image_size
    pixels = torch.randn(2, config.encoder.num_channels, side, side)
    batch = dim("batch")
    encoder = as_module(model, lambda m, p: m.encoder(pixel_values=p).last_hidden_state)
    export_graph(
        encoder, (pixels,), out / f"{ENCODER}.onnx", inputs=["pixel_values"],
        outputs=["last_hidden_state"], dynamic_shapes=({0: batch},), opset=opset,
    )  # fmt: skip
    with torch.no_grad():
        states = model.encoder(pixel_values=pixels).last_hidden_state
    first, later = out / "decoder_model.onnx", out / "decoder_with_past_model.onnx"
    _export_decoders(model, states, first, later, opset)
    merge_decoders(first, later, out / f"{DECODER}.onnx")
    for kind in quantizations:
        suffix = QUANTIZATIONS[kind]
        quantize(out / f"{ENCODER}.onnx", out / f"{ENCODER}{suffix}.onnx", kind)
        # Each decoder on its own, then merged: the quantizer leaves weights outside an If's branches alone.
        quantize(first, first.with_name(f"first{suffix}.onnx"), kind)
        quantize(later, later.with_name(f"later{suffix}.onnx"), kind)
        merge_decoders(
            first.with_name(f"first{suffix}.onnx"), later.with_name(f"later{suffix}.onnx"),
            out / f"{DECODER}{suffix}.onnx",
        )  # fmt: skip
        first.with_name(f"first{suffix}.onnx").unlink()
        later.with_name(f"later{suffix}.onnx").unlink()
    first.unlink()
    later.unlink()


def _decoder(model: Any) -> Any:
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    layers = model.decoder.config.n_layer
    projection = model.enc_to_dec_proj if hasattr(model, "enc_to_dec_proj") else None

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = model.decoder
            self.projection = projection

        def forward(
            self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, *past: torch.Tensor
        ) -> Any:
            if self.projection is not None:
                encoder_hidden_states = self.projection(encoder_hidden_states)
            if past:
                own = [(past[4 * i], past[4 * i + 1]) for i in range(layers)]
                cross = [(past[4 * i + 2], past[4 * i + 3]) for i in range(layers)]
                cache = EncoderDecoderCache(DynamicCache(own), DynamicCache(cross))
            else:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            output = self.decoder(
                input_ids=input_ids,
                encoder_hidden_states=encoder_hidden_states,
                past_key_values=cache,
                use_cache=True,
            )
            kv = output.past_key_values
            flat = []
            for i in range(layers):
                own_layer, cross_layer = kv.self_attention_cache.layers[i], kv.cross_attention_cache.layers[i]
                flat += [own_layer.keys, own_layer.values, cross_layer.keys, cross_layer.values]
            return (output.logits, *flat)

    return Decoder()


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{side}.{kind}" for i in range(layers) for side in ("decoder", "encoder")
            for kind in ("key", "value")]  # fmt: skip


def example_caches(
    layers: int, heads: int, head_dim: int, encoder_length: int, batch: Any, encoder_len: Any
) -> tuple[list[Any], tuple[dict[int, Any], ...]]:
    """Example self- and cross-attention caches for tracing a decoder's later steps (3 tokens written,
    2 rows), in `cache_names` order, and their dynamic dimensions."""
    import torch

    own, cross = (2, heads, 3, head_dim), (2, heads, encoder_length, head_dim)
    past = [torch.randn(shape) for _ in range(layers) for shape in (own, own, cross, cross)]
    past_sequence = dim("past_sequence")
    shapes = ({0: batch, 2: past_sequence}, {0: batch, 2: past_sequence},
              {0: batch, 2: encoder_len}, {0: batch, 2: encoder_len})  # fmt: skip
    return past, shapes * layers


def _export_decoders(model: Any, states: Any, first: Path, later: Path, opset: int) -> None:
    import torch

    config = model.config
    layers, heads = model.decoder.config.n_layer, model.decoder.config.n_head
    head_dim = model.decoder.config.n_embd // heads
    batch, encoder_len = dim("batch"), dim("encoder_sequence")
    presents = cache_names("present", layers)
    ids = torch.tensor([[config.decoder_start_token_id or 0, 5, 7]] * 2)
    export_graph(
        _decoder(model), (ids, states), first, inputs=["input_ids", "encoder_hidden_states"],
        outputs=["logits", *presents],
        dynamic_shapes=({0: batch, 1: dim("sequence")}, {0: batch, 1: encoder_len}), opset=opset,
    )  # fmt: skip
    past, past_shapes = example_caches(layers, heads, head_dim, states.shape[1], batch, encoder_len)
    export_graph(
        _decoder(model), (ids[:, :1], states, *past), later,
        inputs=["input_ids", "encoder_hidden_states", *cache_names("past_key_values", layers)],
        outputs=["logits", *presents],
        dynamic_shapes=({0: batch}, {0: batch, 1: encoder_len}, past_shapes), opset=opset,
    )  # fmt: skip


def reference(model: Any, inputs: Any, max_new_tokens: int, runtime: Any) -> tuple[Any, list[list[int]]]:
    """PyTorch's first-step logits (B, V) and greedy tokens per image (up to and with the end token), for
    the pixels the onnxruntime backend prepared (`inputs`)."""
    import torch

    pixels = torch.from_numpy(inputs)
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        start = torch.full((len(pixels), 1), model.config.decoder_start_token_id or 0)
        logits = model(pixel_values=pixels, decoder_input_ids=start).logits[:, -1].numpy()
        out = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return logits, [row[: row.index(eos) + 1] if eos in row else row for row in out[:, 1:].tolist()]
