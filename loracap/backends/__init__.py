"""Model backends: find a checkpoint, pick its backend by architecture, load it once."""

from __future__ import annotations

import json

from .base import Backend, BackendError, GenerationSettings, caption_images
from .hub import ModelUnavailable, resolve_model
from .registry import DEFAULT_MODEL, KNOWN_MODELS, KnownModel

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "Backend",
    "BackendError",
    "GenerationSettings",
    "KnownModel",
    "ModelUnavailable",
    "caption_images",
    "load_backend",
    "resolve_model",
]

# config.json model_type -> backend. Chat VLMs come in a later issue.
_FAMILIES = {
    "florence2": ("florence2", "Florence2Backend"),
    "blip": ("blip", "BlipBackend"),
    "vision-encoder-decoder": ("vit_gpt2", "VisionEncoderDecoderBackend"),
}


def supports(model_id: str) -> bool:
    """Whether a model in the registry has a backend here (its family maps to one)."""
    family = next((m.family for m in KNOWN_MODELS if m.id == model_id), None)
    return family in _FAMILIES


def load_backend(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    offline: bool | None = None,
) -> Backend:
    """Load `model` (hub id, local folder or cached id) onto the best device, or as told.

    `quant` ("4bit" / "8bit") loads through bitsandbytes on CUDA and is refused elsewhere.
    """
    import importlib

    from .device import choose_placement

    folder = resolve_model(model, offline=offline)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in _FAMILIES:
        raise BackendError(
            f"{model} is a {model_type!r} model, which loracap cannot caption with yet "
            f"(supported: {', '.join(_FAMILIES)}; see `loracap models`)"
        )
    module_name, class_name = _FAMILIES[model_type]
    backend_class = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    return backend_class(folder, model, choose_placement(device, dtype), quant=quant)
