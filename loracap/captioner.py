"""Caption PIL images in memory: the Python API for notebooks, servers and other pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

from .backends import DEFAULT_MODEL, Backend, GenerationSettings, caption_images, load_backend
from .inputs import to_rgb
from .postprocess import PostProcess, postprocess
from .request import StyleChoice, resolve_request
from .styles import Style

if TYPE_CHECKING:
    from PIL import Image


class Captioner:
    """A loaded model plus caption settings. Load once, call many times.

    >>> captioner = Captioner(style="tags", options=PostProcess(trigger="ohwx woman"))
    >>> captioner(Image.open("photo.jpg"))
    'ohwx woman, 1girl, solo, ...'

    The style options are those of `loracap caption` (see `caption_folder`); `{tags}` and `{folder}`
    render empty here, as in-memory images have neither.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        style: str | Path | Style = "caption",
        *,
        mode: str | None = None,
        length: str | None = None,
        extras: Sequence[str] = (),
        name: str | None = None,
        prompt: str | None = None,
        options: PostProcess | None = None,
        generation: GenerationSettings | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: Backend | None = None,
    ):
        self.backend = backend or load_backend(model, device=device, dtype=dtype)
        self.options = options or PostProcess()
        self.generation = generation or GenerationSettings()
        choice = StyleChoice(mode or style, length, extras, name, prompt)
        self.request = resolve_request(choice, self.backend, trigger=self.options.trigger)
        self.batch_size = batch_size or self.backend.default_batch_size

    @overload
    def __call__(self, images: Image.Image) -> str: ...
    @overload
    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...

    def __call__(self, images):
        single = not isinstance(images, (list, tuple))
        batch = [to_rgb(im) for im in ([images] if single else images)]
        request = self.request
        captions = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            raw = caption_images(self.backend, chunk, request.mode, self.generation, request.prompt_for())
            captions.extend(postprocess(text, self.options, tags=request.tags) for text in raw)
        return captions[0] if single else captions
