"""Image-text matching (ITM): BLIP's own verdict on whether each caption describes its image.

BLIP's ITM head (`BlipForImageTextRetrieval` with `use_itm_head=True`: Salesforce/blip-itm-base-coco,
blip-itm-large-coco, the -flickr ones) reads the caption with cross-attention to the image's patches and gives
two logits, (no match, match); the score is the softmax's match probability, in [0, 1]. Where CLIPScore
compares two embeddings computed apart, the text encoder here sees the image while it reads; and where a
CLIP score means little without knowing the model, 0.5 is where the ITM head's own verdict flips.

Captions longer than the text encoder's window (512 tokens for the published checkpoints) are cut there and
the pair is marked `truncated`. Decoding, batching, per-file errors, threads and the cache work as in
`loracap.quality.clipscore`, whose helpers this module uses: scores are cached in a JSON file keyed by
(model, SHA-256 of the image file, caption), so a re-run loads no model when nothing changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loracap.backends.base import BackendError
from loracap.hub import loracap_cache_dir, resolve_model
from loracap.quality.clipscore import _DECODE_MARGIN, PairKind, PairRun, _fingerprint, _PairModel, score_pairs

__all__ = [
    "CACHE_FILE",
    "DEFAULT_MODEL",
    "ItmRun",
    "MatchedPair",
    "check_itm_model",
    "default_cache_path",
    "itm_scores",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip-itm-base-coco"
CACHE_FILE = "itm-cache.json"
ITM_CLASS = "BlipForImageTextRetrieval"


@dataclass(frozen=True)
class MatchedPair:
    """One image-caption pair: `probability` that the caption matches the image, in [0, 1] (None when
    `error` says why it could not be scored)."""

    path: Path
    caption: str
    probability: float | None
    truncated: bool = False  # the caption was longer than the text encoder's window and was cut
    cached: bool = False  # taken from the cache, not computed in this run
    error: str | None = None


@dataclass
class ItmRun(PairRun):
    """An ITM run: `MatchedPair`s, lowest match probability first."""

    value: ClassVar[str] = "probability"


def default_cache_path() -> Path:
    """`$LORACAP_CACHE/itm-cache.json` (default `~/.cache/loracap/`)."""
    return loracap_cache_dir() / CACHE_FILE


def check_itm_model(model: str) -> Path:
    """The local folder of `model` (found through `resolve_model`, downloaded once if allowed), after
    checking from its config.json that it is BLIP image-text matching: a BLIP captioner loads into
    `BlipForImageTextRetrieval` too, with a random ITM head, and would score noise. Raises `BackendError`."""
    from transformers import AutoConfig

    model_dir = resolve_model(model)
    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "blip" or (architectures and ITM_CLASS not in architectures):
        what = architectures[0] if architectures else config.model_type
        raise BackendError(
            f"{model} is a {what} checkpoint, not BLIP image-text matching ({ITM_CLASS}, "
            f"e.g. {DEFAULT_MODEL})"
        )
    return model_dir


def itm_scores(
    pairs: Sequence[tuple[str | Path, str]],
    *,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    threads: int | None = None,
    cache_path: str | Path | None = None,
    cache: bool = True,
    progress: bool = True,
    digests: Mapping[Path, str] | None = None,
) -> ItmRun:
    """The match probability of every (image path, caption) pair; see the module docstring.

    The arguments are `clip_scores`'s: `model` is a hub id or a local folder of a `BlipForImageTextRetrieval`
    checkpoint, loaded only if some pair is not in the cache; `cache_path` defaults to `default_cache_path()`
    (a file shared with CLIPScore is fine: the keys differ); `batch_size` defaults to 32 on a GPU, 8 on a
    CPU. Raises `BackendError` for a checkpoint that is not BLIP image-text matching.
    """
    started = time.perf_counter()
    model_dir = check_itm_model(model)
    path_cache = (Path(cache_path) if cache_path is not None else default_cache_path()) if cache else None
    matched, computed = score_pairs(
        pairs,
        ITM_PAIRS,
        model_key=f"itm|{model}|{_fingerprint(model_dir)}",
        load=lambda: _Matcher(model_dir, device=device, dtype=dtype, batch_size=batch_size),
        cache_path=path_cache,
        digests=digests,
        workers=workers,
        threads=threads,
        progress=progress,
    )
    run = ItmRun(matched, model, computed, time.perf_counter() - started, path_cache)
    for e in run.errors:
        log.error("itm error: %s: %s", e.path, e.error)
    return run


def _from_entry(path: Path, caption: str, entry: dict[str, Any]) -> MatchedPair | None:
    valid = isinstance(entry.get("itm"), float | int) and isinstance(entry.get("truncated"), bool)
    return MatchedPair(path, caption, entry["itm"], entry["truncated"], cached=True) if valid else None


ITM_PAIRS = PairKind(
    pair=MatchedPair,
    from_outcome=lambda path, caption, outcome: MatchedPair(path, caption, *outcome),
    entry=lambda outcome: {"itm": outcome[0], "truncated": outcome[1]},
    from_entry=_from_entry,
)


# -------------------------------------------------------------------------------------------------- the model


class _Matcher(_PairModel):
    """A loaded BLIP ITM model (checked by `check_itm_model`): match probabilities per batch."""

    desc = "itm"

    def __init__(self, model_dir: Path, *, device: str | None, dtype: str | None, batch_size: int | None):
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        from loracap.backends.device import choose_placement, default_batch_size, image_side

        self.placement = choose_placement(device, dtype)
        self.model = BlipForImageTextRetrieval.from_pretrained(model_dir, dtype=self.placement.dtype)
        self.model.to(self.placement.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.batch_size = batch_size or default_batch_size(self.placement, gpu_batch=32, cpu_batch=8)
        window = self.model.config.text_config.max_position_embeddings
        self.max_length = min(window, self.tokenizer.model_max_length or window)
        side = image_side(self.image_processor)
        self.min_side = side * _DECODE_MARGIN if side else None

    def compute(self, captions: list[str], pixels: Any) -> tuple[list[float], list[bool]]:
        import torch

        full = self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        text = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device, dtype = self.placement.device, self.placement.dtype
        with torch.inference_mode():
            mask = text.get("attention_mask")
            out = self.model(
                input_ids=text["input_ids"].to(device),
                attention_mask=None if mask is None else mask.to(device),
                pixel_values=pixels["pixel_values"].to(device, dtype),
                use_itm_head=True,
            )
            probabilities = out.itm_score.float().softmax(dim=-1)[:, 1]
        return probabilities.cpu().tolist(), truncated
