"""Model backends: find a checkpoint, pick its backend by architecture, load it once."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..hub import ModelUnavailable, is_tagger_folder, resolve_model
from .base import Backend, BackendError, GenerationSettings, caption_images
from .registry import DEFAULT_MODEL, KNOWN_MODELS, REMOTE_PREFIX, KnownModel

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
    "processor_side",
    "resolve_model",
]

# config.json model_type -> backend. Chat VLMs not named here still load through the generic chat
# backend when transformers maps their type to AutoModelForImageTextToText (LLaVA-NeXT, Gemma 3, ...).
_CHAT = ("chat_vlm", "ChatVLMBackend")
_FAMILIES = {
    "florence2": ("florence2", "Florence2Backend"),
    "blip": ("blip", "BlipBackend"),
    "vision-encoder-decoder": ("vit_gpt2", "VisionEncoderDecoderBackend"),
    "llava": _CHAT,
    "qwen2_vl": _CHAT,
    "qwen2_5_vl": _CHAT,
    "qwen3_vl": _CHAT,
    "idefics3": _CHAT,
    "smolvlm": _CHAT,
    "paligemma": _CHAT,
    "mllama": _CHAT,
    "gemma3": _CHAT,
    "internvl": _CHAT,
    "minicpmv4_6": _CHAT,
    "molmo2": _CHAT,
    "blip-2": _CHAT,
    "instructblip": _CHAT,
    "git": _CHAT,
    "loracap_prefix_captioner": ("prefix_captioner", "PrefixCaptionerBackend"),  # `loracap train` output
}


def _backend_for(model_type: str | None) -> tuple[str, str] | None:
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return _CHAT if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else None


def supports(model_id: str) -> bool:
    """Whether a model in the registry has a backend here (its family maps to one)."""
    known = next((m for m in KNOWN_MODELS if m.id == model_id), None)
    if known is not None and known.family == "wd-tagger":
        return True
    return known is not None and not known.unsupported and _backend_for(known.family) is not None


def load_backend(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    offline: bool | None = None,
    api_base: str | None = None,
    engine: str = "local",
    **remote: Any,
) -> Backend:
    """Load `model` (hub id, local folder or cached id) onto the best device, or as told.

    `quant` ("4bit" / "8bit") loads through bitsandbytes on CUDA and is refused elsewhere.
    `openai:MODEL` is a model on the OpenAI-compatible server at `api_base` (default: $OPENAI_BASE_URL);
    `remote` goes to `OpenAIRemoteBackend` (api_key_env, concurrency, timeout_s, max_retries, ...).
    `engine="vllm"`: a chat model in vLLM (`vllm_chat`; CUDA only, refused elsewhere with one line).
    """
    import importlib

    if model.startswith(REMOTE_PREFIX):
        from .openai_remote import OpenAIRemoteBackend

        remote_model = model[len(REMOTE_PREFIX) :]
        # Read here, not only by the CLI, so Python callers get what the error below tells them to set.
        api_base = api_base or os.environ.get("OPENAI_BASE_URL")
        if not remote_model or not api_base:
            raise BackendError(
                f"{model!r}: a remote model needs a name and a server: --model openai:MODEL "
                "--api-base http://host:8000/v1 (or set OPENAI_BASE_URL)"
            )
        return OpenAIRemoteBackend(remote_model, api_base, **remote)
    if api_base or remote:
        raise ValueError(f"--api-base and the remote options only apply to --model {REMOTE_PREFIX}MODEL")
    if engine == "vllm":
        from .vllm_chat import VLLMChatBackend, check_vllm

        folder = resolve_model(model, offline=offline)
        check_vllm(json.loads((folder / "config.json").read_text()).get("model_type"), model)
        if quant or (device not in (None, "auto") and not str(device).startswith("cuda")):
            raise ValueError(
                "--engine vllm runs on one CUDA GPU in the model's own precision: drop --quant/--device"
            )
        return VLLMChatBackend(folder, model)
    from .device import choose_placement

    folder = resolve_model(model, offline=offline)
    from .onnx_captioner import is_onnx_captioner

    if is_onnx_captioner(folder):
        from .onnx_captioner import load_onnx_captioner

        return load_onnx_captioner(folder, model, quant=quant, device=device)
    if is_tagger_folder(folder):
        from .wd_tagger import WDTaggerBackend

        if quant:
            raise ValueError("--quant does not apply to a tagger (an ONNX graph on onnxruntime)")
        return WDTaggerBackend(folder, model, device=device)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    family = _backend_for(model_type)
    if family is None:
        raise BackendError(
            f"{model} is a {model_type!r} model, which loracap cannot caption with yet "
            f"(supported: {', '.join(_FAMILIES)}; see `loracap models`)"
        )
    module_name, class_name = family
    backend_class = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    return backend_class(folder, model, choose_placement(device, dtype), quant=quant)


def processor_side(model: str | None, *, offline: bool | None = None) -> int:
    """The side `model`'s backend decodes images at (`Backend.image_side`), from its processor files alone,
    without loading weights: for an engine that decodes on other workers than the model's (Ray). Read from
    the processor's JSON where it says (no transformers import: seconds on an engine's critical path),
    else through transformers; 0 when the processor names no size."""
    folder = resolve_model(model or DEFAULT_MODEL, offline=offline)
    settings = _image_processor_settings(folder)
    if settings is not None:
        return _side_from_settings(settings)
    import importlib

    from transformers import AutoImageProcessor

    from .device import image_side

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    family = _backend_for(model_type)
    if family == _CHAT:
        chat = importlib.import_module(".chat_vlm", __name__)
        return chat.chat_input_side(chat.load_processor(folder, model_type).image_processor)
    return image_side(AutoImageProcessor.from_pretrained(folder))


def _image_processor_settings(folder: Any) -> dict[str, Any] | None:
    """The image processor's saved settings: preprocessor_config.json, or processor_config.json's
    "image_processor" part (how newer processors save it); None when neither names a size."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("image_processor", data)
            if isinstance(data, dict) and ("size" in data or "crop_size" in data):
                return data
    return None


def _side_from_settings(settings: dict[str, Any]) -> int:
    """`device.image_side` (and `chat_vlm.chat_input_side` for Qwen) on the saved settings."""
    if "merge_size" in settings:  # Qwen-VL: native resolution, bounds in pixels (area), capped
        from .chat_vlm import QWEN_MAX_PIXELS

        size = settings.get("size") or {}
        longest = size.get("longest_edge") or settings.get("max_pixels") or QWEN_MAX_PIXELS
        return math.isqrt(min(longest, QWEN_MAX_PIXELS))
    from .sizes import image_side

    return image_side(settings)
