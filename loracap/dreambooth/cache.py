"""The caches that take the VAE and the text encoders out of the training step.

Latent cache (`--cache-latents`): before training, every image is encoded once at the exact crop and flip
it trains with, and the VAE's latent distribution (mean and log-variance) is stored on disk; each step
then draws its sample from the stored distribution with the step's own generator, the same draw encoding
afresh would make. An entry is keyed by everything that decides those numbers: the image file's content
(SHA-256), the VAE (its config and every weight), the bucket, the resized size, the crop and the flip.
An edited image, another VAE or another bucket is a new key and is encoded afresh; the key is stored in
the entry and checked on reading, and items look their entry up by their own image, so a latent cannot
be paired with another image's caption. The folder (default OUT/cache/latents) may be shared by runs.

Text cache (`--cache-text`, on by default): while the text encoders are frozen, each distinct caption a
run can train with (after the trigger rule; "" too with caption dropout; the class prompt) is encoded once
and kept in memory, keyed by its exact text. Shuffled tags make a new text nearly every step, so with
--shuffle-tags the cache is off (`text_cache_plan` says why).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loracap.dataset.buckets import crop_top_left
from loracap.dreambooth.captions import alternatives
from loracap.files import atomic_write_bytes
from loracap.inputs import ImageDecodeError, file_sha256, load_image

log = logging.getLogger(__name__)

__all__ = ["LatentCache", "LatentKey", "text_cache_plan", "vae_fingerprint"]

CACHE_VERSION = 1


@dataclass(frozen=True)
class LatentKey:
    """Everything that decides an image's latents."""

    image: str
    """SHA-256 of the file's bytes."""
    vae: str
    """`vae_fingerprint` of the VAE."""
    bucket: tuple[int, int]
    """(width, height) of the crop."""
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    flip: bool

    def name(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the VAE's config and every weight (with their dtype): what its latents depend on."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


class LatentCache:
    """Latent distributions on disk, one safetensors file per `LatentKey`, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: LatentKey) -> Path:
        name = key.name()
        return self.folder / name[:2] / f"{name}.safetensors"

    def load(self, key: LatentKey) -> torch.Tensor | None:
        """The stored distribution, or None when there is none (or it is damaged, or of another key)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != _key_text(key):
                    return None
                return f.get_tensor("parameters")
        except (OSError, SafetensorError, KeyError):
            return None

    def save(self, key: LatentKey, parameters: torch.Tensor) -> None:
        from safetensors.torch import save

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"parameters": parameters.detach().cpu().contiguous()}, metadata={"key": _key_text(key)})
        atomic_write_bytes(path, data)


def _key_text(key: LatentKey) -> str:
    return json.dumps(asdict(key), sort_keys=True)


@dataclass(frozen=True)
class CacheItem:
    """One (image, placement, flip) the run trains with."""

    path: Path
    bucket: tuple[int, int]
    resized: tuple[int, int]
    flip: bool


def fill_latent_cache(
    cache: LatentCache,
    items: Iterable[CacheItem],
    vae_id: str,
    encode: Any,
    *,
    batch_size: int,
    progress: bool,
) -> tuple[dict[tuple[Path, tuple[int, int], bool], LatentKey], list[str]]:
    """Encode the items missing from `cache` with `encode(pixels) -> distribution parameters`, batched by
    bucket. Returns each item's key by (path, bucket, flip), and the images that could not be read (left
    out, named with the reason)."""
    from tqdm.auto import tqdm

    from loracap.dreambooth.data import Placement, crop_image, to_pixels

    items = list(dict.fromkeys(items))
    digests: dict[Path, str] = {}
    keys: dict[tuple[Path, tuple[int, int], bool], LatentKey] = {}
    unreadable: list[str] = []
    missing: dict[tuple[int, int], list[tuple[CacheItem, LatentKey]]] = {}
    for item in items:
        if item.path not in digests:
            try:
                digests[item.path] = file_sha256(item.path)
            except OSError as exc:
                unreadable.append(f"{item.path.name} ({exc.strerror or exc})")
                digests[item.path] = ""
        if not digests[item.path]:
            continue
        top_left = crop_top_left(item.bucket, item.resized)
        key = LatentKey(digests[item.path], vae_id, item.bucket, item.resized, top_left, item.flip)
        keys[(item.path, item.bucket, item.flip)] = key
        if cache.load(key) is None:
            missing.setdefault(item.bucket, []).append((item, key))
    total = sum(len(v) for v in missing.values())
    log.info(
        "latent cache %s: %d of %d entries there, %d to encode",
        cache.folder,
        len(keys) - total,
        len(keys),
        total,
    )
    bar = tqdm(total=total, desc="caching latents", unit="img", disable=not (progress and total))
    with bar:
        for entries in missing.values():
            for start in range(0, len(entries), batch_size):
                chunk, pixels = [], []
                for item, key in entries[start : start + batch_size]:
                    try:
                        image = load_image(item.path, min_side=min(item.resized))
                    except ImageDecodeError as exc:
                        unreadable.append(f"{item.path.name} ({exc.reason})")
                        keys.pop((item.path, item.bucket, item.flip), None)
                        continue
                    image, _ = crop_image(image, Placement(item.bucket, item.resized), None, item.flip)
                    chunk.append(key)
                    pixels.append(to_pixels(image))
                if chunk:
                    parameters = encode(torch.stack(pixels))
                    for key, one in zip(chunk, parameters, strict=True):
                        cache.save(key, one)
                bar.update(len(entries[start : start + batch_size]))
    return keys, unreadable


def text_cache_plan(config: Any, captions: Iterable[str]) -> tuple[list[str] | None, str]:
    """The distinct texts to encode once, or None when the text cache is off; and a line saying which."""
    if not config.cache_text:
        return None, "text cache off (--no-cache-text): captions are encoded every step"
    if config.train_text_encoder:
        return None, "text cache off: the text encoders train, so their output changes every step"
    if config.shuffle_tags:
        return None, "text cache off: --shuffle-tags makes a new caption text nearly every step"
    # A step trains with one line of a caption of several (`training_caption`): each line is a text.
    texts = {line for caption in captions for line in alternatives(caption) or [""]}
    if config.caption_dropout:
        texts.add("")
    if config.class_prompt is not None:
        texts.add(config.class_prompt)
    texts = sorted(texts)
    return texts, f"text cache: {len(texts)} distinct caption texts encoded once"
