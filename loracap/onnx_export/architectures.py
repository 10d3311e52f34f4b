"""Which module exports a checkpoint: vit_gpt2 (VisionEncoderDecoderModel) or prefix (`loracap train`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def architecture(folder: Path) -> Any:
    """The module that exports the captioner in `folder` (vit_gpt2, florence2 or prefix); ValueError for
    others."""
    from . import florence2, prefix, vit_gpt2

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == "vision-encoder-decoder":
        return vit_gpt2
    if model_type == "loracap_prefix_captioner":
        return prefix
    if model_type == "florence2":
        return florence2
    raise ValueError(
        f"{folder.name} is a {model_type!r} model; export-onnx takes ViT-GPT2-style captioners "
        "(vision-encoder-decoder), Florence-2 and captioners trained with `loracap train`"
    )
