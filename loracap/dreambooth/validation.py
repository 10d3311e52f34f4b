"""Validation grids: the same prompts at the same seeds every --validation-every steps, so the subject can
be watched appearing. One PNG per step, OUT/samples/step-N.png (a row per prompt, a column per seed), and
the same image in TensorBoard. Step 0 is drawn before training: the base model itself (the adapters start
at zero), for comparison.

Sampling runs in `torch.random.fork_rng`, with its own generators, in eval mode: whether or not a run
validates, and how often, never changes the training that follows (a resumed run depends on that)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loracap.dreambooth.captions import TRIGGER_PLACEHOLDER

log = logging.getLogger(__name__)

__all__ = ["grid", "grid_path", "render_prompts", "sample_grid"]


def render_prompts(prompts: tuple[str, ...], trigger: str | None) -> list[str]:
    """The prompts with "[trigger]" replaced by the trigger; nothing is added (a validation prompt says
    what it asks for)."""
    return [p.replace(TRIGGER_PLACEHOLDER, trigger) if trigger else p for p in prompts]


def grid_path(out: Path, step: int) -> Path:
    return out / "samples" / f"step-{step}.png"


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images in rows, all of the first one's size, on one canvas."""
    width, height = rows[0][0].size
    canvas = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            canvas.paste(image.convert("RGB"), (x * width, y * height))
    return canvas


def sample_grid(
    pipeline: Any,
    modules: list[torch.nn.Module],
    prompts: list[str],
    *,
    seeds: list[int],
    size: int,
    steps: int,
    guidance: float,
    device: torch.device,
    autocast: Any,
) -> Image.Image:
    """The grid of `prompts` x `seeds` from `pipeline` as its modules are now. `modules` (the trained ones)
    are put in eval mode for it and back in train mode after; `autocast` is the accelerator's context."""
    for module in modules:
        module.eval()
    rows = []
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.no_grad(),
            autocast,
        ):
            for prompt in prompts:
                # CPU generators, one per image, as `loracap generate` seeds: the same starting noise on
                # any device, so a grid's image can be drawn again from the LoRA file.
                generators = [torch.Generator().manual_seed(s) for s in seeds]
                result = pipeline(
                    prompt=[prompt] * len(seeds),
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=size,
                    width=size,
                )
                rows.append(list(result.images))
    finally:
        for module in modules:
            module.train()
    return grid(rows)
