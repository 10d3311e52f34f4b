"""`loracap export-onnx MODEL OUT`: a ViT-GPT2-style captioner (transformers' VisionEncoderDecoderModel) as
ONNX graphs that onnxruntime runs without PyTorch, proven against PyTorch before anything is kept.

    OUT/onnx/encoder_model.onnx             pixel_values -> last_hidden_state
    OUT/onnx/decoder_model.onnx             input_ids, encoder_hidden_states -> logits, present.*
    OUT/onnx/decoder_with_past_model.onnx   input_ids (one token), encoder_hidden_states, past_key_values.*
                                            -> logits, present.* (the self-attention cache grown by one)
    OUT/onnx/*_quantized.onnx               int8 dynamic quantization of MatMul/Gemm (--quantize int8)
    OUT/config.json, generation_config.json, preprocessor_config.json, tokenizer files

The cache tensors are named as optimum and transformers.js name them: `past_key_values.{i}.decoder.key`
/ `.value` (self-attention) and `past_key_values.{i}.encoder.key` / `.value` (cross-attention, computed
once at the first step), and `present.{i}...` likewise. The graphs are traced by torch.onnx's exporter
(torch.export) with dynamic batch, sequence and cache lengths.

After export, `check_parity` runs both: the first step's logits must agree (max difference under 1e-3)
before any token is compared, then greedy token ids for the probe images must be equal, or the export
fails with what differed; a graph that cannot pass is never left in OUT.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ExportOnnxConfig", "GRAPHS", "export_onnx"]

GRAPHS = ("encoder_model", "decoder_model", "decoder_with_past_model")
QUANTIZATIONS = ("int8",)


@dataclass
class ExportOnnxConfig:
    """Every setting of `loracap export-onnx`."""

    model: str | Path | None = None
    """A ViT-GPT2-style captioner: hub id or folder (a `loracap train` captioner is not exportable yet)."""
    out: str | Path | None = None
    quantize: str | None = None
    """int8: also write *_quantized.onnx (MatMul/Gemm weights int8, dynamic activations)."""
    opset: int = 18
    check_images: int = 4
    """Probe images the parity check captions with both runtimes."""
    max_new_tokens: int = 20


def export_onnx(config: ExportOnnxConfig) -> dict[str, Any]:
    """Export, check parity, quantize; returns {"files": {name: bytes}, "parity": {...}}."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from loracap.hub import resolve_model

    if config.model is None or config.out is None:
        raise ValueError("give the model and the output folder")
    if config.quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"--quantize must be {', '.join(QUANTIZATIONS)}, not {config.quantize!r}")
    folder = resolve_model(str(config.model))
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "vision-encoder-decoder":
        raise ValueError(
            f"{config.model} is a {model_type!r} model; export-onnx takes ViT-GPT2-style captioners "
            "(vision-encoder-decoder) for now"
        )
    out = Path(config.out)
    onnx_dir = out / "onnx"
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "onnx").mkdir(parents=True)
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    if getattr(model.decoder.config, "model_type", "") != "gpt2":
        raise ValueError(
            f"{config.model}'s decoder is a {model.decoder.config.model_type}; export takes GPT-2"
        )
    with torch.no_grad():
        _export_graphs(model, partial / "onnx", config.opset)
    AutoImageProcessor.from_pretrained(folder).save_pretrained(partial)
    AutoTokenizer.from_pretrained(folder).save_pretrained(partial)
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    parity = check_parity(folder, partial, images=config.check_images, max_new_tokens=config.max_new_tokens)
    if config.quantize == "int8":
        _quantize(partial / "onnx")
        parity["int8"] = check_parity(
            folder, partial, images=config.check_images, max_new_tokens=config.max_new_tokens, quantized=True,
            exact=False,
        )  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    files = {p.name: p.stat().st_size for p in sorted(onnx_dir.glob("*.onnx"))}
    return {"files": files, "parity": parity}


class _Encoder:
    def __new__(cls, model: Any) -> Any:
        import torch

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = model.encoder

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.encoder(pixel_values=pixel_values).last_hidden_state

        return Encoder()


def _decoder(model: Any, with_past: bool) -> Any:
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
            cache = None
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


def _cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{side}.{kind}" for i in range(layers) for side in ("decoder", "encoder")
            for kind in ("key", "value")]  # fmt: skip


