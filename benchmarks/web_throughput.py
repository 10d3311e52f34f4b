"""The three ways to run one captioner, side by side on this machine: PyTorch, onnxruntime (Python) and the
browser page (`loracap web`, onnxruntime-web WASM in headless Chromium), images/s and the files each
loads, ratio to PyTorch last.

    python benchmarks/web_throughput.py --model /tmp/pc/ours-0 --onnx /tmp/pc/ours-0-onnx --images 48

MODEL is a PyTorch captioner and ONNX its `loracap export-onnx` folder (benchmarks/onnx_parity.py writes
both). Every side captions the same PNGs one image at a time (the page's way), greedily, after one
warm-up image; PyTorch and onnxruntime get `--threads` threads, the page as many WASM threads as the
browser reports cores, up to 4 (`loracap web` sends the cross-origin isolation headers threads need).
Model loading is excluded everywhere.
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from pathlib import Path


def images(count: int, side: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def python_rate(folder: Path, pictures: list, quant: str | None = None) -> float:
    from loracap.backends import load_backend
    from loracap.backends.base import GenerationSettings

    backend = load_backend(str(folder), device="cpu", quant=quant)
    settings = GenerationSettings()
    backend.generate(backend.prepare(pictures[:1], "caption"), settings)  # warm-up
    started = time.perf_counter()
    for picture in pictures:
        backend.generate(backend.prepare([picture], "caption"), settings)
    return len(pictures) / (time.perf_counter() - started)


def browser_rate(folder: Path, pictures: list, variant: str) -> float:
    import base64

    from playwright.sync_api import sync_playwright

    from loracap.browser import page_files
    from loracap.browser.server import make_server

    server = make_server(page_files(folder), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    payload = []
    for i, picture in enumerate(pictures):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        payload.append([f"{i}.png", base64.b64encode(buffer.getvalue()).decode()])
    drop = """(files) => { const dt = new DataTransfer();
        for (const [name, b64] of files) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          dt.items.add(new File([bytes], name, { type: "image/png" }));
        }
        return dt; }"""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless=new"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/?ep=wasm&variant={variant}")
            page.evaluate("window.loracap.ready")
            page.dispatch_event("#drop", "drop", {"dataTransfer": page.evaluate_handle(drop, payload[:1])})
            page.wait_for_function("window.loracap.done !== undefined")
            page.evaluate("window.loracap.done")  # warm-up
            page.evaluate("window.loracap.done = undefined")
            started = time.perf_counter()
            page.dispatch_event("#drop", "drop", {"dataTransfer": page.evaluate_handle(drop, payload)})
            page.wait_for_function("window.loracap.done !== undefined")
            page.evaluate("window.loracap.done")
            seconds = time.perf_counter() - started
            browser.close()
    finally:
        server.shutdown()
    return len(pictures) / seconds


def main(argv: list[str] | None = None) -> None:
    import json

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    side = json.loads((args.onnx / "preprocessor_config.json").read_text())["size"]["height"]
    pictures = images(args.images, side)
    sizes = {
        q: sum(p.stat().st_size for p in (args.onnx / "onnx").glob("*.onnx") if suffix(p.name) == q)
        for q in ("fp32", "int8")
    }
    torch_size = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    rates = {
        "PyTorch": (python_rate(args.model, pictures), torch_size),
        "onnxruntime fp32": (python_rate(args.onnx, pictures), sizes["fp32"]),
        "onnxruntime int8": (python_rate(args.onnx, pictures, "int8"), sizes["int8"]),
        "browser fp32 (WASM)": (browser_rate(args.onnx, pictures, "fp32"), sizes["fp32"]),
        "browser int8 (WASM)": (browser_rate(args.onnx, pictures, "int8"), sizes["int8"]),
    }
    print(f"{args.images} images of {side} px, one at a time, {args.threads} thread(s): {args.model.name}")
    print("| runs on | images/s | model files | ratio to PyTorch |")
    print("|---|---|---|---|")
    for name, (rate, size) in rates.items():
        print(f"| {name} | {rate:.2f} | {size / 1e6:.1f} MB | {rate / rates['PyTorch'][0]:.2f} |")


def suffix(name: str) -> str:
    if name.endswith("_quantized.onnx"):
        return "int8"
    return "fp16" if name.endswith("_fp16.onnx") else "fp32"


if __name__ == "__main__":
    main()
