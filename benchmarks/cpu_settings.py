"""Torch threads and batch size on a CPU: loracap's old defaults against its automatic choice (issue 14).

    python benchmarks/cpu_settings.py --size tiny --images 64 --rounds 5
    python benchmarks/cpu_settings.py --size full --images 8 --tokens 20 --rounds 2

Two settings caption the same generated JPEGs with the same random-weight Florence-2 (tiny, or the
Florence-2-large architecture with `--size full`), greedy, with a fixed decode length:

- before: torch's own thread count (every core) and 4 images a batch, what loracap did until issue 14;
- auto: `threads` and `batch_size` left to loracap (the CPUs free of decode threads; the batch that fits
  in free memory by what the first batch measured);
- with `--settings before,threads,batch,auto`, also each choice alone (`threads`: chosen threads at
  batch 4; `batch`: torch's threads at the chosen batch size).

Each run is a fresh process (the thread count is process-wide, and so is the peak RSS), the two settings
take turns (before, auto, before, auto, ...) so a machine shared with other work loads both alike, and the
medians are compared. images/s is the run's own figure (model loading excluded, decoding and writing
included); peak RSS is the process's, the model's weights included. The load average is printed with each
run: say it with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "before": {"threads": "torch", "batch_size": 4},
    "auto": {"threads": None, "batch_size": "auto"},
    "threads": {"threads": None, "batch_size": 4},  # only the thread count chosen
    "batch": {"threads": "torch", "batch_size": "auto"},  # only the batch size chosen
}


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-sized JPEGs of smooth noise in a few sizes and aspect ratios, as caption_throughput.py makes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(1024, 768), (768, 1024), (1200, 1200), (1600, 900)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
            folder / f"{i:04d}.jpg", quality=90
        )


def one_run(model: str, images: str, setting: str, tokens: int, workers: int) -> dict:
    """Caption `images` once with `setting`, in this process; what it measured."""
    import logging

    import torch

    from loracap.backends import GenerationSettings, load_backend
    from loracap.pipeline import caption_folder

    chosen: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            chosen.append(record.getMessage())

    logging.getLogger("loracap").addHandler(Said())
    logging.getLogger("loracap").setLevel(logging.INFO)
    threads = SETTINGS[setting]["threads"]
    if threads == "torch":
        threads = torch.get_num_threads()  # torch's default, read before anything changes it
    backend = load_backend(model, device="cpu")
    generate, textless = backend.generate, []

    def generate_text(inputs, settings):
        # Random weights at full size mostly pick ids the small test tokenizer has no text for; such a
        # caption cost the model the same decode steps. A placeholder stands in, so the run goes on as with
        # a real model (loracap stops a run whose first captions all come back empty).
        captions = generate(inputs, settings)
        textless.extend(c for c in captions if not any(ch.isalnum() for ch in c))
        return [c if any(ch.isalnum() for ch in c) else "random weights wrote no text" for c in captions]

    backend.generate = generate_text
    load = os.getloadavg()[0]
    summary = caption_folder(
        images,
        backend=backend,
        style="caption",
        existing="overwrite",
        generation=GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens),
        batch_size=SETTINGS[setting]["batch_size"],
        threads=threads,
        workers=workers,
        progress=False,
        errors_file=Path(images).parent / f"errors-{setting}.jsonl",
    )
    assert summary.captioned == summary.total, summary.describe()
    batch = next((m.split(" (")[0] for m in chosen if m.startswith("batch size")), "batch size 4")
    return {
        "setting": setting,
        "images_per_s": summary.total / summary.seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "threads": torch.get_num_threads(),
        "batch": batch.removeprefix("batch size "),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "textless": len(textless),
        "said": [m for m in chosen if m.startswith(("batch size", "using", "out of memory"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=50, help="fixed decode length per caption")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each setting, taking turns")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (loracap's default)")
    parser.add_argument("--model", help="a Florence-2 folder to use instead of building one")
    parser.add_argument("--settings", default="before,auto", help=f"which, in turn: {', '.join(SETTINGS)}")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, one JSON line
        print(json.dumps(one_run(*args.one, args.setting, args.tokens, args.workers)))
        return

    from loracap.backends.resources import available_cpus, available_memory
    from loracap.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_tiny_model("florence2", Path(tmp) / "model", size=args.size))
        images = Path(tmp) / "images"
        images.mkdir()
        make_images(images, args.images)
        free = (available_memory() or 0) / 2**30
        print(
            f"florence2 {args.size}, {args.images} images, {args.tokens} tokens a caption, {args.workers} "
            f"decode threads; {os.cpu_count()} CPUs, {available_cpus()} available, {free:.1f} GB free"
        )
        chosen = args.settings.split(",")
        results: dict[str, list[dict]] = {name: [] for name in chosen}
        for round_ in range(args.rounds):
            for setting in chosen:
                command = [sys.executable, __file__, "--one", model, str(images), "--setting", setting]
                command += ["--tokens", str(args.tokens), "--workers", str(args.workers)]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{setting} run failed:\n{done.stderr[-3000:]}")
                out = done.stdout
                seconds = time.perf_counter() - started
                run = json.loads(out.strip().splitlines()[-1])
                results[setting].append(run)
                print(
                    f"round {round_ + 1} {setting:7}: {run['images_per_s']:.3f} images/s, {run['threads']} "
                    f"threads, batch {run['batch']}, peak RSS {run['peak_rss_gb']:.2f} GB, load "
                    f"{run['load_before']:.1f}->{run['load_after']:.1f} ({seconds:.0f} s with loading)",
                    flush=True,
                )
        base = results[chosen[0]]
        for setting, runs in results.items():
            median = statistics.median(r["images_per_s"] for r in runs)
            rounds = [r["images_per_s"] / b["images_per_s"] for r, b in zip(runs, base, strict=True)]
            print(
                f"median {setting:7}: {median:.3f} images/s, peak RSS "
                f"{statistics.median(r['peak_rss_gb'] for r in runs):.2f} GB; ratio to {chosen[0]} "
                f"{statistics.median(rounds):.2f} (per round {', '.join(f'{x:.2f}' for x in rounds)})"
            )


if __name__ == "__main__":
    main()
