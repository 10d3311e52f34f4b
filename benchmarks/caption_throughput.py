"""Captioning throughput: loracap's pipeline against the per-image loop and transformers' batched pipeline.

All three caption the same N generated JPEGs with the same random-weight model, greedy decoding, and a
fixed decode length (min_new_tokens == max_new_tokens) so random weights cost what trained ones do.
Model loading is excluded from every timing; decoding the JPEG files is included, and for loracap so is
writing the caption files.

- **loop**: the model card's per-image loop: `Image.open` (full size), one processor call, one `generate`.
- **pipeline**: transformers' `pipeline("image-text-to-text")` over the same files at loracap's batch size:
  batched `generate`, but files decoded at full size in the calling thread.
- **loracap**: `caption_folder` (what `loracap caption` runs): batches, decodes JPEGs at reduced scale in
  worker threads ahead of the model, post-processes and writes files.

Each side's time is split into decode (file to RGB image), prepare (the processor) and generate (the
model); for loracap, decode and prepare run in threads beside generate, so they are summed thread time
and the wall time is less than the sum. `decode alone` times both kinds of decoding on one thread.
With `--repeats N` the sides run in turn N times and medians are reported. The last line printed is
`ratio <loracap images/s / loop images/s>` (when the loop runs).

    python benchmarks/caption_throughput.py --arch florence2 --size tiny --images 64
    python benchmarks/caption_throughput.py --arch florence2 --size full --images 8 --device cuda
    python benchmarks/caption_throughput.py --arch qwen2-vl --size tiny --images 64
    python benchmarks/caption_throughput.py --arch qwen2.5-vl --size full --device cuda   # 3B dimensions

Chat VLMs (llava, qwen2-vl, qwen2.5-vl, qwen3-vl, idefics3) get the `caption` style's instruction on
every side through the model's chat template.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loracap.backends import GenerationSettings, caption_images, load_backend
from loracap.config import setting_names
from loracap.pipeline import CaptionConfig, caption_folder
from loracap.styles import load_style, render_prompt
from loracap.testing import make_tiny_model

CHAT_ARCHS = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "idefics3")
PROMPT = render_prompt(load_style("caption"))
# Florence-2's task token; BLIP captions without a prompt, and its processor's empty text starts the
# decoder where no text would ([CLS], the trailing [SEP] dropped by its generate).
PIPELINE_TEXT = {"florence2": "<CAPTION>", "blip": ""}


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


# Qwen/Qwen2.5-VL-3B-Instruct's published dimensions (3.75 B parameters).
QWEN25_VL_3B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def build_qwen25_vl_3b(out: Path, device: str = "cpu") -> Path:
    """Qwen2.5-VL-3B's dimensions with random weights (bf16, ~7.5 GB), built on `device`: the test kit's
    tiny Qwen2.5-VL supplies the tokenizer (small; the embedding keeps its 151,936 rows), chat template
    and processor class. Images are capped at loracap's Qwen pixel bound in the saved image processor, so
    every side sees the same image tokens (~1,000 to 1,300 per photo here)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from loracap.backends.chat_vlm import QWEN_MAX_PIXELS

    make_tiny_model("qwen2.5-vl", out)
    tiny = json.loads((out / "config.json").read_text())
    ids = {
        k: tiny[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    text = {
        **QWEN25_VL_3B_TEXT,
        **{k: tiny["text_config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=QWEN25_VL_3B_VISION, tie_word_embeddings=True, **ids
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = type(model.generation_config).from_pretrained(out)
    model.save_pretrained(out)
    del model
    processor_file = out / "preprocessor_config.json"
    saved = json.loads(processor_file.read_text())
    patch, merge = QWEN25_VL_3B_VISION["patch_size"], QWEN25_VL_3B_VISION["spatial_merge_size"]
    side = patch * merge
    saved.update(
        patch_size=patch,
        merge_size=merge,
        size={"shortest_edge": side * side, "longest_edge": QWEN_MAX_PIXELS},
    )
    processor_file.write_text(json.dumps(saved, indent=2) + "\n")
    return out


def build_model(arch: str, size: str, out: Path, device: str) -> Path:
    if arch == "qwen2.5-vl" and size == "full":
        return build_qwen25_vl_3b(out, device)
    return make_tiny_model(arch, out, size=size)


@dataclass
class Timing:
    """One side's run: seconds in all and per part (None: not measured on that side)."""

    images: int
    wall: float
    decode: float | None = None
    prepare: float | None = None
    generate: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.wall


class Clock:
    """Seconds spent in named parts, summed over threads. A part entered again inside itself (a recursive
    function, such as transformers' `fetch_images`) counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._inside = threading.local()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        inside = self._inside.__dict__.setdefault("parts", set())
        if name in inside:
            yield
            return
        inside.add(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            inside.discard(name)
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return timed


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate_kwargs(tokens: int) -> dict:
    return {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": 1, "do_sample": False}


def _chat_text(processor: Any) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, add_generation_prompt=True, tokenize=False
    )


def _load_transformers(model_dir: Path, arch: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The model and processor as the model cards load them. Chat processors come from loracap's loader
    only because the stock one needs torchvision for Qwen2-VL / SmolVLM; the class is the same."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        BlipForConditionalGeneration,
        Florence2ForConditionalGeneration,
    )

    if arch in CHAT_ARCHS:
        from loracap.backends.chat_vlm import load_processor

        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        processor, model_class = load_processor(model_dir, model_type), AutoModelForImageTextToText
    else:
        processor = AutoProcessor.from_pretrained(model_dir)
        classes = {"florence2": Florence2ForConditionalGeneration, "blip": BlipForConditionalGeneration}
        model_class = classes[arch]
    return model_class.from_pretrained(model_dir, dtype=dtype).to(device).eval(), processor


class Loop:
    """One processor call and one generate per image, as the model cards show."""

    def __init__(self, model_dir: Path, arch: str, tokens: int, device: str, dtype: torch.dtype) -> None:
        self.arch, self.device, self.kwargs = arch, device, _generate_kwargs(tokens)
        self.model, self.processor = _load_transformers(model_dir, arch, device, dtype)
        self.dtype, self.warm = dtype, False
        if arch in CHAT_ARCHS:
            self.text = _chat_text(self.processor)
            tokenizer = self.processor.tokenizer
            self.kwargs["pad_token_id"] = tokenizer.pad_token_id or tokenizer.eos_token_id
            self.nested = json.loads((model_dir / "config.json").read_text())["model_type"] == "idefics3"

    def caption(self, path: Path, clock: Clock) -> str:
        with clock.part("decode"):
            image = Image.open(path).convert("RGB")
        with clock.part("prepare"):
            if self.arch in CHAT_ARCHS:
                images = [[image]] if self.nested else [image]
                inputs = self.processor(text=[self.text], images=images, return_tensors="pt")
            elif self.arch == "florence2":
                inputs = self.processor(text="<CAPTION>", images=image, return_tensors="pt")
            else:
                inputs = self.processor(images=image, return_tensors="pt")
            inputs = inputs.to(self.device, self.dtype)  # the dtype applies to floating-point inputs only
        with clock.part("generate"):
            out = self.model.generate(**inputs, **self.kwargs)
            _sync(self.device)
        if self.arch in CHAT_ARCHS:
            new = out[:, inputs["input_ids"].shape[1] :]
            return self.processor.batch_decode(new, skip_special_tokens=True)[0]
        if self.arch == "florence2":
            text = self.processor.batch_decode(out, skip_special_tokens=False)[0]
            return self.processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)
        return self.processor.decode(out[0], skip_special_tokens=True)

    def run(self, paths: list[Path]) -> Timing:
        with torch.inference_mode():
            if not self.warm:  # once: first-call allocations and kernel selection
                self.caption(paths[0], Clock())
                self.warm = True
            clock = Clock()
            _sync(self.device)
            start = time.perf_counter()
            for path in paths:
                self.caption(path, clock)
            _sync(self.device)
            wall = time.perf_counter() - start
        s = clock.seconds
        return Timing(len(paths), wall, s["decode"], s["prepare"], s["generate"])


class Pipeline:
    """transformers' `pipeline("image-text-to-text")` over the files, `batch_size` at a time."""

    def __init__(
        self, model_dir: Path, arch: str, tokens: int, device: str, dtype: torch.dtype, batch_size: int
    ) -> None:
        from transformers import pipeline

        self.arch, self.device, self.batch_size = arch, device, batch_size
        self.kwargs = _generate_kwargs(tokens)
        model, processor = _load_transformers(model_dir, arch, device, dtype)
        self.pipe = pipeline("image-text-to-text", model=model, processor=processor, device=model.device)
        self.warm = False

    def _inputs(self, paths: list[Path]) -> dict:
        if self.arch in CHAT_ARCHS:

            def chat(path: Path) -> list[dict]:
                content = [{"type": "image", "path": str(path)}, {"type": "text", "text": PROMPT}]
                return [{"role": "user", "content": content}]

            return {"text": [chat(p) for p in paths]}
        # A generator: a list of dicts would be read as one chat.
        return {"images": ({"images": str(p), "text": PIPELINE_TEXT[self.arch]} for p in paths)}

    @contextmanager
    def _clocked(self, clock: Clock) -> Iterator[None]:
        """Time the pipeline's parts: image loading (full size), preprocess (loading, processor), generate."""
        import transformers.pipelines.image_text_to_text as module

        pipe, image_processor = self.pipe, self.pipe.processor.image_processor
        load_images, fetch_images = module.load_images, image_processor.fetch_images
        preprocess, forward = pipe.preprocess, pipe._forward
        module.load_images = clock.wrap("decode", load_images)  # Florence-2, BLIP
        image_processor.fetch_images = clock.wrap("decode", fetch_images)  # chat templates load images here
        pipe.preprocess, pipe._forward = clock.wrap("preprocess", preprocess), clock.wrap("generate", forward)
        try:
            yield
        finally:
            module.load_images = load_images
            del image_processor.fetch_images, pipe.preprocess, pipe._forward

    def _call(self, paths: list[Path]) -> list:
        inputs = self._inputs(paths)
        kwargs = {"batch_size": self.batch_size, "generate_kwargs": self.kwargs, "return_full_text": False}
        if "text" in inputs:
            return list(self.pipe(text=inputs["text"], **kwargs))
        return list(self.pipe(inputs["images"], **kwargs))

    def run(self, paths: list[Path]) -> Timing:
        with torch.inference_mode():
            if not self.warm:  # once, at the batch shape used below
                self._call(paths[: self.batch_size])
                self.warm = True
            clock = Clock()
            _sync(self.device)
            with self._clocked(clock):
                start = time.perf_counter()
                captions = self._call(paths)
                _sync(self.device)
                wall = time.perf_counter() - start
        assert len(captions) == len(paths)
        s = clock.seconds
        return Timing(
            len(paths), wall, s.get("decode"), s["preprocess"] - s.get("decode", 0.0), s["generate"]
        )


class Loracap:
    """`caption_folder`, which `loracap caption` runs, on an already loaded backend."""

    def __init__(
        self,
        model_dir: Path,
        images_dir: Path,
        tokens: int,
        device: str,
        dtype: str,
        batch_size: int | None,
        workers: int,
        static_cache: bool = False,
    ) -> None:
        self.images_dir, self.device, self.workers = images_dir, device, workers
        self.backend = load_backend(str(model_dir), device=device, dtype=dtype)
        if static_cache:
            self.backend.static_cache = True  # Florence-2 only: a static KV cache, compiled on CUDA
        self.settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
        self.batch_size = batch_size or self.backend.default_batch_size
        self.mode, self.prompt = ("*", PROMPT) if self.backend.instructions else ("caption", None)
        self.warmup_s: float | None = None

    def run(self, paths: list[Path]) -> Timing:
        import loracap.inputs.prefetch as prefetch

        backend = self.backend
        if self.warmup_s is None:  # once, at the batch shape used; it compiles the decoder where asked to
            warm = [Image.new("RGB", (640, 480), "grey")] * self.batch_size
            started = time.perf_counter()
            caption_images(backend, warm, self.mode, self.settings, self.prompt)
            _sync(self.device)
            self.warmup_s = time.perf_counter() - started
            print(f"loracap warm-up batch: {self.warmup_s:.1f} s", flush=True)
        clock, textless = Clock(), []
        load_image, prepare, generate = prefetch.load_image, backend.prepare, backend.generate

        def generate_text(inputs: Any, settings: GenerationSettings) -> list[str]:
            # Random weights at full size mostly pick ids the small test tokenizer has no text for. Such a
            # caption cost the model the same 50 tokens; a placeholder stands in for it so the run goes on
            # as with a real model (loracap stops a run whose first captions all come back empty).
            captions = generate(inputs, settings)
            textless.extend(c for c in captions if not any(ch.isalnum() for ch in c))
            return [c if any(ch.isalnum() for ch in c) else "random weights wrote no text" for c in captions]

        prefetch.load_image = clock.wrap("decode", load_image)
        backend.prepare = clock.wrap("prepare", prepare)
        backend.generate = clock.wrap("generate", generate_text)
        threads = torch.get_num_threads()
        # Every side runs with the same torch threads (a loracap run otherwise picks its own count).
        same_threads = {"threads": threads} if "threads" in setting_names(CaptionConfig) else {}
        try:
            summary = caption_folder(
                self.images_dir,
                backend=backend,
                style="caption",
                generation=self.settings,
                existing="overwrite",
                batch_size=self.batch_size,
                workers=self.workers,
                progress=False,
                errors_file=self.images_dir.parent / "errors.jsonl",
                **same_threads,
            )
        finally:
            prefetch.load_image = load_image
            del backend.prepare, backend.generate
            torch.set_num_threads(threads)
        assert summary.captioned == summary.total == len(paths), summary.describe()
        if textless:
            print(f"note: {len(textless)} of {summary.total} random-weight captions had no text (see above)")
        s = clock.seconds
        return Timing(summary.total, summary.seconds, s["decode"], s["prepare"], s["generate"])


def decode_alone(paths: list[Path], min_side: int) -> tuple[float, float]:
    """Seconds per image on this thread: full-size decoding as the loop and the pipeline do it, and
    loracap's (reduced scale when the model's input is much smaller than the file)."""
    from loracap.inputs import load_image

    def per_image(decode: Callable[[Path], Any]) -> float:
        start = time.perf_counter()
        for path in paths:
            decode(path)
        return (time.perf_counter() - start) / len(paths)

    full = per_image(lambda p: Image.open(p).convert("RGB"))
    return full, per_image(lambda p: load_image(p, min_side=min_side or None))


def median_timing(runs: list[Timing]) -> Timing:
    def med(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else statistics.median(values)

    return Timing(
        runs[0].images,
        statistics.median(r.wall for r in runs),
        *(med([getattr(r, part) for r in runs]) for part in ("decode", "prepare", "generate")),
    )


def report(
    results: dict[str, Timing], names: dict[str, str], decode: tuple[float, float], repeats: int
) -> str:
    """The table, and ratios that say where the gain comes from; the last line is `ratio <loracap / loop>`."""

    def ms(seconds: float | None, images: int) -> str:
        return f"{'-' if seconds is None else f'{seconds / images * 1e3:.1f}':>9}"

    full, reduced = decode
    runs = f"medians of {repeats} runs, " if repeats > 1 else ""
    lines = [
        f"decode alone, one thread: full size {full * 1e3:.1f} ms/image, loracap's reduced scale "
        f"{reduced * 1e3:.1f} ms/image ({full / reduced:.1f}x cheaper)",
        f"{'side':<36}{'decode':>9}{'prepare':>9}{'generate':>9}{'wall':>9}  images/s  ({runs}ms per image)",
    ]
    for name, t in results.items():
        parts = "".join(ms(x, t.images) for x in (t.decode, t.prepare, t.generate, t.wall))
        lines.append(f"{names[name]:<36}{parts}  {t.rate:8.2f}")
    ours, per_image = results["loracap"], {name: t.generate / t.images for name, t in results.items()}
    if "pipeline" in results:
        lines.append(
            f"generate per image, pipeline / loracap: {per_image['pipeline'] / per_image['loracap']:.2f}x "
            "(same batches: loracap's per-step savings, less its decode threads' competition for the CPU)"
        )
    if "loop" in results and "pipeline" in results:
        lines.append(
            f"generate per image, loop / pipeline: {per_image['loop'] / per_image['pipeline']:.2f}x "
            "(batching alone)"
        )
    lines.append(
        f"loracap wall / its generate time: {ours.wall / ours.generate:.2f} "
        "(1.00: decoding, preprocessing and writing all hidden behind the model)"
    )
    if "pipeline" in results:
        lines.append(f"ratio vs pipeline {ours.rate / results['pipeline'].rate:.2f}")
    if "loop" in results:
        lines.append(
            f"generate per image, loop / loracap: {per_image['loop'] / per_image['loracap']:.2f}x "
            "(batching and loracap's per-step savings)"
        )
        lines.append(f"ratio {ours.rate / results['loop'].rate:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="florence2", choices=("florence2", "blip", *CHAT_ARCHS))
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"), help="full: the published size")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--loop-images", type=int, help="images the per-image loop captions (default: all)")
    parser.add_argument("--tokens", type=int, default=50, help="fixed decode length per caption")
    parser.add_argument(
        "--batch-size", type=int, help="loracap's and the pipeline's batch (default: loracap's)"
    )
    parser.add_argument("--workers", type=int, default=4, help="loracap decode threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--sides", default="loop,pipeline,loracap", help="the sides to run besides loracap")
    parser.add_argument(
        "--static-cache", action="store_true", help="Florence-2: loracap decodes with a static cache"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the sides in turn this many times; medians"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.sides.split(","))
    if not wanted <= {"loop", "pipeline", "loracap"}:
        parser.error(f"--sides: choose from loop, pipeline, loracap, not {args.sides!r}")
    if args.static_cache and args.arch != "florence2":
        parser.error("--static-cache is for Florence-2")

    from loracap.backends.device import choose_placement

    placement = choose_placement(args.device, args.dtype)
    dtype_name = placement.describe().split()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model_dir = build_model(args.arch, args.size, tmp / "model", args.device)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        setup_s = time.perf_counter() - started
        print(
            f"setup: {args.arch} {args.size} model and {len(paths)} images in {setup_s:.1f} s; "
            f"{placement.describe()}, {args.tokens} tokens a caption, {torch.get_num_threads()} threads",
            flush=True,
        )
        ours = Loracap(
            model_dir,
            tmp / "images",
            args.tokens,
            args.device,
            dtype_name,
            args.batch_size,
            args.workers,
            args.static_cache,
        )
        sides: dict[str, Any] = {}
        if "loop" in wanted:
            sides["loop"] = Loop(model_dir, args.arch, args.tokens, args.device, placement.dtype)
        errors: dict[str, str] = {}
        if "pipeline" in wanted:
            try:
                sides["pipeline"] = Pipeline(
                    model_dir, args.arch, args.tokens, args.device, placement.dtype, ours.batch_size
                )
            except Exception as exc:  # noqa: BLE001 - a model the pipeline cannot batch: say so, measure the rest
                errors["pipeline"] = f"{type(exc).__name__}: {exc}"
        sides["loracap"] = ours
        loop_paths = paths[: args.loop_images] if args.loop_images else paths
        runs: dict[str, list[Timing]] = {name: [] for name in sides}
        for _ in range(args.repeats):  # in turn, so a change in the machine's load hits every side alike
            for name, side in list(sides.items()):
                try:
                    runs[name].append(side.run(loop_paths if name == "loop" else paths))
                except Exception as exc:  # noqa: BLE001
                    if name != "pipeline":
                        raise
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    del sides[name], runs[name]
        decode = decode_alone(paths[: min(len(paths), 16)], ours.backend.image_side)

    results = {name: median_timing(r) for name, r in runs.items()}
    names = {
        "loop": "loop (batch 1)",
        "pipeline": f"transformers pipeline (batch {ours.batch_size})",
        "loracap": f"loracap (batch {ours.batch_size}, {args.workers} threads)",
    }
    for name, error in errors.items():
        print(f"{name}: not measured ({error.splitlines()[0][:200]})")
    print(report(results, names, decode, args.repeats))
    if args.json:
        record = {
            "arch": args.arch,
            "size": args.size,
            "device": args.device,
            "dtype": dtype_name,
            "tokens": args.tokens,
            "batch": ours.batch_size,
            "workers": args.workers,
            "static_cache": args.static_cache,
            "loracap_warmup_s": ours.warmup_s,
            "repeats": args.repeats,
            "decode_alone_ms": [decode[0] * 1e3, decode[1] * 1e3],
            "sides": {name: {**asdict(t), "rate": t.rate} for name, t in results.items()},
            "errors": errors,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
