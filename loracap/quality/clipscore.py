"""CLIPScore: how well each caption describes its image, with any CLIP or SigLIP checkpoint.

CLIPScore (Hessel et al., 2021, as torchmetrics computes it) is ``100 * max(cos(image_emb, text_emb), 0)``
with both embeddings from the model's projection heads (`get_image_features` / `get_text_features`). Hessel's
paper scales by 2.5 instead of 100; only the scale differs. Scores from different models are not comparable:
SigLIP's cosines are much smaller than CLIP's, so its scores sit lower. Rank within one model.

Captions longer than the text tower's window (77 tokens for CLIP, 64 for SigLIP) are cut there and the pair is
marked `truncated`: the part after the cut did not count. Images are decoded and preprocessed in worker
threads a few batches ahead of the model (`loracap.inputs.prefetch_batches`, the look-ahead captioning uses);
a file that cannot be decoded becomes a per-file error and every other pair is still scored.

Scores are cached in a JSON file keyed by (model, SHA-256 of the image file, caption text): a re-run only
scores pairs whose image or caption changed, and loads no model at all when nothing did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loracap.backends.base import BackendError
from loracap.backends.resources import use_threads
from loracap.files import atomic_write_text
from loracap.hub import loracap_cache_dir, resolve_model
from loracap.inputs import ImageDecodeError, file_sha256, map_ahead, prefetch_batches

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
CACHE_FILE = "clipscore-cache.json"
_CACHE_VERSION = 1
# SigLIP's text tower reads the last position and was trained on texts padded to the full window.
PAD_TO_WINDOW = frozenset({"siglip", "siglip2"})
# Decode at most this many times the model's input side; its own resize does the final filtering.
_DECODE_MARGIN = 2


@dataclass(frozen=True)
class ScoredPair:
    """One image-caption pair: `score` in [0, 100] (None when `error` says why it could not be scored)."""

    path: Path
    caption: str
    score: float | None
    cosine: float | None = None
    truncated: bool = False  # the caption was longer than the model's text window and was cut
    cached: bool = False  # taken from the cache, not computed in this run
    error: str | None = None


@dataclass
class PairRun:
    """The pairs of a scoring run (CLIPScore, ITM) in input order plus what the run did: how many were
    computed, cached, failed, truncated. `value` names the pairs' score attribute."""

    value: ClassVar[str] = "score"
    pairs: list[Any]
    model: str
    computed: int = 0  # pairs sent through the model in this run
    seconds: float = 0.0
    cache_path: Path | None = None

    @property
    def cached(self) -> int:
        """Values taken from the cache (cached decode failures count in `failed`)."""
        return sum(p.cached and p.error is None for p in self.pairs)

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def truncated(self) -> int:
        return sum(p.truncated for p in self.pairs)

    @property
    def errors(self) -> list[Any]:
        """The pairs that could not be scored, in input order."""
        return [p for p in self.pairs if p.error is not None]

    def lowest_first(self) -> list[Any]:
        return lowest_first(self.pairs, self.value)


@dataclass
class ClipScoreRun(PairRun):
    """A CLIPScore run: `ScoredPair`s."""


def lowest_first(pairs: Iterable[Any], value: str = "score") -> list[Any]:
    """Scored pairs, lowest `value` first (the captions to look at first); ties by path. Errors are left
    out."""
    scored = (p for p in pairs if getattr(p, value) is not None)
    return sorted(scored, key=lambda p: (getattr(p, value), str(p.path), p.caption))


def default_cache_path() -> Path:
    """`$LORACAP_CACHE/clipscore-cache.json` (default `~/.cache/loracap/`)."""
    return loracap_cache_dir() / CACHE_FILE


def clip_scores(
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
) -> ClipScoreRun:
    """Score every (image path, caption) pair; see the module docstring.

    `model`: a hub id or a local folder, found through `resolve_model` (offline mode raises
    `ModelUnavailable` with the one-line fix); loaded only if some pair is not in the cache. `cache_path`
    defaults to `default_cache_path()`; `cache=False` neither reads nor writes one. `batch_size` defaults to
    64 on a GPU, 8 on a CPU. `threads`: torch's thread count, set for the process once the model is loaded
    (None: chosen from the CPUs this process may use, see `loracap.backends.resources.use_threads`).
    `digests` maps image paths to their known `file_sha256` (the image checks computed them already); those
    files are not read again. Raises `BackendError` for a checkpoint that is not an image-text dual encoder.
    """
    started = time.perf_counter()
    model_dir = resolve_model(model)
    path_cache = (Path(cache_path) if cache_path is not None else default_cache_path()) if cache else None
    scored, computed = score_pairs(
        pairs,
        CLIP_PAIRS,
        model_key=f"{model}|{_fingerprint(model_dir)}",
        load=lambda: _Scorer(model_dir, device=device, dtype=dtype, batch_size=batch_size),
        cache_path=path_cache,
        digests=digests,
        workers=workers,
        threads=threads,
        progress=progress,
    )
    run = ClipScoreRun(scored, model, computed, time.perf_counter() - started, path_cache)
    for e in run.errors:
        log.error("clipscore error: %s: %s", e.path, e.error)
    return run


