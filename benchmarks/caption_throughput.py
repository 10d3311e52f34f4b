"""Captioning throughput: loracap's pipeline against the per-image loop from the model cards.

Both caption the same N generated JPEGs with the same random-weight model, greedy decoding, and a
fixed decode length (min_new_tokens == max_new_tokens) so random weights cost what trained ones do.
Model loading is excluded from both timings; decoding the JPEG files and, for loracap, writing the
caption files are included. The last line printed is `ratio <loracap images/s / baseline images/s>`.

    python benchmarks/caption_throughput.py --arch florence2 --size tiny --images 64
    python benchmarks/caption_throughput.py --arch florence2 --size full --images 8 --device cuda
    python benchmarks/caption_throughput.py --arch qwen2-vl --size tiny --images 64

Chat VLMs (llava, qwen2-vl, qwen2.5-vl, qwen3-vl, idefics3) get the `caption` style's instruction on
both sides; the baseline is the model card loop: chat template, processor, generate, decode the new
tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loracap.backends import GenerationSettings, caption_images, load_backend
from loracap.pipeline import caption_folder
from loracap.styles import load_style, render_prompt
from loracap.testing import make_tiny_model

CHAT_ARCHS = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "idefics3")
PROMPT = render_prompt(load_style("caption"))


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-sized JPEGs of smooth noise, in a few sizes and aspect ratios like a real dataset."""
    rng = np.random.default_rng(seed)
    sizes = [(1024, 768), (768, 1024), (1200, 1200), (1600, 900)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        paths.append(folder / f"img_{i:04d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def baseline_loop(
    model_dir: Path, arch: str, paths: list[Path], tokens: int, device: str, dtype: torch.dtype
):
    """One processor call and one generate per image, as the model cards show."""
    from transformers import AutoProcessor, BlipForConditionalGeneration, Florence2ForConditionalGeneration

    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": 1, "do_sample": False}
    if arch in CHAT_ARCHS:
        return _timed(_chat_loop(model_dir, dtype, device, kwargs), paths, device)
    model_class = {"florence2": Florence2ForConditionalGeneration, "blip": BlipForConditionalGeneration}[arch]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = model_class.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def caption(path: Path) -> str:
        image = Image.open(path).convert("RGB")
        if arch == "florence2":
            inputs = processor(text="<CAPTION>", images=image, return_tensors="pt").to(device, dtype)
            ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], **kwargs)
            text = processor.batch_decode(ids, skip_special_tokens=False)[0]
            return processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)[
                "<CAPTION>"
            ]
        inputs = processor(images=image, return_tensors="pt").to(device, dtype)
        return processor.decode(model.generate(**inputs, **kwargs)[0], skip_special_tokens=True)

    return _timed(caption, paths, device)


def _chat_loop(model_dir: Path, dtype: torch.dtype, device: str, kwargs: dict):
    """The chat models' card loop. The processor comes from loracap's loader only because the stock one
    needs torchvision for Qwen2-VL / SmolVLM; it is the same processor class either way."""
    import json

    from transformers import AutoModelForImageTextToText

    from loracap.backends.chat_vlm import load_processor

    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    processor = load_processor(model_dir, model_type)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, add_generation_prompt=True, tokenize=False
    )
    pad = processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id

    def caption(path: Path) -> str:
        image = Image.open(path).convert("RGB")
        images = [[image]] if model_type in ("idefics3", "smolvlm") else [image]
        inputs = processor(text=[text], images=images, return_tensors="pt").to(device)
        out = model.generate(**inputs, **kwargs, pad_token_id=pad)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    return caption


def _timed(caption, paths: list[Path], device: str) -> float:
    with torch.inference_mode():
        caption(paths[0])  # warm-up: first-call allocations and kernel selection
        _sync(device)
        start = time.perf_counter()
        for path in paths:
            caption(path)
        _sync(device)
        return len(paths) / (time.perf_counter() - start)


def loracap_pipeline(
    model_dir: Path,
    images_dir: Path,
    tokens: int,
    device: str,
    dtype: str,
    batch_size: int | None,
    workers: int,
) -> tuple[float, int]:
    backend = load_backend(str(model_dir), device=device, dtype=dtype)
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
    warm = [Image.new("RGB", (640, 480), "grey")] * (batch_size or backend.default_batch_size)
    mode, prompt = ("*", PROMPT) if backend.instructions else ("caption", None)
    caption_images(backend, warm, mode, settings, prompt)  # warm-up at the batch shape used below
    _sync(device)
    summary = caption_folder(
        images_dir,
        backend=backend,
        style="caption",
        generation=settings,
        existing="overwrite",
        batch_size=batch_size,
        workers=workers,
        progress=False,
        errors_file=images_dir.parent / "errors.jsonl",
    )
    # Random weights may decode to nothing (the full build pads its vocabulary with ids that have no
    # text); those images still cost a full decode, so they count as processed, and are reported.
    empty = sum(e.stage == "caption" and "empty caption" in e.reason for e in summary.errors)
    assert summary.captioned + empty == summary.total, summary.describe()
    if empty:
        print(
            f"note: {empty} of {summary.total} random-weight captions decoded empty (expected at full size)"
        )
    return summary.total / summary.seconds, batch_size or backend.default_batch_size


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="florence2", choices=("florence2", "blip", *CHAT_ARCHS))
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=50, help="fixed decode length per caption")
    parser.add_argument("--batch-size", type=int, help="loracap batch size (default: the backend's)")
    parser.add_argument("--workers", type=int, default=4, help="loracap decode threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args()

    from loracap.backends.device import choose_placement

    placement = choose_placement(args.device, args.dtype)
    dtype_name = placement.describe().split()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model_dir = make_tiny_model(args.arch, tmp / "model", size=args.size)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        setup_s = time.perf_counter() - started
        print(
            f"setup: {args.arch} {args.size} model and {len(paths)} images in {setup_s:.1f} s; "
            f"{placement.describe()}, {args.tokens} tokens a caption, {torch.get_num_threads()} threads"
        )

        base = baseline_loop(model_dir, args.arch, paths, args.tokens, args.device, placement.dtype)
        print(f"baseline (one generate per image): {base:.2f} images/s")
        ours, batch = loracap_pipeline(
            model_dir, tmp / "images", args.tokens, args.device, dtype_name, args.batch_size, args.workers
        )
        print(f"loracap (batch {batch}, {args.workers} decode threads): {ours:.2f} images/s")
        print(f"ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