def _export_graphs(model: Any, out: Path, opset: int) -> None:
    import torch

    config = model.config
    layers, heads = model.decoder.config.n_layer, model.decoder.config.n_head
    head_dim = model.decoder.config.n_embd // heads
    side = config.encoder.image_size
    pixels = torch.randn(2, config.encoder.num_channels, side, side)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        _Encoder(model), (pixels,), str(out / "encoder_model.onnx"), input_names=["pixel_values"],
        output_names=["last_hidden_state"], dynamic_shapes={"pixel_values": {0: batch}}, dynamo=True,
        external_data=False, opset_version=opset,
    )  # fmt: skip
    states = model.encoder(pixel_values=pixels).last_hidden_state
    encoder_len = torch.export.Dim("encoder_sequence", min=1, max=65536)
    presents = _cache_names("present", layers)
    ids = torch.tensor([[config.decoder_start_token_id or 0, 5, 7]] * 2)
    sequence = torch.export.Dim("sequence", min=1, max=4096)
    torch.onnx.export(
        _decoder(model, False), (ids, states), str(out / "decoder_model.onnx"),
        input_names=["input_ids", "encoder_hidden_states"], output_names=["logits", *presents],
        dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: encoder_len}),
        dynamo=True, external_data=False, opset_version=opset,
    )  # fmt: skip
    own, cross = (2, heads, 3, head_dim), (2, heads, states.shape[1], head_dim)
    past = [torch.randn(shape) for _ in range(layers) for shape in (own, own, cross, cross)]
    past_sequence = torch.export.Dim("past_sequence", min=1, max=4096)
    past_shapes = []
    for _ in range(layers):
        past_shapes += [{0: batch, 2: past_sequence}, {0: batch, 2: past_sequence},
                        {0: batch, 2: encoder_len}, {0: batch, 2: encoder_len}]  # fmt: skip
    torch.onnx.export(
        _decoder(model, True), (ids[:, :1], states, *past), str(out / "decoder_with_past_model.onnx"),
        input_names=["input_ids", "encoder_hidden_states", *_cache_names("past_key_values", layers)],
        output_names=["logits", *presents],
        dynamic_shapes=({0: batch}, {0: batch, 1: encoder_len}, tuple(past_shapes)),
        dynamo=True, external_data=False, opset_version=opset,
    )  # fmt: skip


def _quantize(folder: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in GRAPHS:
        quantize_dynamic(
            str(folder / f"{name}.onnx"), str(folder / f"{name}_quantized.onnx"),
            op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
        )  # fmt: skip


def check_parity(
    torch_folder: Path,
    onnx_folder: Path,
    *,
    images: int = 4,
    max_new_tokens: int = 20,
    quantized: bool = False,
    exact: bool = True,
) -> dict[str, Any]:
    """PyTorch and onnxruntime on the same probe images: the first step's largest logit difference, then
    the share of equal greedy tokens. With `exact`, any difference raises ValueError."""
    import numpy as np
    import torch

    from loracap.backends import load_backend
    from loracap.backends.base import GenerationSettings

    reference = load_backend(str(torch_folder), device="cpu", dtype="fp32")
    runtime = load_backend(str(onnx_folder), quant="int8" if quantized else None)
    pictures = _probe_images(images)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    pixels = reference.prepare(pictures, "caption")
    with torch.no_grad():
        start = torch.full((len(pictures), 1), reference.model.config.decoder_start_token_id or 0)
        expected = reference.model(pixel_values=pixels, decoder_input_ids=start).logits[:, -1].numpy()
    got = runtime.first_logits(runtime.prepare(pictures, "caption"))
    difference = float(np.abs(expected - got).max())
    if exact and difference > 1e-3:
        raise ValueError(f"the exported graphs' first-step logits differ from PyTorch's by {difference:.3g}")
    want = _torch_token_ids(reference, pixels, settings)
    have = runtime.token_ids(runtime.prepare(pictures, "caption"), settings)
    same = sum(a == b for x, y in zip(want, have, strict=True) for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in zip(want, have, strict=True))
    if exact and want != have:
        raise ValueError(f"greedy tokens differ from PyTorch's: {want} vs {have}")
    return {"first_step_max_logit_difference": difference, "token_agreement": same / max(total, 1)}


def _torch_token_ids(backend: Any, pixels: Any, settings: Any) -> list[list[int]]:
    """loracap's PyTorch backend's greedy tokens per image, up to and with the end token."""
    import torch

    from loracap.backends.base import fit_decoder

    kwargs = fit_decoder(settings.generate_kwargs(32), backend.model, 1, backend.name)
    with torch.inference_mode():
        out = backend.model.generate(pixel_values=pixels, **kwargs)[:, 1:].tolist()
    eos = backend.model.generation_config.eos_token_id
    rows = []
    for row in out:
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def _probe_images(count: int) -> list[Any]:
    """Seeded, photo-like images of a few sizes (smooth noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(320, 240), (240, 320), (256, 256), (400, 225)]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    return images