@dataclass(frozen=True)
class PairKind:
    """What one scorer (CLIPScore, ITM) makes of a model's outcome, (value, truncated): its pair class, the
    pair, and the cache entry; and how it reads a cache entry back."""

    pair: type
    from_outcome: Callable[[Path, str, tuple[float, bool]], Any]
    entry: Callable[[tuple[float, bool]], dict[str, Any]]
    from_entry: Callable[[Path, str, dict[str, Any]], Any | None]
    """The cached pair, or None when the entry is not a valid one of this kind (it is scored again)."""


def score_pairs(
    pairs: Sequence[tuple[str | Path, str]],
    kind: PairKind,
    *,
    model_key: str,
    load: Callable[[], Any],
    cache_path: Path | None,
    digests: Mapping[Path, str] | None,
    workers: int,
    threads: int | None,
    progress: bool,
) -> tuple[list[Any], int]:
    """Every pair scored, in input order, and how many went through the model. Pairs found in the cache at
    `cache_path` (keyed by `model_key`, the image's SHA-256 and the caption) are taken from it; the model
    (`load()`, a `_PairModel`) is loaded only when some are not, and scores each distinct key once. What
    it computes, and the images it could not decode, are written back, also when interrupted."""
    items = [(Path(p), str(c)) for p, c in pairs]
    entries = _read_cache(cache_path) if cache_path else {}
    results: list[Any] = [None] * len(items)
    hashes = _hashes([path for path, _ in items], digests or {}, workers)
    todo: dict[str, list[int]] = {}  # cache key -> indices of the pairs it scores (duplicates scored once)
    for i, ((path, caption), digest) in enumerate(zip(items, hashes, strict=True)):
        if isinstance(digest, ImageDecodeError):
            results[i] = kind.pair(path, caption, None, error=digest.reason)
            continue
        key = _cache_key(model_key, digest, caption)
        hit = entries.get(key)
        cached = kind.from_entry(path, caption, hit) if isinstance(hit, dict) else None
        if cached is not None:
            results[i] = cached
        elif isinstance(hit, dict) and isinstance(hit.get("undecodable"), str):
            results[i] = kind.pair(path, caption, None, cached=True, error=hit["undecodable"])
        else:
            todo.setdefault(key, []).append(i)

    computed = 0
    if todo:
        scorer = load()
        use_threads(threads, workers=workers, device=scorer.placement.device.type)
        jobs = [(key, items[idx[0]][0], items[idx[0]][1]) for key, idx in todo.items()]
        try:
            for key, outcome in scorer.score(jobs, workers=workers, progress=progress):
                for i in todo[key]:
                    path, caption = items[i]
                    if isinstance(outcome, str | _Undecodable):
                        results[i] = kind.pair(path, caption, None, error=str(outcome))
                    else:
                        results[i] = kind.from_outcome(path, caption, outcome)
                if isinstance(outcome, _Undecodable):
                    # Same bytes, same failure: a re-run must not load the model just to fail again.
                    entries[key] = {"model": model_key, "undecodable": outcome.reason}
                elif not isinstance(outcome, str):
                    computed += 1
                    entries[key] = {"model": model_key, **kind.entry(outcome)}
        finally:  # an interrupted run keeps what it computed
            if cache_path is not None:
                _write_cache(cache_path, entries)
    return [r for r in results if r is not None], computed


