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
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loracap.backends.base import BackendError
from loracap.backends.resources import use_threads
from loracap.hub import loracap_cache_dir, resolve_model
from loracap.inputs import ImageDecodeError, prefetch_batches
from loracap.quality.clipscore import (
    _DECODE_MARGIN,
    PairRun,
    _cache_key,
    _fingerprint,
    _hashes,
    _read_cache,
    _Undecodable,
    _write_cache,
)

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
    model_key = f"itm|{model}|{_fingerprint(model_dir)}"
    items = [(Path(p), str(c)) for p, c in pairs]
    path_cache = (Path(cache_path) if cache_path is not None else default_cache_path()) if cache else None
    entries = _read_cache(path_cache) if path_cache else {}

    results: list[MatchedPair | None] = [None] * len(items)
    hashes = _hashes([path for path, _ in items], digests or {}, workers)
    todo: dict[str, list[int]] = {}  # cache key -> indices of the pairs it scores (duplicates scored once)
    for i, ((path, caption), digest) in enumerate(zip(items, hashes, strict=True)):
        if isinstance(digest, ImageDecodeError):
            results[i] = MatchedPair(path, caption, None, error=digest.reason)
            continue
        key = _cache_key(model_key, digest, caption)
        hit = entries.get(key)
        if _valid_entry(hit):
            results[i] = MatchedPair(path, caption, hit["itm"], hit["truncated"], cached=True)
        elif isinstance(hit, dict) and isinstance(hit.get("undecodable"), str):
            results[i] = MatchedPair(path, caption, None, cached=True, error=hit["undecodable"])
        else:
            todo.setdefault(key, []).append(i)

    computed = 0
    if todo:
        matcher = _Matcher(model_dir, device=device, dtype=dtype, batch_size=batch_size)
        use_threads(threads, workers=workers, device=matcher.placement.device.type)
        jobs = [(key, items[idx[0]][0], items[idx[0]][1]) for key, idx in todo.items()]
        try:
            for key, outcome in matcher.score(jobs, workers=workers, progress=progress):
                for i in todo[key]:
                    path, caption = items[i]
                    if isinstance(outcome, str | _Undecodable):
                        results[i] = MatchedPair(path, caption, None, error=str(outcome))
                    else:
                        results[i] = MatchedPair(path, caption, *outcome)
                if isinstance(outcome, _Undecodable):
                    # Same bytes, same failure: a re-run must not load the model just to fail again.
                    entries[key] = {"model": model_key, "undecodable": outcome.reason}
                elif not isinstance(outcome, str):
                    computed += 1
                    entries[key] = {"model": model_key, "itm": outcome[0], "truncated": outcome[1]}
        finally:  # an interrupted run keeps what it computed
            if path_cache is not None:
                _write_cache(path_cache, entries)

    run = ItmRun(
        pairs=[r for r in results if r is not None],
        model=model,
        computed=computed,
        seconds=time.perf_counter() - started,
        cache_path=path_cache,
    )
    for e in run.errors:
        log.error("itm error: %s: %s", e.path, e.error)
    return run


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("itm"), float | int)
        and isinstance(entry.get("truncated"), bool)
    )


# -------------------------------------------------------------------------------------------------- the model


class _Matcher:
    """A loaded BLIP ITM model (checked by `check_itm_model`): decodes images ahead in threads, returns
    match probabilities per batch."""

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

    def score(
        self, jobs: list[tuple[str, Path, str]], *, workers: int, progress: bool
    ) -> Iterator[tuple[str, tuple[float, bool] | _Undecodable | str]]:
        """Yield (key, (probability, truncated)), (key, _Undecodable) or (key, model error reason) per job."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="pair", desc="itm", disable=not progress, file=sys.stderr)
        batches = prefetch_batches(
            jobs,
            self.batch_size,
            path_of=lambda job: job[1],
            prepare=lambda _jobs, images: self.image_processor(images=images, return_tensors="pt"),
            min_side=self.min_side,
            workers=workers,
        )
        try:
            for batch in batches:
                yield from ((job[0], _Undecodable(reason)) for job, reason in batch.errors)
                if batch.items:
                    yield from self._match(batch.items, batch.inputs)
                bar.update(len(batch.items) + len(batch.errors))
        finally:
            bar.close()

    def _match(self, batch: list[tuple[str, Path, str]], pixels: Any) -> Iterator[tuple[str, Any]]:
        try:
            probabilities, truncated = self._probabilities([c for _, _, c in batch], pixels)
        except (KeyboardInterrupt, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001 - find the pair that breaks the model, keep the rest
            if len(batch) == 1:
                yield batch[0][0], f"{type(exc).__name__}: {exc}"
                return
            for i, job in enumerate(batch):
                yield from self._match([job], {k: v[i : i + 1] for k, v in pixels.items()})
            return
        for job, probability, cut in zip(batch, probabilities, truncated, strict=True):
            yield job[0], (probability, cut)

    def _probabilities(self, captions: list[str], pixels: Any) -> tuple[list[float], list[bool]]:
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
