"""Steps/s and peak memory of `loracap dreambooth` against diffusers' own DreamBooth-LoRA example script.

    python benchmarks/dreambooth_throughput.py --diffusers-script /path/to/train_dreambooth_lora.py \
        --arch sd15 --size tiny --resolution 32 --repeats 3

Both trainers get the same random-weight pipeline (the test kit's tiny one, or one of the published SD 1.5 /
SDXL / Flux.1-dev size built here), the same images (an images-only folder: diffusers' script reads every
file there as an image), the same instance prompt, the same class images (a pre-filled class folder:
neither generates), resolution, batch, precision, LoRA rank and targets, AdamW at a constant learning
rate, square centre crops (loracap's `--no-bucket` where it has aspect buckets), no validation, no
text-encoder training and no checkpoint before the end. For SDXL pass diffusers'
train_dreambooth_lora_sdxl.py, for Flux train_dreambooth_lora_flux.py. Each trainer runs as its own
process with the same thread count.

LoRA targets: the UNet's attention projections for SD 1.5 / SDXL (both trainers' default); for Flux the
transformer modules diffusers' flux script trains by default (`FLUX_TARGETS`: attention, added-context
attention and both feed-forwards), passed to loracap as `--lora-targets`. Flux also gets what diffusers'
flux script does by default apart from the guidance (set to 1.0 on both sides: loracap's default): a
uniform timestep (sigma) with no shift (`--timestep-sampling uniform --timestep-shift 1.0`), the flux
script's AdamW weight decay 1e-4, T5 prompts padded to 512 tokens (`--max-sequence-length`; loracap's own
default is 256 for a model without a guidance input, such as the tiny one).

Steps/s is (long - short) / (wall time of the long run - wall time of the short run): loading, class-image
scanning, saving and exit cancel out, and neither trainer is instrumented. Runs interleave (loracap short,
diffusers short, loracap long, diffusers long, repeated) and medians are reported, since the machine may
be shared. Peak memory is the process's peak RSS and, on CUDA, torch's peak allocated memory, read at exit
by a small wrapper that runs each trainer in-process (runpy for diffusers' script, `loracap.cli.main`).
diffusers' code is never copied here: its script's path is an argument. The ratio is loracap / diffusers
(above 1: loracap is faster; for memory, above 1: loracap uses more). `--sides` runs one trainer alone.

loracap's caches are off in the plain `loracap` row (`--no-cache-text`; no `--cache-latents`), as neither
diffusers' SD 1.5 nor its Flux script caches (both encode the prompts every step; the SDXL script encodes
its one instance prompt once). `--loracap-variant=--cache-text` (repeatable, any loracap flags) adds a
row of loracap with those flags, timed in the same interleaved runs, with its own ratio.

diffusers' script imports torchvision (for its transforms). Where torchvision cannot be imported (the
PyPI wheel's compiled ops need a CUDA build of torch; a CPU-only torch cannot load them), pass
`--diffusers-pythonpath DIR` with a folder that makes `torchvision.transforms` importable; the
RESULTS.md section says how the CPU figures were taken.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# diffusers' train_dreambooth_lora_flux.py trains these transformer modules when --lora_layers is not given.
FLUX_TARGETS = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,"
    "attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)
FLUX_GUIDANCE = "1.0"
FLUX_T5_TOKENS = "512"  # the flux script's --max_sequence_length default (loracap's for dev; schnell: 256)
FLUX_WEIGHT_DECAY = "1e-4"  # the flux script's --adam_weight_decay default (loracap's is 1e-2)

WRAPPER = r"""
import atexit, json, resource, sys
def _report():
    peak = None
    try:
        import torch
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
    except Exception:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stdout.write("BENCH " + json.dumps({"rss": rss, "cuda": peak}) + "\n")
    sys.stdout.flush()
atexit.register(_report)
kind, argv = sys.argv[1], sys.argv[2:]
if kind == "loracap":
    from loracap.cli import main
    code = main(argv)
    if code:
        raise SystemExit(code)
else:
    import runpy
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


