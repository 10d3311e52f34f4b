"""Caption PIL images in memory: the Python API for notebooks, servers and other pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, overload

from .backends import DEFAULT_MODEL, Backend, GenerationSettings, caption_images, load_backend
from .inputs import to_rgb
from .postprocess import PostProcess, postprocess

if TYPE_CHECKING:
    from PIL import Image


class Captioner:
    """A loaded model plus caption settings. Load once, call many times.

    >>> captioner = Captioner(mode="tags", options=PostProcess(trigger="ohwx woman"))
    >>> captioner(Image.open("photo.jpg"))
    'ohwx woman, 1girl, solo, ...'
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        mode: str = "caption",
        *,
        options: PostProcess | None = None,
        generation: GenerationSettings | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: Backend | None = None,
    ):
        self.backend = backend or load_backend(model, device=device, dtype=dtype)
        self.mode = mode
        self.options = options or PostProcess()
        self.generation = generation or GenerationSettings()
        self.prompt = prompt
        self.batch_size = batch_size or self.backend.default_batch_size

    @overload
    def __call__(self, images: Image.Image) -> str: ...
    @overload
    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...

    def __call__(self, images):
        single = not isinstance(images, (list, tuple))
        batch = [to_rgb(im) for im in ([images] if single else images)]
        tags = self.mode in self.backend.tag_modes
        captions = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            raw = caption_images(self.backend, chunk, self.mode, self.generation, self.prompt)
            captions.extend(postprocess(text, self.options, tags=tags) for text in raw)
        return captions[0] if single else captions
