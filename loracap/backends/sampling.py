"""Seeded sampling that does not depend on the batch: each row draws from its own generator.

transformers' `generate(do_sample=True)` draws every row's next token from one global generator, so what
an image's caption becomes depends on which images share its batch and in what order: a seeded run would
give other captions with another batch size, or on a resume that skips captioned images. Here each row
(one image, or one of its `captions_per_image` copies) has its own generator, seeded from the run's seed,
the image's content and the copy's number, and draws one number per step.

The draw is an inverse-CDF pick on the row's probabilities after temperature, top-k and top-p (applied
as transformers applies them, in that order); the processor then leaves only the picked token standing,
so `generate`'s own sampling step can take nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are handled: the remote backend needs only `copy_seed`
    import torch

__all__ = ["SeededSampling", "copy_seed", "image_keys", "row_seeds"]

_SAMPLE = 1 << 16  # values of a tensor hashed per image: enough to tell images apart, cheap for 4K ones
# Tensors that say how the others are laid out rather than what the image is.
_LAYOUT = frozenset({"attention_mask", "pixel_attention_mask", "image_grid_thw", "image_sizes"})


def row_seeds(inputs: Any, seed: int, copies: int) -> list[int] | None:
    """One seed per row `generate` will run on `inputs`: image by image, `copies` rows each. None when
    the batch's images cannot be told apart from its tensors (rows are then seeded by their position)."""
    keys = image_keys(inputs)
    if keys is None:
        return None
    return [copy_seed(seed, key, copy) for key in keys for copy in range(copies)]


def copy_seed(seed: int, key: bytes, copy: int) -> int:
    """The seed of caption `copy` of the image whose digest is `key`, in a run seeded with `seed`."""
    digest = hashlib.blake2b(key, digest_size=8, key=f"{seed}:{copy}".encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_keys(inputs: Any) -> list[bytes] | None:
    """A digest per image of a prepared batch, from what the model reads of it: the same image (and
    prompt) gives the same digest in any batch. Handles a bare pixel tensor and the mappings backends
    prepare: fixed-size pixels, Qwen-VL's concatenated patches (split by `image_grid_thw`), tiles padded
    with zero frames (Idefics3, LLaVA-NeXT), left- or right-padded prompts (`attention_mask`)."""
    tensors = dict(_tensors(inputs))
    pixels = tensors.get("pixel_values")
    if pixels is None:
        return None
    rows = int(tensors["image_grid_thw"].shape[0]) if "image_grid_thw" in tensors else int(pixels.shape[0])
    digests = [hashlib.blake2b(digest_size=16) for _ in range(rows)]
    for name, tensor in sorted(tensors.items()):
        parts = _per_image(name, tensor, tensors, rows)
        if parts is None:
            continue
        for digest, part in zip(digests, parts, strict=True):
            digest.update(name.encode())
            digest.update(_sample_bytes(part))
    return [d.digest() for d in digests]


def _tensors(inputs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if isinstance(inputs, torch.Tensor):
        yield "pixel_values", inputs
    elif isinstance(inputs, Mapping):
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                yield name, value
            elif isinstance(value, Mapping):
                yield from _tensors(value)


def _per_image(
    name: str, tensor: torch.Tensor, tensors: Mapping[str, torch.Tensor], rows: int
) -> list[torch.Tensor] | None:
    """`tensor` cut into one part per image, padding left out; None when it is not per image."""
    import torch

    if name in _LAYOUT:
        return None
    if name == "pixel_values" and "image_grid_thw" in tensors:  # Qwen-VL: every image's patches in a row
        return list(torch.split(tensor, tensors["image_grid_thw"].prod(-1).tolist()))
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        return None
    mask = tensors.get("attention_mask")
    if mask is not None and mask.shape == tensor.shape:  # the prompt's ids, token types: padding left out
        return [row[m.bool()] for row, m in zip(tensor, mask, strict=True)]
    if tensor.dim() >= 5:  # (images, tiles, channels, h, w): a batch pads each image's tiles with zeros
        return [row[row.flatten(1).any(dim=1)] for row in tensor]
    return list(tensor)


def _sample_bytes(part: torch.Tensor) -> bytes:
    import torch

    flat = part.detach().reshape(-1)
    flat = flat[:: max(1, flat.numel() // _SAMPLE)]
    dtype = torch.float32 if flat.is_floating_point() else torch.int64
    return flat.to("cpu", dtype).numpy().tobytes()


class SeededSampling:
    """A transformers logits processor that samples each row from its own generator (module docstring).

    `seeds`: one per row, or None to seed row i with `fallback_seed` and i (a batch whose images cannot
    be told apart: repeatable for the same batch, but not batch-independent)."""

    def __init__(
        self,
        seeds: list[int] | None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        fallback_seed: int = 0,
    ) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self.fallback_seed = fallback_seed
        self.generators: list[torch.Generator] | None = None
        # transformers' own warpers, in the order generate applies them.
        self.warpers: list[Any] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def _generators(self, rows: int) -> list[torch.Generator]:
        import torch

        if self.generators is None:
            seeds = self.seeds or [copy_seed(self.fallback_seed, b"row", i) for i in range(rows)]
            if len(seeds) != rows:
                raise RuntimeError(f"{len(seeds)} sampling seeds for {rows} rows")
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        return self.generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        draws = torch.stack([torch.rand((), generator=g) for g in self._generators(scores.shape[0])])
        cdf = probs.cumsum(dim=-1)
        # right=True: the first token whose cumulative probability passes the draw, never one with none.
        targets = (draws.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)
