"""Scale-out throughput: `--engine ray` against the local engine, and (on a CUDA GPU) vLLM against loracap's
transformers backend and the per-image loop.

    python benchmarks/scale_out.py --images 2000                  # ray vs local, tiny Florence-2, CPU
    python benchmarks/scale_out.py --compare vllm --images 256    # CUDA: Qwen2.5-VL-3B dimensions

`--compare ray`: both engines caption the same N generated JPEGs with the same random-weight model, as a
user runs them: `loracap caption DIR --existing overwrite` in a fresh process each, one with `--engine ray`
(which starts its own local Ray), so model loading, Ray's start-up and writing the caption files are all
in the wall time. Runs interleave (local, ray, repeated) and medians are reported. The last line is
`ratio <ray images/s / local images/s>`: the Ray engine's overhead on one machine (goal: at least 0.9 at
10k images).

`--compare vllm`: Qwen2.5-VL-3B-size random weights (`caption_throughput.build_qwen25_vl_3b`), a fixed 50
new tokens per caption; the per-image loop, loracap on transformers (`--engine local`) and loracap on vLLM
(`--engine vllm`) in this process, model loading excluded. Goal: at least 300 images/s with vLLM on one
H100. The last line is `ratio <vllm images/s / transformers images/s>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Small JPEGs of smooth noise in a few aspect ratios (decoding stays a small part of the time)."""
    rng = np.random.default_rng(seed)
    sizes = [(320, 240), (240, 320), (300, 300), (400, 225)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90
        )


def run_engine(engine: str, images: Path, model: Path, args: argparse.Namespace) -> float:
    """Wall seconds of one `loracap caption` process."""
    command = [sys.executable, "-m", "loracap", "caption", str(images), "--model", str(model),
               "--engine", engine, "--existing", "overwrite", "--style", "caption", "--device", args.device,
               "--quiet",
               "--max-new-tokens", str(args.tokens), "--min-new-tokens", str(args.tokens),
               "--batch-size", str(args.batch_size)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def compare_ray(args: argparse.Namespace, work: Path) -> None:
    from caption_throughput import build_model

    images = work / "images"
    images.mkdir()
    make_images(images, args.images)
    model = build_model(args.arch, "tiny", work / "model", args.device)
    print(f"setup: {args.images} images, tiny {args.arch}, {args.tokens} tokens each, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, {args.repeats} repeats")  # fmt: skip
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(args.repeats):
        for engine in times:
            times[engine].append(run_engine(engine, images, model, args))
            print(f"{engine}: {times[engine][-1]:.1f} s", flush=True)
    rates = {engine: args.images / statistics.median(seconds) for engine, seconds in times.items()}
    for engine, rate in rates.items():
        print(f"{engine}: {rate:.2f} images/s (median of {len(times[engine])}, process start to exit)")
    print(f"ratio {rates['ray'] / rates['local']:.3f}")


def compare_vllm(args: argparse.Namespace, work: Path) -> None:
    import torch
    from caption_throughput import Loop, build_qwen25_vl_3b
    from caption_throughput import make_images as photo_images

    from loracap.backends import GenerationSettings, load_backend
    from loracap.pipeline import caption_folder

    if not torch.cuda.is_available():
        raise SystemExit("--compare vllm needs a CUDA GPU: not measured here")
    images = work / "images"
    images.mkdir()
    paths = photo_images(images, args.images)
    model = build_qwen25_vl_3b(work / "model", device="cuda")
    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    rates: dict[str, float] = {}
    for engine in ("local", "vllm"):
        backend = load_backend(str(model), device="cuda", dtype="bf16") if engine == "local" else None
        backend = backend or load_backend(str(model), engine="vllm")
        run = {"backend": backend, "style": "caption", "generation": settings, "existing": "overwrite",
               "batch_size": args.batch_size, "progress": False}  # fmt: skip
        caption_folder(images, **run)  # warm-up pass
        summary = caption_folder(images, **run)
        rates[engine] = summary.captioned / summary.seconds
        print(f"loracap --engine {engine}: {rates[engine]:.1f} images/s", flush=True)
        del backend
        torch.cuda.empty_cache()
    loop = Loop(model, "qwen2.5-vl", args.tokens, "cuda", torch.bfloat16)
    timing = loop.run(paths[: min(len(paths), 32)])
    print(f"loop: {timing.images / timing.wall:.1f} images/s")
    print(f"ratio {rates['vllm'] / rates['local']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", default="ray", choices=("ray", "vllm"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="florence2", help="--compare ray: the tiny test-kit model")
    parser.add_argument("--tokens", type=int, default=20, help="fixed decode length per caption")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loracap-scale-") as tmp:
        (compare_ray if args.compare == "ray" else compare_vllm)(args, Path(tmp))


if __name__ == "__main__":
    main()
