"""Models loracap knows by name, what they can do, and what they need. Data, not code."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "MiaoshouAI/Florence-2-large-PromptGen-v1.5"

_PROMPTGEN_MODES = ("tags", "caption", "detailed", "more_detailed", "mixed")
_FLORENCE_MODES = ("caption", "detailed", "more_detailed")


@dataclass(frozen=True)
class KnownModel:
    id: str
    family: str
    modes: tuple[str, ...]
    params_m: int
    """Parameters in millions; memory is about 2 bytes each in fp16/bf16, 4 in fp32, plus activations."""
    note: str = ""

    def memory_gb(self, bytes_per_param: int) -> float:
        return self.params_m * 1e6 * bytes_per_param / 2**30


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(DEFAULT_MODEL, "florence2", _PROMPTGEN_MODES, 770, "default: tags and captions for SD/Flux"),
    KnownModel(
        "MiaoshouAI/Florence-2-large-PromptGen-v2.0",
        "florence2",
        (*_PROMPTGEN_MODES, "mixed_plus", "analyze"),
        770,
    ),
    KnownModel(
        "MiaoshouAI/Florence-2-base-PromptGen-v1.5", "florence2", _PROMPTGEN_MODES, 230, "small and fast"
    ),
    KnownModel(
        "MiaoshouAI/Florence-2-base-PromptGen-v2.0",
        "florence2",
        (*_PROMPTGEN_MODES, "mixed_plus", "analyze"),
        230,
    ),
    KnownModel("microsoft/Florence-2-large", "florence2", _FLORENCE_MODES, 770),
    KnownModel("microsoft/Florence-2-base", "florence2", _FLORENCE_MODES, 230),
    KnownModel("microsoft/Florence-2-large-ft", "florence2", _FLORENCE_MODES, 770),
    KnownModel("florence-community/Florence-2-large", "florence2", _FLORENCE_MODES, 770, "native layout"),
    KnownModel("florence-community/Florence-2-base", "florence2", _FLORENCE_MODES, 230, "native layout"),
    KnownModel("Salesforce/blip-image-captioning-large", "blip", ("caption",), 470, "--prompt 'a photo of'"),
    KnownModel("Salesforce/blip-image-captioning-base", "blip", ("caption",), 250),
    KnownModel(
        "nlpconnect/vit-gpt2-image-captioning", "vision-encoder-decoder", ("caption",), 240, "short captions"
    ),
)