@dataclass(frozen=True)
class _Undecodable:
    """A scoring outcome: the image could not be decoded (cached, unlike a model error)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def _clipscore(cosine: float) -> float:
    return 100.0 * max(cosine, 0.0)


def _clip_from_entry(path: Path, caption: str, entry: dict[str, Any]) -> ScoredPair | None:
    if not _valid_entry(entry):
        return None
    return ScoredPair(path, caption, entry["score"], entry["cosine"], entry["truncated"], cached=True)


CLIP_PAIRS = PairKind(
    pair=ScoredPair,
    from_outcome=lambda path, caption, o: ScoredPair(path, caption, _clipscore(o[0]), o[0], o[1]),
    entry=lambda o: {"score": _clipscore(o[0]), "cosine": o[0], "truncated": o[1]},
    from_entry=_clip_from_entry,
)


# -------------------------------------------------------------------------------------------------- the model


class _PairModel:
    """A loaded pair scorer: decodes images ahead in threads (`prefetch_batches`) and scores each batch with
    `compute(captions, pixels) -> (values, truncated)`. A batch the model fails on is scored pair by pair
    on slices of its prepared pixels, so only the pair that breaks the model fails."""

    desc = "pairs"
    placement: Any
    image_processor: Any
    batch_size: int
    min_side: int | None

    def compute(self, captions: list[str], pixels: Any) -> tuple[list[float], list[bool]]:
        raise NotImplementedError

    def score(
        self, jobs: list[tuple[str, Path, str]], *, workers: int, progress: bool
    ) -> Iterator[tuple[str, tuple[float, bool] | _Undecodable | str]]:
        """Yield (key, (value, truncated)), (key, _Undecodable) or (key, model error reason) per job."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="pair", desc=self.desc, disable=not progress, file=sys.stderr)
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
                    yield from self._batch(batch.items, batch.inputs)
                bar.update(len(batch.items) + len(batch.errors))
        finally:
            bar.close()

    def _batch(self, batch: list[tuple[str, Path, str]], pixels: Any) -> Iterator[tuple[str, Any]]:
        try:
            values, truncated = self.compute([c for _, _, c in batch], pixels)
        except (KeyboardInterrupt, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001 - find the pair that breaks the model, keep the rest
            if len(batch) == 1:
                yield batch[0][0], f"{type(exc).__name__}: {exc}"
                return
            # The images are decoded and preprocessed already: score each pair on its own slice of them.
            for i, job in enumerate(batch):
                yield from self._batch([job], {k: v[i : i + 1] for k, v in pixels.items()})
            return
        for job, value, cut in zip(batch, values, truncated, strict=True):
            yield job[0], (value, cut)


class _Scorer(_PairModel):
    """A loaded dual encoder: embeds batches, returns cosines."""

    desc = "clipscore"

    def __init__(self, model_dir: Path, *, device: str | None, dtype: str | None, batch_size: int | None):
        from transformers import AutoModel, AutoProcessor

        from loracap.backends.device import choose_placement, default_batch_size, image_side

        self.placement = choose_placement(device, dtype)
        self.model = AutoModel.from_pretrained(model_dir, dtype=self.placement.dtype)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise BackendError(
                f"{model_dir} is a {type(self.model).__name__}, not an image-text model like CLIP or SigLIP"
            )
        self.model.to(self.placement.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.batch_size = batch_size or default_batch_size(self.placement, gpu_batch=64, cpu_batch=8)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        window = getattr(text_config, "max_position_embeddings", None) or 77
        self.max_length = min(window, self.tokenizer.model_max_length or window)
        self.pad_to_window = self.model.config.model_type in PAD_TO_WINDOW
        side = image_side(self.image_processor)
        self.min_side = side * _DECODE_MARGIN if side else None

    def compute(self, captions: list[str], pixels: Any) -> tuple[list[float], list[bool]]:
        import torch

        full = self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        text = text_inputs(
            self.tokenizer, captions, max_length=self.max_length, pad_to_window=self.pad_to_window
        )
        device, dtype = self.placement.device, self.placement.dtype
        with torch.inference_mode():
            image_inputs = {
                k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in pixels.items()
            }
            image_emb = features(self.model.get_image_features(**image_inputs))
            text_emb = features(self.model.get_text_features(**{k: v.to(device) for k, v in text.items()}))
            image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
            text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
            cosines = (image_emb * text_emb).sum(dim=-1)
        return cosines.cpu().tolist(), truncated


def text_inputs(tokenizer: Any, captions: list[str], *, max_length: int, pad_to_window: bool) -> Any:
    """Token tensors for a CLIP / SigLIP text tower: cut at its window, and padded to the whole window for
    SigLIP, which reads the last position and was trained that way."""
    return tokenizer(
        captions,
        padding="max_length" if pad_to_window else True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


def features(out: Any) -> Any:
    """The projected embedding: transformers 5 returns a model output from get_*_features (its
    pooler_output), 4.x returned the tensor."""
    return out if hasattr(out, "dim") else out.pooler_output


# ------------------------------------------------------------------------------------------ threads and cache


def _hashes(paths: list[Path], known: Mapping[Path, str], workers: int) -> list[str | ImageDecodeError]:
    """Each file's digest in order: taken from `known` where there, else read in worker threads."""
    todo = [p for p in dict.fromkeys(paths) if p not in known]
    found = dict(zip(todo, map_ahead(_file_hash, todo, workers, name="loracap-hash"), strict=True))
    return [known[p] if p in known else found[p] for p in paths]


def _file_hash(path: Path) -> str | ImageDecodeError:
    try:
        return file_sha256(path)
    except OSError as exc:
        return ImageDecodeError(path, f"cannot read file: {exc.strerror or exc}")


def _fingerprint(model_dir: Path) -> str:
    """Changes when the checkpoint's config or weights change (a rebuilt local folder, a new hub revision)."""
    digest = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cache_key(model_key: str, file_hash: str, caption: str) -> str:
    return hashlib.sha256(json.dumps([model_key, file_hash, caption]).encode()).hexdigest()


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("score"), float | int)
        and isinstance(entry.get("cosine"), float | int)
        and isinstance(entry.get("truncated"), bool)
    )


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cache entries; a missing, unreadable or other-version file is an empty cache."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Every entry is kept (one cache may serve several folders and models); about 200 bytes each."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1) + "\n")
    except OSError as exc:
        log.warning("cannot write the CLIPScore cache %s: %s", path, exc)
