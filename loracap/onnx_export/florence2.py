"""Florence-2 (and its PromptGen fine-tunes) as ONNX, in the four-graph layout transformers.js runs
Florence-2 with:

    onnx/vision_encoder.onnx         pixel_values -> image_features (DaViT and the projector)
    onnx/embed_tokens.onnx           input_ids -> inputs_embeds (BART's shared, scaled embeddings)
    onnx/encoder_model.onnx          inputs_embeds, attention_mask -> last_hidden_state
    onnx/decoder_model_merged.onnx   inputs_embeds, encoder_hidden_states, encoder_attention_mask,
                                     past_key_values.{i}.decoder|encoder.key|value, use_cache_branch
                                     -> logits, present.*
    onnx/florence2.json              the checkpoint's tasks, the ids kept out of captions, the decoder's
                                     start ids and the image token: what loracap's PyTorch backend decides

The encoder reads the prompt's embeddings with the image's features in place of its `<image>` tokens, as
`Florence2Model.forward` puts them. The merged decoder is two traced graphs behind an `If`, as for
ViT-GPT2 (`vit_gpt2.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .graphs import QUANTIZATIONS, as_module, dim, export_graph, merge_decoders, quantize

GRAPHS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
SETTINGS_FILE = "florence2.json"


def load(folder: Path) -> Any:
    """loracap's PyTorch Florence-2 backend (the model, and its tasks and decoding rules), on the CPU."""
    from loracap.backends.device import choose_placement
    from loracap.backends.florence2 import Florence2Backend

    return Florence2Backend(folder, folder.name, choose_placement("cpu", "fp32"))


def save_files(backend: Any, out: Path) -> None:
    """The processor (its image-token count and task prompts) and the backend's decoding rules."""
    backend.processor.save_pretrained(out)
    settings = {
        "tasks": backend.tasks,
        "modes": backend.mode_tokens,
        "suppress_ids": backend.non_caption_ids,
        "decoder_prefix": backend.decoder_prefix,
        "image_token_id": backend.model.config.image_token_id,
    }
    (out / "onnx" / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")


def export(backend: Any, out: Path, *, opset: int, quantizations: list[str]) -> None:
    import torch

    model = backend.model.eval()
    side = backend.processor.image_processor.size["height"]
    pixels = torch.randn(2, 3, side, side)
    batch, sequence = dim("batch"), dim("sequence")
    export_graph(
        as_module(model, lambda m, p: m.model.get_image_features(p).pooler_output), (pixels,),
        out / "vision_encoder.onnx", inputs=["pixel_values"], outputs=["image_features"],
        dynamic_shapes=({0: batch},), opset=opset,
    )  # fmt: skip
    ids = torch.tensor([[0, 5, 7, 2]] * 2)
    export_graph(
        as_module(model, lambda m, i: m.get_input_embeddings()(i)), (ids,), out / "embed_tokens.onnx",
        inputs=["input_ids"], outputs=["inputs_embeds"], dynamic_shapes=({0: batch, 1: sequence},),
        opset=opset,
    )  # fmt: skip
    language = model.model.language_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([[0] + [5] * 9 + [2]] * 2))
        mask = torch.ones(embeds.shape[:2], dtype=torch.int64)
        states = language.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    encoder = as_module(
        model, lambda m, e, a: m.model.language_model.encoder(inputs_embeds=e, attention_mask=a)[0]
    )
    export_graph(
        encoder, (embeds, mask), out / "encoder_model.onnx", inputs=["inputs_embeds", "attention_mask"],
        outputs=["last_hidden_state"], dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
        opset=opset,
    )  # fmt: skip
    first, later = out / "decoder_model.onnx", out / "decoder_with_past_model.onnx"
    _export_decoders(model, states, mask, first, later, opset)
    merge_decoders(first, later, out / "decoder_model_merged.onnx")
    for kind in quantizations:
        suffix = QUANTIZATIONS[kind]
        for name in GRAPHS[:3]:
            quantize(out / f"{name}.onnx", out / f"{name}{suffix}.onnx", kind)
        parts = [first.with_name(f"first{suffix}.onnx"), later.with_name(f"later{suffix}.onnx")]
        quantize(first, parts[0], kind)
        quantize(later, parts[1], kind)
        merge_decoders(*parts, out / f"decoder_model_merged{suffix}.onnx")
        for part in parts:
            part.unlink()
    first.unlink()
    later.unlink()