def build_pipeline(arch: str, size: str, folder: Path) -> Path:
    """The random-weight pipeline both trainers load: the test kit's tiny one, or the published size.

    A full-size one is built in a child process, so that neither its memory nor (on a GPU) a CUDA context
    stays with this one while the trainers run, and on the GPU where there is one: each model's own
    initialisation of billions of weights takes minutes on a CPU, seconds on a GPU."""
    if size == "tiny":
        from loracap.testing import make_tiny_model

        return make_tiny_model(arch, folder)
    spawn = multiprocessing.get_context("spawn")
    child = spawn.Process(target=_build_full_size, args=(arch, folder), daemon=True)  # ends with this one
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"building the full-size {arch} pipeline failed (exit {child.exitcode})")
    return folder


def _build_full_size(arch: str, folder: Path) -> None:
    import torch

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        if arch == "flux":
            _full_size_flux(folder)
        else:
            _full_size(arch, folder)


def _full_size(arch: str, folder: Path) -> Path:
    """SD 1.5 (UNet 860M, CLIP-L) or SDXL base (UNet 2.6B, CLIP-L + CLIP-G) dimensions with random weights,
    the published configs; the tokenizer is the test kit's (a smaller vocabulary, which does not change the
    speed of anything but the embedding lookup)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loracap.testing.clip_models import build_clip_tokenizer

    torch.manual_seed(0)
    schedule = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1}  # fmt: skip
    tokenizer = build_clip_tokenizer()

    def clip(hidden: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, projection_dim=hidden, hidden_act=act, vocab_size=len(tokenizer),
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512 if arch == "sd15" else 1024, scaling_factor=0.18215 if arch == "sd15" else 0.13025,
    )  # fmt: skip
    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(clip(768, 12, 12, "quick_gelu")), tokenizer=tokenizer,
            unet=unet, scheduler=PNDMScheduler(**schedule, skip_prk_steps=True), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        tokenizer_2 = build_clip_tokenizer()
        tokenizer_2.pad_token = "!"
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(clip(768, 12, 12, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu")), tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet,
            scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
        )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def _full_size_flux(
    folder: Path, *, double_layers: int = 19, single_layers: int = 38, t5_layers: int = 24
) -> Path:
    """FLUX.1-dev dimensions with random weights, saved in bf16 (33 GB; fp32 would be 67 GB): the
    transformer at `FluxTransformer2DModel`'s defaults (12B: 19 double-stream + 38 single-stream blocks,
    3072 wide, 64 packed input channels) with the guidance embedding dev has, a T5-XXL-size
    `T5EncoderModel` (google/t5-v1_1-xxl: 24 layers, 4096 wide, gated-GELU FFN 10240), CLIP-L for the
    pooled prompt, the Flux VAE (16 latent channels, no quant convs, scaling 0.3611, shift 0.1159) and
    dev's scheduler config (shift 3.0, dynamic shifting). The tokenizers are the test kit's (smaller
    vocabularies: only the embedding tables shrink). The layer counts are arguments only so that a small
    copy can check this code on a CPU."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from loracap.testing.clip_models import build_clip_tokenizer
    from loracap.testing.diffusion_models import build_t5_tokenizer

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    clip = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768, hidden_act="quick_gelu", vocab_size=len(tokenizer), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    t5 = T5Config(
        vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built and saved in bf16: half the memory, disk and time
    try:
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
            vae=AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=CLIPTextModel(clip), tokenizer=tokenizer, text_encoder_2=T5EncoderModel(t5),
            tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(
                num_layers=double_layers, num_single_layers=single_layers, guidance_embeds=True
            ),
        )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, side: int, seed: int) -> Path:
    """`count` noisy colour images, images only (no caption files)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((side, side + side // 4, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def loracap_args(
    a: argparse.Namespace, base: Path, data: Path, classes: Path, out: Path, steps: int
) -> list[str]:
    args = [
        "dreambooth", str(data), "--base", str(base), "--out", str(out), "--overwrite",
        "--instance-prompt", "photo of ohwx dog", "--resolution", str(a.resolution),
        "--batch-size", str(a.batch_size), "--max-steps", str(steps), "--rank", str(a.rank),
        "--lr", "1e-4", "--lr-scheduler", "constant", "--mixed-precision", a.precision,
        "--workers", str(a.workers), "--checkpoint-every", "100000", "--seed", "0", "--quiet",
    ]  # fmt: skip
    if a.prior:
        args += ["--class-prompt", "photo of a dog", "--class-data-dir", str(classes),
                 "--num-class-images", str(a.class_images)]  # fmt: skip
    if a.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    if "--no-bucket" in loracap_help():  # square centre crops, as diffusers' scripts take
        args.append("--no-bucket")
    if "--no-cache-text" in loracap_help():  # caches off; --loracap-variant=--cache-text measures them
        args.append("--no-cache-text")
    if a.arch == "flux":
        args += ["--lora-targets", FLUX_TARGETS, "--flux-guidance", FLUX_GUIDANCE, "--timestep-sampling",
                 "uniform", "--timestep-shift", "1.0", "--weight-decay", FLUX_WEIGHT_DECAY]  # fmt: skip
        if "--max-sequence-length" in loracap_help():
            args += ["--max-sequence-length", FLUX_T5_TOKENS]
        else:
            print("loracap has no --max-sequence-length: T5 lengths may differ", file=sys.stderr)
    return args


def variant_args(variant: str, *args: Any) -> list[str]:
    """loracap's arguments with a --loracap-variant's flags after them (where they repeat one, they win)."""
    return loracap_args(*args) + shlex.split(variant)


_HELP: list[str] = []


def loracap_help() -> str:
    """`loracap dreambooth --help`, read once: options it may not have yet are passed only when it does."""
    if not _HELP:
        command = [sys.executable, "-m", "loracap", "dreambooth", "--help"]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        _HELP.append(proc.stdout)
    return _HELP[0]


def diffusers_args(
    a: argparse.Namespace, base: Path, data: Path, classes: Path, out: Path, steps: int
) -> list[str]:
    args = [
        a.diffusers_script, "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
        "--instance_prompt", "photo of ohwx dog", "--output_dir", str(out), "--resolution", str(a.resolution),
        "--train_batch_size", str(a.batch_size), "--max_train_steps", str(steps), "--rank", str(a.rank),
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--mixed_precision", a.precision, "--dataloader_num_workers", str(a.workers),
        "--checkpointing_steps", "100000", "--seed", "0", "--center_crop", "--report_to", "tensorboard",
    ]  # fmt: skip
    if a.prior:
        args += ["--with_prior_preservation", "--class_prompt", "photo of a dog", "--class_data_dir",
                 str(classes), "--num_class_images", str(a.class_images)]  # fmt: skip
    if a.gradient_checkpointing:
        args.append("--gradient_checkpointing")
    if a.arch == "flux":  # its LoRA targets and AdamW weight decay are the defaults (see FLUX_TARGETS)
        args += ["--guidance_scale", FLUX_GUIDANCE, "--max_sequence_length", FLUX_T5_TOKENS]
    return args


def run(kind: str, argv: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """Wall seconds of one trainer process and its BENCH report; raises with its tail on failure."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, kind, *argv], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    reports = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not reports:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{tail}")
    return seconds, json.loads(reports[-1][6:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--diffusers-script",
        help="diffusers' examples/dreambooth/train_dreambooth_lora.py (sd15), _lora_sdxl.py, _lora_flux.py",
    )
    p.add_argument("--diffusers-pythonpath", default="", help="extra PYTHONPATH for diffusers' script")
    p.add_argument("--arch", choices=("sd15", "sdxl", "flux"), default="sd15")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument(
        "--sides",
        choices=("both", "loracap", "diffusers"),
        default="both",
        help="which trainers to run (both: diffusers' only when --diffusers-script is given)",
    )
    p.add_argument(
        "--loracap-variant",
        action="append",
        default=[],
        metavar="ARGS",
        help="also run loracap with these extra flags as its own row, e.g. --loracap-variant=--cache-text "
        "(with '=': the value starts with '--'); repeatable",
    )
    p.add_argument("--base", help="an existing pipeline folder instead of building one")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--images", type=int, default=4, help="instance images")
    p.add_argument("--class-images", type=int, default=4)
    p.add_argument("--no-prior", dest="prior", action="store_false", help="without prior preservation")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per trainer (OMP_NUM_THREADS)")
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", help="default: a temporary folder")
    p.add_argument("--note", default="", help="machine description for the table row")
    a = p.parse_args()
    if a.diffusers_script and not Path(a.diffusers_script).is_file():
        p.error(f"no file at {a.diffusers_script}")
    if a.sides == "diffusers" and not a.diffusers_script:
        p.error("--sides diffusers needs --diffusers-script")

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dreambooth-bench-"))
    # A time limit (gpu.sh's `timeout`) ends this with SIGTERM: exit through the cleanup below, which also
    # stops the trainer running then (subprocess.run kills it on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return measure(a, work)
    finally:
        if not a.work_dir:  # a full-size Flux pipeline is 33 GB
            shutil.rmtree(work, ignore_errors=True)


def measure(a: argparse.Namespace, work: Path) -> int:
    base = Path(a.base) if a.base else build_pipeline(a.arch, a.size, work / f"base-{a.arch}-{a.size}")
    data = write_images(work / "instance", a.images, a.resolution, seed=1)
    classes = write_images(work / "class", a.class_images, a.resolution, seed=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads),
           "MKL_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    # label -> (what the wrapper runs, its arguments, its environment)
    trainers: dict[str, tuple[str, Callable[..., list[str]], dict[str, str]]] = {}
    if a.sides != "diffusers":
        trainers["loracap"] = ("loracap", loracap_args, env)
        for variant in a.loracap_variant:
            trainers[f"loracap {variant}"] = ("loracap", functools.partial(variant_args, variant), env)
    if a.diffusers_script and a.sides != "loracap":
        extra = [a.diffusers_pythonpath] if a.diffusers_pythonpath else []
        path = os.pathsep.join(extra + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
        trainers["diffusers"] = ("diffusers", diffusers_args, {**env, "PYTHONPATH": path})
    elif a.sides == "both":
        print("no --diffusers-script: measuring loracap alone", file=sys.stderr)

    times: dict[str, dict[int, list[float]]] = {k: {a.short: [], a.long: []} for k in trainers}
    peaks: dict[str, list[dict]] = {k: [] for k in trainers}
    load = os.getloadavg()[0]
    for repeat in range(a.repeats):
        for steps in (a.short, a.long):
            for number, (kind, (program, make_args, kind_env)) in enumerate(trainers.items()):
                out = work / f"out-{number}-{program}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh folder each time (and no latent cache)
                seconds, report = run(program, make_args(a, base, data, classes, out, steps), kind_env)
                times[kind][steps].append(seconds)
                if steps == a.long:
                    peaks[kind].append(report)
                print(
                    f"repeat {repeat} {kind:9} {steps:4d} steps: {seconds:7.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    load = max(load, os.getloadavg()[0])

    rows = {}
    for kind in trainers:
        pairs = list(zip(times[kind][a.short], times[kind][a.long], strict=True))
        if any(t_long <= t_short for t_short, t_long in pairs):
            print(f"{kind}: a long run took no longer than its short one; raise --long", file=sys.stderr)
        deltas = [
            (a.long - a.short) / (t_long - t_short) if t_long > t_short else math.nan
            for t_short, t_long in pairs
        ]
        rss = statistics.median(r["rss"] for r in peaks[kind]) / 2**30
        cuda = [r["cuda"] for r in peaks[kind] if r["cuda"] is not None]
        rows[kind] = {
            "steps_per_s": statistics.median(deltas),
            "spread": (min(deltas), max(deltas)),
            "rss_gib": rss,
            "cuda_gib": statistics.median(cuda) / 2**30 if cuda else None,
        }
    print(json.dumps({"settings": vars(a), "load_avg_max": load, "results": rows}, indent=1))
    print()
    print("| trainer | steps/s (median, min-max) | peak RSS GiB | peak CUDA GiB |")
    print("|---|---|---|---|")
    for kind, row in rows.items():
        cuda = f"{row['cuda_gib']:.2f}" if row["cuda_gib"] is not None else "-"
        low, high = row["spread"]
        print(f"| {kind} | {row['steps_per_s']:.2f} ({low:.2f}-{high:.2f}) | {row['rss_gib']:.2f} | {cuda} |")
    theirs = rows.get("diffusers")
    for kind, ours in rows.items():
        if theirs is None or kind == "diffusers":
            continue
        speed = ours["steps_per_s"] / theirs["steps_per_s"]
        memory = ours["rss_gib"] / theirs["rss_gib"]
        line = f"ratio {kind} / diffusers: steps/s {speed:.2f}, peak RSS {memory:.2f}"
        if ours["cuda_gib"] and theirs["cuda_gib"]:
            line += f", peak CUDA {ours['cuda_gib'] / theirs['cuda_gib']:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
