"""Caption PIL images in memory: the Python API for notebooks, servers and other pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from .backends import DEFAULT_MODEL, Backend, caption_images, load_backend
from .backends.base import check_mode, per_image
from .backends.batch_size import parse_batch_size
from .inputs import to_rgb
from .pipeline import CaptionConfig, caption_config, clean_captions
from .postprocess import postprocess
from .request import resolve_request
from .styles import Style

if TYPE_CHECKING:
    from PIL import Image


class Captioner:
    """A loaded model plus caption settings. Load once, call many times.

    >>> captioner = Captioner(style="tags", options=PostProcess(trigger="ohwx woman"))
    >>> captioner(Image.open("photo.jpg"))
    'ohwx woman, 1girl, solo, ...'

    Takes a `CaptionConfig` (its folder and output settings are not used here), or the model with the
    keyword settings `caption_folder` takes (`style`, `trigger`, `max_new_tokens`, `options=PostProcess`,
    `generation=GenerationSettings`, `batch_size`, `device`, ...). `backend`: an already loaded model.
    `{tags}` and `{folder}` render empty here, as in-memory images have neither. With `captions_per_image`
    N above 1 an image's caption is N captions, a line each.
    """

    def __init__(
        self,
        config: CaptionConfig | str = DEFAULT_MODEL,
        style: str | Path | Style | None = None,
        *,
        backend: Backend | None = None,
        **settings: Any,
    ):
        if not isinstance(config, CaptionConfig):
            settings["model"], config = config, CaptionConfig()
        config = caption_config(config, style=style, **settings)
        if backend is None:
            model = config.model or DEFAULT_MODEL
            backend = load_backend(model, device=config.device, dtype=config.dtype, quant=config.quant)
        self.backend = backend
        self.config = config
        self.options = config.postprocess
        self.generation = config.generation
        self.request = resolve_request(config.style_choice, self.backend, trigger=self.options.trigger)
        # In memory there is no run to measure: "auto" is the model's default here.
        self.batch_size = parse_batch_size(config.batch_size) or self.backend.default_batch_size

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
            if self.generation.captions_per_image > 1:  # each caption cleaned up alone, a line each
                check_mode(self.backend, request.mode)
                inputs = self.backend.prepare(chunk, request.mode, request.prompt_for())
                raws = per_image(self.backend.generate(inputs, self.generation), len(chunk))
                captions.extend(clean_captions(r, self.options, tags=request.tags) or "" for r in raws)
                continue
            raw = caption_images(self.backend, chunk, request.mode, self.generation, request.prompt_for())
            captions.extend(postprocess(text, self.options, tags=request.tags) for text in raw)
        return captions[0] if single else captions