def _export_decoders(model: Any, states: Any, mask: Any, first: Path, later: Path, opset: int) -> None:
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from .vit_gpt2 import cache_names, example_caches

    text = model.config.text_config
    layers, heads = text.decoder_layers, text.decoder_attention_heads
    head_dim = text.d_model // heads
    decoder = model.model.language_model.decoder

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, inputs_embeds: Any, encoder_hidden_states: Any, encoder_attention_mask: Any, *past: Any
        ):
            own = [(past[4 * i], past[4 * i + 1]) for i in range(layers)] if past else []
            cross = [(past[4 * i + 2], past[4 * i + 3]) for i in range(layers)] if past else []
            cache = EncoderDecoderCache(DynamicCache(own or None), DynamicCache(cross or None))
            output = decoder(
                inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=True,
            )  # fmt: skip
            flat = []
            for i in range(layers):
                own_layer = output.cache.self_attention_cache.layers[i]
                cross_layer = output.cache.cross_attention_cache.layers[i]
                flat += [own_layer.keys, own_layer.values, cross_layer.keys, cross_layer.values]
            return (self.model.lm_head(output.last_hidden_state), *flat)

    batch, encoder_len = dim("batch"), dim("encoder_sequence")
    presents = cache_names("present", layers)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([[2, 0, 5]] * 2))
    common = {
        "encoder_hidden_states": {0: batch, 1: encoder_len},
        "encoder_attention_mask": {0: batch, 1: encoder_len},
    }
    # Both graphs take any number of new tokens (the merged graph's inputs are the later graph's): the
    # first step reads the decoder's two-token prefix.
    export_graph(
        Decoder(), (embeds, states, mask), first,
        inputs=["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask"],
        outputs=["logits", *presents],
        dynamic_shapes=({0: batch, 1: dim("sequence")}, *common.values()), opset=opset,
    )  # fmt: skip
    past, past_shapes = example_caches(layers, heads, head_dim, states.shape[1], batch, encoder_len)
    export_graph(
        Decoder(), (embeds[:, :2], states, mask, *past), later,
        inputs=["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask",
                *cache_names("past_key_values", layers)],
        outputs=["logits", *presents],
        dynamic_shapes=({0: batch, 1: dim("sequence")}, *common.values(), past_shapes), opset=opset,
    )  # fmt: skip


def reference(backend: Any, inputs: dict, max_new_tokens: int, runtime: Any) -> tuple[Any, list[list[int]]]:
    """PyTorch's first-step logits (B, V) and greedy caption tokens per image (up to and with the end
    token), decoded as loracap's PyTorch backend decodes a caption mode."""
    import torch

    model = backend.model
    input_ids = torch.from_numpy(inputs["input_ids"])
    pixels = torch.from_numpy(inputs["pixel_values"])
    prefix = backend.prefix_ids.expand(len(input_ids), -1)
    with torch.inference_mode():
        logits = (
            model(input_ids=input_ids, pixel_values=pixels, decoder_input_ids=prefix).logits[:, -1].numpy()
        )
        out = model.generate(
            input_ids=input_ids, pixel_values=pixels, decoder_input_ids=prefix,
            logits_processor=[backend.suppress], forced_bos_token_id=None, max_new_tokens=max_new_tokens,
            num_beams=1, do_sample=False,
        )  # fmt: skip
    eos = model.generation_config.eos_token_id
    rows = out[:, prefix.shape[1] :].tolist()
    return logits, [row[: row.index(eos) + 1] if eos in row else row for row in rows]
