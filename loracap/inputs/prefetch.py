"""Decode images in worker threads a few batches ahead of the model.

Captioning and CLIP scoring share this: the model works on batch i while threads decode and preprocess
batch i+1.. (Pillow's decoders and the image processors release the GIL for most of their work). The
look-ahead is bounded, so memory stays flat however large the folder is, and results come back in input
order, so progress and resume stay simple.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from loracap.inputs.decode import ImageDecodeError, load_image

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["DecodedBatch", "decode_batch", "map_ahead", "prefetch_batches"]


def map_ahead(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, name: str = "loracap"
) -> Iterator[R]:
    """`map(fn, items)` in input order, run in `workers` threads at most `workers + 1` items ahead."""
    workers = max(1, workers)
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    pending: deque[Future[R]] = deque(pool.submit(fn, x) for x in islice(source, workers + 1))
    try:
        while pending:
            ready = pending.popleft().result()
            pending.extend(pool.submit(fn, x) for x in islice(source, 1))  # keep the workers busy
            yield ready
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class DecodedBatch(Generic[T]):
    items: list[T]
    """The items whose images decoded, in input order."""
    inputs: Any
    """What `prepare` made of their images (None when none decoded)."""
    errors: list[tuple[T, str]] = field(default_factory=list)
    """(item, one-line reason) for images that could not be decoded."""


def decode_batch(
    batch: Sequence[T],
    path_of: Callable[[T], Path],
    prepare: Callable[[list[T], list[Any]], Any],
    min_side: int | None = None,
) -> DecodedBatch[T]:
    """Decode each item's image (`load_image`, at least `min_side` px on the short side when it can shrink
    while decoding) and hand the good ones to `prepare(items, images)`, e.g. the model's processor."""
    good: list[T] = []
    images: list[Any] = []
    errors: list[tuple[T, str]] = []
    for item in batch:
        try:
            images.append(load_image(path_of(item), min_side=min_side))
            good.append(item)
        except ImageDecodeError as exc:
            errors.append((item, exc.reason))
    return DecodedBatch(good, prepare(good, images) if images else None, errors)


def prefetch_batches(
    items: Sequence[T],
    batch_size: int,
    *,
    path_of: Callable[[T], Path],
    prepare: Callable[[list[T], list[Any]], Any],
    min_side: int | None = None,
    workers: int = 2,
) -> Iterator[DecodedBatch[T]]:
    """`decode_batch` over `items` cut into batches, decoded `workers` threads ahead of the consumer."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return map_ahead(
        lambda b: decode_batch(b, path_of, prepare, min_side), batches, workers, name="loracap-decode"
    )
