"""CLIP scoring throughput: `loracap.quality.clipscore.clip_scores` against the per-pair loop.

Both score the same N generated photo-sized JPEGs with the same random-weight CLIP model. The baseline is
the model-card way: open the image, one processor call and one forward pass per pair. loracap batches
pairs and decodes/preprocesses images in worker threads ahead of the model (the look-ahead captioning
uses), decoding JPEGs at reduced size when the model's input is much smaller. The cache is off, and
model loading is excluded from both timings. The last line printed is `ratio <loracap / baseline>`.

    python benchmarks/clipscore_throughput.py --size tiny --images 64
    python benchmarks/clipscore_throughput.py --size full --images 32            # ViT-L/14 dims
    python benchmarks/clipscore_throughput.py --size full --images 256 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from caption_throughput import make_images
from PIL import Image

from loracap.quality.clipscore import clip_scores
from loracap.testing import make_tiny_model

CAPTIONS = ("a photo of a woman in a red coat", "ohwx, 1girl, solo, outdoors, smiling", "a dog on a beach")


def build_full_clip(out: Path) -> Path:
    """openai/clip-vit-large-patch14's dimensions with random weights, and a locally trained tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from loracap.testing.clip_models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
    square = {"height": 224, "width": 224}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=square)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def baseline(model_dir: Path, pairs: list[tuple[Path, str]], device: str) -> float:
    """Seconds for the per-pair loop: open, process, forward, cosine."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for path, caption in pairs:
            image = Image.open(path).convert("RGB")
            inputs = processor(text=[caption], images=image, return_tensors="pt", padding=True)
            out = model(**{k: v.to(device) for k, v in inputs.items()})
            torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    _sync(device)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, help="loracap's batch (default: 64 on a GPU, 8 on a CPU)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        paths = make_images(tmp_path / "images", args.images)
        pairs = [(p, CAPTIONS[i % len(CAPTIONS)]) for i, p in enumerate(paths)]
        model_dir = tmp_path / "clip"
        model_dir.mkdir()
        if args.size == "tiny":
            make_tiny_model("clip", model_dir)
        else:
            build_full_clip(model_dir)

        base_s = baseline(model_dir, pairs, args.device)
        clip_scores(
            pairs[: min(8, len(pairs))], model=str(model_dir), device=args.device, cache=False, progress=False
        )  # fmt: skip - warm-up: first-call allocations, thread start-up
        run = clip_scores(
            pairs,
            model=str(model_dir),
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            cache=False,
            progress=False,
        )
        # run.seconds includes the model load; time the scoring alone by subtracting a load-only call.
        load_s = _load_seconds(model_dir, args.device)
        ours_s = max(run.seconds - load_s, 1e-9)

    base_rate, ours_rate = args.images / base_s, args.images / ours_s
    print(f"device={args.device} size={args.size} images={args.images} batch={args.batch_size or 'default'}")
    print(f"baseline per-pair loop: {base_rate:.2f} images/s")
    print(f"loracap clip_scores:    {ours_rate:.2f} images/s (model load {load_s:.2f}s excluded)")
    print(f"ratio {ours_rate / base_rate:.2f}")


def _load_seconds(model_dir: Path, device: str) -> float:
    from loracap.quality.clipscore import _Scorer

    started = time.perf_counter()
    _Scorer(model_dir, device=device, dtype=None, batch_size=None)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
