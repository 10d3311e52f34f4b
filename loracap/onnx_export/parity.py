"""PyTorch against onnxruntime on the same probe images: first-step logits, then greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOGIT_TOLERANCE = 1e-3


def check_parity(
    torch_folder: Path,
    onnx_folder: Path,
    *,
    images: int = 20,
    max_new_tokens: int = 20,
    quant: str | None = None,
    exact: bool = True,
) -> dict[str, Any]:
    """The first step's largest logit difference, then the share of equal greedy tokens, for `images`
    probe images. With `exact`, a logit difference over 1e-3 raises ValueError before any token is
    compared (a broken graph fails loudly there), and so does any differing token."""
    import numpy as np

    from loracap.backends.base import GenerationSettings
    from loracap.backends.onnx_captioner import load_onnx_captioner

    from .architectures import architecture

    arch = architecture(Path(torch_folder))
    model = arch.load(Path(torch_folder))
    runtime = load_onnx_captioner(Path(onnx_folder), str(onnx_folder), quant=quant)
    pictures = probe_images(images)
    inputs = runtime.prepare(pictures, "caption")
    expected, want = arch.reference(model, inputs, max_new_tokens, runtime)
    got = runtime.first_logits(inputs)
    difference = float(np.abs(expected - got).max())
    if exact and difference > LOGIT_TOLERANCE:
        raise ValueError(f"the exported graphs' first-step logits differ from PyTorch's by {difference:.3g}")
    have = runtime.token_ids(inputs, GenerationSettings(max_new_tokens=max_new_tokens))
    same = sum(a == b for x, y in zip(want, have, strict=True) for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in zip(want, have, strict=True))
    if exact and want != have:
        raise ValueError(f"greedy tokens differ from PyTorch's: {want} vs {have}")
    return {
        "images": len(pictures),
        "first_step_max_logit_difference": difference,
        "token_agreement": same / max(total, 1),
        "same_captions": sum(x == y for x, y in zip(want, have, strict=True)) / len(pictures),
    }


def probe_images(count: int) -> list[Any]:
    """Seeded, photo-like images of a few sizes (smooth noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(320, 240), (240, 320), (256, 256), (400, 225)]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    return images
