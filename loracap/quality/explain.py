"""`loracap explain IMAGE`: where an encoder-decoder captioner looked for each word it wrote.

    loracap explain photo.jpg --model Salesforce/blip-image-captioning-large   # -> photo.explain.png
    explainer = Explainer("nlpconnect/vit-gpt2-image-captioning")
    image = load_image("photo.jpg")
    shown = explainer.explain(image, layers=(-1,))           # the caption, one heatmap per word
    draw_explanation(image, shown).save("photo.explain.png")

For every token it writes, the text decoder of BLIP, ViT-GPT2 and Florence-2 cross-attends to the image
encoder's output: one position per image patch (after a summary token: ViT's and BLIP's [CLS],
Florence-2's pooled token), and for Florence-2 the prompt's text tokens after them. A word's map is that
cross-attention, averaged over heads and the chosen decoder layers, over the patch positions only,
renormalised to sum to 1; a word of several subword tokens gets the mean of its tokens' maps. The maps come
from transformers' own attention outputs (`output_attentions=True`), which only the eager attention
implementation returns, so the model is switched to it after loading.

The processors of these models squash the whole image into a square (no crop), so cell (row, col) of a
rows x cols map covers the same fraction of the original image, whatever its aspect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loracap.backends import DEFAULT_MODEL, BackendError, GenerationSettings, load_backend, resolve_model
from loracap.config import settings_for

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "EXPLAINABLE",
    "ExplainConfig",
    "Explainer",
    "Explanation",
    "WordMap",
    "check_explain_model",
    "draw_explanation",
    "explain",
    "explain_files",
    "group_words",
    "overlay",
    "parse_layers",
    "word_heat",
]

log = logging.getLogger(__name__)

# config.json model_type of the captioners whose decoder cross-attends to image patches.
EXPLAINABLE = {"blip": "BLIP", "vision-encoder-decoder": "ViT-GPT2", "florence2": "Florence-2"}
TILE = 192  # default side of one heatmap tile, pixels
MAX_COLUMNS = 6


@dataclass
class ExplainConfig:
    """Every setting of `loracap explain` (see loracap.config)."""

    image: str | Path | None = None
    model: str = DEFAULT_MODEL
    """A BLIP, ViT-GPT2 or Florence-2 captioner: hub id, local folder or cached id."""
    out: str | Path | None = None
    """The PNG to write (default: IMAGE's name with .explain.png, in the current folder)."""
    layers: str | Sequence[int] | None = None
    """Decoder layers to average, "0,-1" or [0, -1] (negative: from the last); None: all of them."""
    mode: str = "caption"
    """The caption mode: caption (every model), or a Florence-2 mode such as detailed or tags."""
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    tile: int = TILE
    """Side of each word's heatmap in the PNG, pixels."""
    progress: bool = True
    """Model-loading progress bars (the CLI's --quiet turns them and loracap's info lines off)."""

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        if self.tile < 32:
            raise ValueError(f"--tile {self.tile}: a heatmap tile needs at least 32 px")


def parse_layers(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """`--layers`: "0,-1" (or a list of ints) -> (0, -1); None or "" or "all" -> None (every layer)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        layers = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"--layers {spec!r}: give layer numbers such as 0,-1 (negative: from the last)"
        ) from None
    return layers


def pick_layers(layers: tuple[int, ...] | None, count: int) -> list[int]:
    """The decoder layers `layers` names among `count`, as indices; ValueError for one it does not have."""
    if layers is None:
        return list(range(count))
    bad = [n for n in layers if not -count <= n < count]
    if bad:
        raise ValueError(
            f"--layers {','.join(map(str, layers))}: the decoder has {count} layer(s), 0 to {count - 1} "
            f"(or -1 for the last)"
        )
    return sorted({n % count for n in layers})


def check_explain_model(model: str, *, offline: bool | None = None) -> Path:
    """The local folder of `model` after checking from its config.json, without loading weights, that it is
    a captioner `explain` can read (BLIP, ViT-GPT2, Florence-2). Raises BackendError otherwise."""
    folder = resolve_model(model, offline=offline)
    config = folder / "config.json"
    model_type = None
    if config.is_file():  # a WD tagger or an ONNX export has none
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type not in EXPLAINABLE:
        raise BackendError(
            f"{model} is a {model_type or 'non-transformers'} model; explain reads the decoder's "
            f"cross-attention of the encoder-decoder captioners ({', '.join(EXPLAINABLE.values())})"
        )
    return folder


# --- what the model looked at ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WordMap:
    """One word of the caption and where the decoder looked while writing it."""

    word: str
    heat: np.ndarray
    """(rows, cols) over the image's patch grid; non-negative, sums to 1."""
    tokens: tuple[str, ...] = ()
    """The subword tokens the word was written as."""
    token_heat: tuple[np.ndarray, ...] = ()
    """Each token's own map (rows, cols), summing to 1; `heat` is their mean."""


@dataclass
class Explanation:
    caption: str
    words: list[WordMap]
    grid: tuple[int, int]
    """(rows, cols) of the patch grid the maps cover."""
    layers: list[int]
    """The decoder layers averaged (indices)."""
    layer_count: int
    model: str = ""


@dataclass
class _Trace:
    """One greedy decode: the tokens written and, per decoder layer and written token, the head-averaged
    cross-attention over the encoder's positions."""

    token_ids: list[int]
    attention: Any  # torch tensor (layers, tokens, encoder positions)
    image_positions: list[int]
    """The encoder positions that hold the image (summary token first), in order."""
    pixels: tuple[int, int]
    """(height, width) of the image as the model saw it."""


class Explainer:
    """A captioner loaded through loracap's own loader, ready to explain images one at a time."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | None = None,
        offline: bool | None = None,
    ) -> None:
        from loracap.backends.blip import BlipBackend
        from loracap.backends.florence2 import Florence2Backend
        from loracap.backends.vit_gpt2 import VisionEncoderDecoderBackend

        check_explain_model(model, offline=offline)
        self.model = model
        self.backend = load_backend(model, device=device, dtype=dtype, offline=offline)
        traces = {
            Florence2Backend: _florence2_trace,
            BlipBackend: _blip_trace,
            VisionEncoderDecoderBackend: _vit_gpt2_trace,
        }
        # An exported ONNX captioner keeps its config.json but runs on onnxruntime: no attentions to read.
        self._trace_of = traces.get(type(self.backend))
        if self._trace_of is None:
            raise BackendError(
                f"{model} loads as {type(self.backend).__name__}; explain reads the attentions of the "
                f"transformers {', '.join(EXPLAINABLE.values())} captioners"
            )
        net = self.backend.model
        # SDPA and flash attention return no weights; eager returns them, with the same outputs.
        if net.config._attn_implementation != "eager":
            net.set_attn_implementation("eager")

    @property
    def image_side(self) -> int:
        return self.backend.image_side

    @property
    def tokenizer(self) -> Any:
        processor = getattr(self.backend, "processor", None)
        return processor.tokenizer if processor is not None else self.backend.tokenizer

    def explain(
        self,
        image: Image.Image,
        *,
        mode: str = "caption",
        layers: tuple[int, ...] | None = None,
        settings: GenerationSettings | None = None,
    ) -> Explanation:
        """Caption `image` greedily (as `loracap caption` does, beams off) and map each word to the patches
        the decoder attended to while writing it."""
        trace = self._trace(image, mode, settings or GenerationSettings())
        chosen = pick_layers(layers, trace.attention.shape[0])
        # Mean over the chosen layers, then only the image's positions (Florence-2's text tokens dropped).
        maps = trace.attention[chosen].mean(0)[:, trace.image_positions].float().cpu().numpy()
        skip, rows, cols = patch_grid(maps.shape[1], *trace.pixels)
        maps = _normalised(maps[:, skip:])
        ignored = set(self.tokenizer.all_special_ids) | set(getattr(self.backend, "non_caption_ids", ()))
        kept = [i for i, t in enumerate(trace.token_ids) if t not in ignored]
        ids = [trace.token_ids[i] for i in kept]
        words = []
        for word, members in group_words(self.tokenizer, ids):
            token_maps = maps[[kept[m] for m in members]]
            pieces = tuple(self.tokenizer.convert_ids_to_tokens([ids[m] for m in members]))
            per_token = tuple(m.reshape(rows, cols) for m in token_maps)
            words.append(WordMap(word, word_heat(token_maps).reshape(rows, cols), pieces, per_token))
        caption = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Explanation(caption, words, (rows, cols), chosen, trace.attention.shape[0], self.model)

    def _trace(self, image: Image.Image, mode: str, settings: GenerationSettings) -> _Trace:
        # Greedy: with beams, generate's per-step attentions belong to beams that may be dropped later.
        greedy = GenerationSettings(
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            repetition_penalty=settings.repetition_penalty,
        )
        return self._trace_of(self.backend, image, mode, greedy)


def _steps(cross_attentions: Sequence[Sequence[Any]]) -> Any:
    """generate's `cross_attentions` (per step, per layer: batch x heads x queries x positions) as one
    (layers, steps, positions) tensor: the last query of each step (the one that chose that step's token),
    averaged over heads."""
    import torch

    return torch.stack(
        [torch.stack([layer[0, :, -1, :].mean(0) for layer in step]) for step in cross_attentions], dim=1
    )


def _generate_kwargs(settings: GenerationSettings, default_max: int, backend: Any, start: int) -> dict:
    """The backend's own decoding kwargs (its default length, cut to what fits its decoder after `start`
    tokens), with the attentions returned."""
    from loracap.backends.base import fit_decoder

    kwargs = fit_decoder(settings.generate_kwargs(default_max), backend.model, start, backend.name)
    return {**kwargs, "return_dict_in_generate": True, "output_attentions": True}


def _vit_gpt2_trace(backend: Any, image: Image.Image, mode: str, settings: GenerationSettings) -> _Trace:
    import torch

    pixels = backend.prepare([image], mode).to(backend.placement.device)
    # As the backend decodes: from one start token, up to what fits its decoder.
    kwargs = _generate_kwargs(settings, 32, backend, 1)
    with torch.inference_mode():
        out = backend.model.generate(pixel_values=pixels, **kwargs)
    attention = _steps(out.cross_attentions)
    everything = list(range(attention.shape[-1]))  # the ViT's output: [CLS] and the patches
    return _Trace(out.sequences[0, 1:].tolist(), attention, everything, tuple(pixels.shape[-2:]))


def _florence2_trace(backend: Any, image: Image.Image, mode: str, settings: GenerationSettings) -> _Trace:
    import torch

    from loracap.backends.florence2 import DEFAULT_MAX_NEW_TOKENS

    inputs = backend.prepare([image], mode)
    device = backend.placement.device
    input_ids = inputs["input_ids"].to(device)
    pixels = inputs["pixel_values"].to(device)
    # As the backend decodes a caption: from the trained "</s><s>" prefix, non-caption tokens suppressed.
    start = len(backend.decoder_prefix)
    kwargs = _generate_kwargs(settings, DEFAULT_MAX_NEW_TOKENS.get(mode, 256), backend, start)
    kwargs.update(
        logits_processor=[backend.suppress], decoder_input_ids=backend.prefix_ids, forced_bos_token_id=None
    )
    with torch.inference_mode():
        out = backend.model.generate(input_ids=input_ids, pixel_values=pixels, **kwargs)
    # The encoder reads the image's tokens (where the prompt has the image placeholder) and then the task
    # prompt's text: only the image's positions are kept.
    image_positions = (input_ids[0] == backend.model.config.image_token_id).nonzero().flatten().tolist()
    attention = _steps(out.cross_attentions)
    return _Trace(out.sequences[0, start:].tolist(), attention, image_positions, tuple(pixels.shape[-2:]))


def _blip_trace(backend: Any, image: Image.Image, mode: str, settings: GenerationSettings) -> _Trace:
    """BLIP's generate runs its text decoder as a decoder-only model, and transformers' generate collects
    cross-attentions only for encoder-decoder models: so the caption is decoded first, then read once more,
    teacher-forced, with the attentions on. The decoder is causal, so position t attends exactly as it did
    when it chose token t + 1."""
    import torch

    inputs = backend.prepare([image], mode)
    pixels = inputs["pixel_values"].to(backend.placement.device)
    model = backend.model
    kwargs = _generate_kwargs(settings, 40, backend, 1)
    with torch.inference_mode():
        sequences = model.generate(pixel_values=pixels, **kwargs).sequences
        image = model.vision_model(pixel_values=pixels)[0]
        out = model.text_decoder(input_ids=sequences, encoder_hidden_states=image, output_attentions=True)
    # Per layer (batch, heads, queries, positions): query t chose token t + 1, so tokens 1.. come from
    # queries 0..-2.
    attention = torch.stack([layer[0, :, :-1, :].mean(0) for layer in out.cross_attentions])
    everything = list(range(attention.shape[-1]))  # the ViT's output: [CLS] and the patches
    return _Trace(sequences[0, 1:].tolist(), attention, everything, tuple(pixels.shape[-2:]))


def patch_grid(positions: int, height: int, width: int) -> tuple[int, int, int]:
    """(summary tokens to skip, rows, cols): how `positions` image positions lie on the patch grid of a
    height x width input. ViT and BLIP put one [CLS] first, Florence-2 one pooled token, DeiT two, Swin
    none; the grid is the one whose shape matches the input's."""
    for skip in (1, 0, 2):
        cells = positions - skip
        if cells < 1:
            continue
        rows = max(1, round((cells * height / width) ** 0.5))
        if cells % rows == 0:
            return skip, rows, cells // rows
    raise BackendError(f"cannot lay {positions} image positions on a patch grid of a {width}x{height} input")


def _normalised(maps: np.ndarray) -> np.ndarray:
    """Each row scaled to sum to 1."""
    return maps / np.clip(maps.sum(axis=1, keepdims=True), 1e-12, None)


def word_heat(token_maps: np.ndarray) -> np.ndarray:
    """The map of a word written as these tokens (one map per row): their mean, summing to 1."""
    return _normalised(np.asarray(token_maps, dtype=np.float64).mean(0, keepdims=True))[0]


def group_words(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The words of the text `ids` decode to, each with the indices of its tokens: a token starts a word
    when the text it adds to the decoded prefix starts with a space ("Ġhat", or a WordPiece token that is
    no "##" piece), and punctuation glued to a word belongs to it, so the words are the caption's
    whitespace-separated words. A token of spaces alone starts the word it comes before."""
    words: list[list[int]] = []
    has_text = False  # whether the word being built has any text yet (a lone "Ġ" token has none)
    before = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        common = len(os.path.commonprefix([before, text]))
        added = text[common:]
        # A token that rewrote earlier text (spaces cleaned up before punctuation, a multi-byte character
        # completed) belongs to the word it rewrote.
        boundary = added[:1].isspace() and common == len(before)
        if not words or (boundary and has_text):
            words.append([i])
            has_text = False
        else:
            words[-1].append(i)
        has_text = has_text or bool(added.strip())
        before = text
    labelled = [(_decode(tokenizer, [ids[i] for i in members]), members) for members in words]
    return [(word, members) for word, members in labelled if word]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# --- drawing -----------------------------------------------------------------------------------------------

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno").
_COLOURS = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32
)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB uint8, through `_COLOURS`."""
    stops = np.linspace(0, 1, len(_COLOURS))
    rgb = [np.interp(values, stops, _COLOURS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """`image` with `heat` (rows x cols) stretched over it: each map from its lowest cell (dark) to its
    highest (bright), so where a word looked stands out even when its attention is spread thin."""
    from PIL import Image

    low, span = float(heat.min()), float(np.ptp(heat))
    scaled = ((heat - low) / span if span > 1e-9 else np.zeros_like(heat)).astype(np.float32)
    # Bilinear upsampling of the cells: smooth, and each cell's centre keeps its value.
    layer = Image.fromarray(scaled, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(colour_map(np.clip(np.asarray(layer), 0, 1)))
    # Over the image in grey, so the map's colours are not confused with the picture's own.
    return Image.blend(image.convert("L").convert("RGB"), colours, alpha)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the bitmap font, one size
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken at spaces."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines or [""]


def draw_explanation(image: Image.Image, shown: Explanation, *, tile: int = TILE) -> Image.Image:
    """The PNG's picture: the caption on top, then the image and one heatmap over it per word, labelled."""
    from PIL import Image, ImageDraw, ImageOps

    # Fitted to the tile, enlarged too: a small image's cells would be a few pixels each.
    thumb = ImageOps.contain(image.convert("RGB"), (tile, tile), Image.Resampling.BICUBIC)
    label_h, pad = max(16, tile // 9), 8
    font, small = _font(label_h - 4), _font(max(10, label_h - 7))
    cells = [("(image)", thumb)] + [(w.word, overlay(thumb, w.heat)) for w in shown.words]
    columns = min(MAX_COLUMNS, len(cells))
    width = columns * (tile + pad) + pad
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption = _wrap(scratch, shown.caption or "(empty caption)", font, width - 2 * pad)
    rows, cols = shown.grid
    layers = "all layers" if len(shown.layers) == shown.layer_count else f"layers {shown.layers}"
    note = (
        f"{shown.model} · cross-attention over {rows}x{cols} patches, mean of heads and {layers}; "
        "each map from its lowest cell (dark) to its highest (bright)"
    )
    header = pad + len(caption) * (label_h + 2) + label_h + pad
    grid_rows = -(-len(cells) // columns)
    canvas = Image.new("RGB", (width, header + grid_rows * (tile + label_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(caption):
        draw.text((pad, pad + i * (label_h + 2)), line, fill="black", font=font)
    note = _fit(draw, note, small, width - 2 * pad)
    draw.text((pad, pad + len(caption) * (label_h + 2)), note, fill="#666", font=small)
    for i, (label, picture) in enumerate(cells):
        x = pad + (i % columns) * (tile + pad)
        y = header + (i // columns) * (tile + label_h + pad)
        # Centred in its square, so maps of wide and tall images line up in the grid.
        canvas.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
        text = _fit(draw, label, font, tile)
        left = x + (tile - draw.textlength(text, font=font)) / 2
        draw.text((left, y + tile + 2), text, fill="black", font=font)
    return canvas


# --- the command, and the files the report and the editor show ----------------------------------------------


def explain_config(config: ExplainConfig | str | Path | None = None, **settings: Any) -> ExplainConfig:
    """An ExplainConfig: `config` itself, or one for the image `config` with `settings` (flat names)."""
    return settings_for(ExplainConfig, config, settings, first="image", where="explain settings")


def explain(config: ExplainConfig | str | Path, **settings: Any) -> tuple[Path, Explanation]:
    """What `loracap explain IMAGE` does: load the model, explain the image, write the PNG. Returns the
    PNG's path and the explanation."""
    from loracap.inputs import ImageDecodeError, load_image, read_size

    config = explain_config(config, **settings)
    if config.image is None:
        raise ValueError("no image: give IMAGE")
    path = Path(config.image)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        read_size(path)  # the header, before the model loads: a file that is no image is said at once
        explainer = Explainer(config.model, device=config.device, dtype=config.dtype)
        # Decoded as `loracap caption` decodes for this model, so the caption is the one it writes.
        image = load_image(path, min_side=explainer.image_side or None)
    except ImageDecodeError as exc:
        raise ValueError(f"{path} cannot be decoded: {exc.reason}") from None
    shown = explainer.explain(image, mode=config.mode, layers=config.layers, settings=_settings(config))
    out = Path(config.out) if config.out is not None else Path(f"{path.stem}.explain.png")
    write_png(draw_explanation(image, shown, tile=config.tile), out)
    return out, shown


def _settings(config: Any) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens)


def write_png(picture: Image.Image, out: Path) -> None:
    """Save atomically: a half-written PNG is never left where a page links to it."""
    import io

    from loracap.files import atomic_write_bytes

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())


def png_name(relative: str) -> str:
    """A flat, stable file name for the explanation of the image at `relative` (its dataset path)."""
    digest = hashlib.sha256(relative.encode("utf-8")).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(relative).stem)[:40]
    return f"{stem}-{digest}.png"


@dataclass
class ExplainedFiles:
    """What `explain_files` wrote: dataset path -> PNG name in the folder, and the images that failed."""

    files: dict[str, str] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def explain_files(
    explainer: Explainer,
    root: Path,
    relatives: Iterable[str],
    folder: Path,
    *,
    layers: tuple[int, ...] | None = None,
    settings: GenerationSettings | None = None,
    tile: int = TILE,
    progress: bool = False,
) -> ExplainedFiles:
    """One PNG in `folder` per image (paths relative to `root`); an image that cannot be decoded or
    captioned is listed in `errors` and the others are still explained."""
    import sys

    from tqdm.auto import tqdm

    from loracap.inputs import ImageDecodeError, load_image

    done = ExplainedFiles()
    relatives = list(relatives)
    for relative in tqdm(relatives, unit="img", desc="explain", disable=not progress, file=sys.stderr):
        try:
            image = load_image(root / relative, min_side=explainer.image_side or None)
            shown = explainer.explain(image, layers=layers, settings=settings)
        except ImageDecodeError as exc:
            done.errors[relative] = exc.reason
            continue
        except (BackendError, RuntimeError, ValueError) as exc:  # this image; the next may work
            log.warning("explain: %s: %s", relative, exc)
            done.errors[relative] = f"{type(exc).__name__}: {textwrap.shorten(str(exc), 200)}"
            continue
        name = png_name(relative)
        write_png(draw_explanation(image, shown, tile=tile), folder / name)
        done.files[relative], done.captions[relative] = name, shown.caption
    return done
