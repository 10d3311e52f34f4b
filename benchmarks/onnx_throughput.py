"""onnxruntime vs PyTorch on a CPU: the same ViT-GPT2 captioner, `loracap caption` on the same images with
each backend (fp32 and int8 ONNX), images/s and peak memory of each, ratio last.

    python benchmarks/onnx_throughput.py --size tiny --images 64
    python benchmarks/onnx_throughput.py --size full --images 16      # ViT-GPT2's published dimensions

Random weights, a fixed 20 new tokens per caption (min == max) so every side does the same work (an
image whose tokens decode to no text counts: the model ran for it); model loading and export are
excluded; each side runs in its own process (so peak RSS is its own), one after the other, `--repeats`
times, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import json, sys, time, torch
from loracap.backends import GenerationSettings, load_backend
from loracap.pipeline import caption_folder
model, images, quant = sys.argv[1], sys.argv[2], sys.argv[3] or None
tokens, threads = int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
backend = load_backend(model, device="cpu", quant=quant)
settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
run = dict(backend=backend, generation=settings, existing="overwrite", batch_size=8, workers=1,
           threads=threads, progress=False)
caption_folder(images, **run)  # warm-up
summary = caption_folder(images, **run)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
# Every image went through the model: random weights at full size often write no text, which the run
# counts as a failed image, but the model did the same work for it.
print(json.dumps({"rate": summary.total / summary.seconds, "rss_mb": rss, "empty": summary.failed}))
"""


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from caption_throughput import make_images

    from loracap.onnx_export import ExportOnnxConfig, export_onnx
    from loracap.testing import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loracap-onnx-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        make_images(work / "images", args.images)
        model = make_tiny_model("vit-gpt2", work / "model", size=args.size)
        export = export_onnx(
            ExportOnnxConfig(model=str(model), out=work / "onnx", quantize="int8", check_images=2)
        )
        sizes = {name: size / 1e6 for name, size in export["files"].items()}
        print(
            f"setup: {args.images} images, {args.size} ViT-GPT2, {args.tokens} tokens, {args.threads} threads"
        )
        print("sizes (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
        print(f"int8 token agreement: {export['parity']['int8']['token_agreement']:.3f}")
        sides = {"pytorch": (model, ""), "onnx": (work / "onnx", ""), "onnx-int8": (work / "onnx", "int8")}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, (path, quant) in sides.items():
                command = [sys.executable, "-c", RUN, str(path), str(work / "images"), quant,
                           str(args.tokens), str(args.threads)]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # onnxruntime's threads too
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        rates = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
        for name, runs in results.items():
            rss = max(r["rss_mb"] for r in runs)
            print(f"{name}: {rates[name]:.2f} images/s, peak RSS {rss:.0f} MB")
        int8 = rates["onnx-int8"] / rates["pytorch"]
        print(f"ratio {rates['onnx'] / rates['pytorch']:.3f} (int8: {int8:.3f})")


if __name__ == "__main__":
    main()
