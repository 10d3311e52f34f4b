"""`loracap export-onnx MODEL OUT`: a captioner as ONNX graphs that onnxruntime (Python, or onnxruntime-web
in a browser) runs without PyTorch, in the file layout transformers.js reads, proven against PyTorch
before anything is kept.

    OUT/onnx/...                        the graphs (vit_gpt2.py, florence2.py and prefix.py: each layout)
    OUT/onnx/*_quantized.onnx           --quantize int8: MatMul/Gemm weights int8, activations at run time
    OUT/onnx/*_fp16.onnx                --quantize fp16: half-precision weights, float32 inputs and outputs
    OUT/config.json, generation_config.json, preprocessor_config.json, tokenizer files, split.json

Exportable: ViT-GPT2-style captioners (VisionEncoderDecoderModel with GPT-2), Florence-2 (and its
PromptGen fine-tunes) and captioners trained with `loracap train`. After export, `check_parity` runs both
runtimes on probe images: the first step's logits must agree (largest difference under 1e-3) before any
token is compared, then onnxruntime's greedy token ids must equal PyTorch's, or the export fails with what
differed; a graph that cannot pass is never left in OUT. Each quantized variant's token agreement is
measured and reported (it is not exact by design).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import architecture
from .graphs import QUANTIZATIONS
from .parity import check_parity

log = logging.getLogger(__name__)

__all__ = ["ExportOnnxConfig", "check_parity", "export_onnx"]

_COPIED = ("split.json",)  # `loracap train`'s record of its splits: `loracap eval` on the export reads it


@dataclass
class ExportOnnxConfig:
    """Every setting of `loracap export-onnx`."""

    model: str | Path | None = None
    """A ViT-GPT2-style captioner or one trained with `loracap train`: hub id or folder."""
    out: str | Path | None = None
    quantize: str | None = None
    """int8 and/or fp16 (comma-separated): also write the *_quantized / *_fp16 graphs."""
    opset: int = 18
    check_images: int = 20
    """Probe images the parity check captions with both runtimes."""
    max_new_tokens: int = 20


def quantizations(value: str | None) -> list[str]:
    kinds = [k.strip() for k in (value or "").split(",") if k.strip()]
    unknown = [k for k in kinds if k not in QUANTIZATIONS]
    if unknown:
        raise ValueError(f"--quantize takes {', '.join(QUANTIZATIONS)} (comma-separated), not {unknown[0]!r}")
    return kinds


def export_onnx(config: ExportOnnxConfig) -> dict[str, Any]:
    """Export, check parity, quantize; returns {"files": {name: bytes}, "parity": {...}}."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from loracap.hub import resolve_model

    if config.model is None or config.out is None:
        raise ValueError("give the model and the output folder")
    kinds = quantizations(config.quantize)
    folder = resolve_model(str(config.model))
    arch = architecture(folder)
    out = Path(config.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "onnx").mkdir(parents=True)
    loaded = arch.load(folder)
    arch.export(loaded, partial / "onnx", opset=config.opset, quantizations=kinds)
    if hasattr(arch, "save_files"):  # what the architecture's runtime needs beyond the usual files
        arch.save_files(loaded, partial)
    else:
        AutoImageProcessor.from_pretrained(folder).save_pretrained(partial)
        AutoTokenizer.from_pretrained(folder).save_pretrained(partial)
    model = getattr(loaded, "model", loaded)  # a backend (Florence-2) holds its model
    model.config.save_pretrained(partial)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(partial)
    for name in _COPIED:
        if (folder / name).is_file():
            shutil.copy(folder / name, partial / name)
    probe = {"images": config.check_images, "max_new_tokens": config.max_new_tokens}
    parity = check_parity(folder, partial, **probe)
    for kind in kinds:
        parity[kind] = check_parity(folder, partial, quant=kind, exact=False, **probe)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    files = {p.name: p.stat().st_size for p in sorted((out / "onnx").glob("*.onnx"))}
    (out / "onnx" / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    return {"files": files, "parity": parity}


def exported_folder(model: str, *, quant: str | None = None) -> Path:
    """`--engine onnx`: the ONNX export of `model` (hub id or folder), made once into loracap's cache,
    parity-checked as `loracap export-onnx` does, and reused while the checkpoint is unchanged. A folder
    that already is an export is used as it is."""
    from loracap.backends.onnx_captioner import is_onnx_captioner
    from loracap.hub import folder_fingerprint, loracap_cache_dir, resolve_model

    folder = resolve_model(model)
    if is_onnx_captioner(folder):
        return folder
    architecture(folder)  # a model it cannot export is refused before anything is written
    variant = f"-{quant}" if quant else ""
    target = loracap_cache_dir() / "onnx" / f"{folder.name}-{folder_fingerprint(folder)}{variant}"
    if not (target / "onnx" / "parity.json").is_file():
        log.info("exporting %s to ONNX (once) -> %s", model, target)
        export_onnx(ExportOnnxConfig(model=folder, out=target, quantize=quant))
    return target
