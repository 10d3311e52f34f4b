"""The backend protocol: load a model once, caption batches of decoded images.

A backend is split in two on purpose. `prepare` turns PIL images into model inputs on the CPU and
is safe to call from worker threads, so decoding and preprocessing run ahead of the model.
`generate` runs the model on the accelerator. `caption_images` glues them for callers that have
images in memory (the Python API, a server, a Ray Data actor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image


class BackendError(Exception):
    """A model cannot do what was asked (unknown mode, unsupported checkpoint)."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by all backends. None means the mode's default."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None

    def generate_kwargs(self, default_max_new_tokens: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens or default_max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": False,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


class Backend(Protocol):
    """What the pipeline needs from a captioning model."""

    name: str
    """Model id or path, for messages and the summary."""
    modes: tuple[str, ...]
    """Caption modes this checkpoint can do, e.g. ("tags", "caption", "detailed")."""
    tag_modes: frozenset[str]
    """The modes whose output is a comma-separated tag list."""
    default_batch_size: int
    image_side: int
    """The side the processor resizes to; images are decoded no larger than needed for it."""
    instructions: bool
    """True for chat models that caption from a free-text instruction (any style)."""

    def prepare(self, images: list[Image.Image], mode: str, prompt: str | list[str] | None = None) -> Any:
        """CPU-side preprocessing of one batch. Thread-safe. Instruction-following backends
        (`instructions = True`) take one prompt for the batch or one per image."""

    def generate(self, inputs: Any, settings: GenerationSettings) -> list[str]:
        """Run the model on prepared inputs; one raw caption per image."""


ANY_MODE = "*"  # in `Backend.modes`: an instruction-following model, any caption style


def accepts(backend: Backend, mode: str) -> bool:
    """Whether `backend` can caption in `mode`: one of its modes, or any for an instruction model."""
    return ANY_MODE in backend.modes or mode in backend.modes


def check_mode(backend: Backend, mode: str, *, name: str | None = None) -> None:
    """BackendError unless `backend` can caption in `mode`; `name` names the model (default: its own)."""
    if not accepts(backend, mode):
        raise BackendError(
            f"{name or backend.name} cannot caption in mode {mode!r}; it can do: {', '.join(backend.modes)}"
        )


def caption_images(
    backend: Backend,
    images: list[Image.Image],
    mode: str,
    settings: GenerationSettings | None = None,
    prompt: str | list[str] | None = None,
) -> list[str]:
    """Caption decoded RGB images with a loaded backend: a plain function of its inputs.

    `prompt`: one for every image, or (instruction-following backends) one per image."""
    if not images:
        return []
    check_mode(backend, mode)
    inputs = backend.prepare(images, mode, prompt)
    return backend.generate(inputs, settings or GenerationSettings())
