"""WD14 / WD v3 booru taggers (SmilingWolf's wd-v1-4-* and wd-*-tagger-v3, and any folder with a `model.onnx`
and a `selected_tags.csv`) on onnxruntime: the taggers sd-scripts, taggui and the A1111 extensions run.

Preprocessing is theirs (sd-scripts' tag_images_by_wd14_tagger.py): the RGB image as BGR, padded to a
square with white, resized to the graph's input side (area filter when shrinking, Lanczos when enlarging),
float32 0-255, NHWC. The graph gives one probability per row of selected_tags.csv, whose `category` says
what a tag is: 9 rating, 0 general, 4 character. A general tag is kept at `general_threshold` (0.35) or
more, a character tag at `character_threshold` (0.85), most likely first; `character_tags_first` puts the
characters first, `rating_tags` the most likely rating before everything. Tags keep their underscores
(the csv's spelling); `--underscores-to-spaces`, `--remove-tags` and the rest of loracap's tag clean-up
run after, as for any tag model (`--remove-underscore` and `--undesired-tags`, sd-scripts' names, are the
same flags; kaomoji such as `^_^` keep their underscores there too).

`load_tagger` is `--tagger`: a tagger run before a chat model, whose tags fill the chat prompt's {tags}.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..hub import ModelUnavailable, is_tagger_folder, resolve_model
from .base import BackendError, GenerationSettings, check_mode
from .onnxrt import onnx_session
from .registry import KNOWN_MODELS

RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_BATCH = 8


class WDTaggerBackend:
    modes = ("tags",)
    tag_modes: frozenset[str] = frozenset({"tags"})
    instructions = False

    def __init__(self, folder: Path, name: str, *, device: str | None = None) -> None:
        self.name = name
        self.tags, self.categories = _read_tags(Path(folder) / "selected_tags.csv")
        self.session = onnx_session(Path(folder) / "model.onnx", device, what="a tagger", extra="tagger")
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.image_side = int(graph_input.shape[1])
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise BackendError(
                f"{name}: the model gives {outputs} scores but selected_tags.csv lists {len(self.tags)}"
            )
        self.default_batch_size = DEFAULT_BATCH

    def prepare(self, images: list[Image.Image], mode: str, prompt: str | None = None) -> np.ndarray:
        check_mode(self, mode)
        if prompt:
            raise BackendError(f"{self.name} is a tagger: it takes no prompt")
        return np.stack([_preprocess(image, self.image_side) for image in images])

    def generate(self, inputs: np.ndarray, settings: GenerationSettings) -> list[str]:
        if settings.captions_per_image > 1:  # its tags are one set of probabilities: nothing to vary
            raise BackendError(f"{self.name} is a tagger: it writes one tag list per image, not several")
        probabilities = self.session.run(None, {self.input_name: inputs})[0]
        return [self.tag_line(row, settings) for row in probabilities]

    def tag_line(self, probabilities: np.ndarray, settings: GenerationSettings) -> str:
        """One image's tags, comma-separated, from its probabilities."""
        order = np.argsort(-probabilities, kind="stable")
        general, character, ratings = [], [], []
        for i in order:
            p, kind = float(probabilities[i]), self.categories[i]
            if kind == RATING:
                ratings.append(self.tags[i])
            elif kind == CHARACTER and p >= settings.character_threshold:
                character.append(self.tags[i])
            elif kind != CHARACTER and kind != RATING and p >= settings.general_threshold:
                general.append(self.tags[i])
        tags = character + general if settings.character_tags_first else general + character
        if settings.rating_tags and ratings:
            tags.insert(0, ratings[0])  # the most likely rating
        return ", ".join(tags)


def tagger_id(name: str) -> str:
    """`--tagger`'s model: a short name of a known tagger ("wd-vit-tagger-v3") as its hub id
    ("SmilingWolf/wd-vit-tagger-v3"); a folder, a full id or an unknown name as given."""
    if "/" in name or Path(name).expanduser().exists():
        return name
    known = [
        m.id for m in KNOWN_MODELS if m.family == "wd-tagger" and m.id.split("/")[1].lower() == name.lower()
    ]
    return known[0] if known else name


def load_tagger(name: str, *, device: str | None = None) -> WDTaggerBackend:
    """The tagger `--tagger NAME` names (see `tagger_id`). ModelUnavailable when it is not a WD tagger:
    a chat model or Florence-2 there would be loaded only to be refused."""
    model = tagger_id(name)
    folder = resolve_model(model)
    if not is_tagger_folder(folder):
        raise ModelUnavailable(
            f"--tagger {name}: {folder} is not a WD tagger (a folder with model.onnx and selected_tags.csv, "
            f"e.g. SmilingWolf/wd-vit-tagger-v3)"
        )
    return WDTaggerBackend(folder, model, device=device)


def _read_tags(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0]:
        raise BackendError(f"{path} is not a tagger's tag list (columns tag_id,name,category,count)")
    return [r["name"] for r in rows], [int(r.get("category") or 0) for r in rows]


def _preprocess(image: Image.Image, side: int) -> np.ndarray:
    """sd-scripts' tagger input: BGR, padded square with white, resized to `side`, float32 0-255."""
    width, height = image.size
    size = max(width, height)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((size - width) // 2, (size - height) // 2))
    resample = Image.Resampling.BOX if size > side else Image.Resampling.LANCZOS
    canvas = canvas.resize((side, side), resample)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()
