"""`loracap train` throughput at full size: SigLIP-base-patch16-224 + SmolLM2-135M, random weights.

Both towers are built here with the published dimensions (no hub): google/siglip-base-patch16-224
(224 px, 16 px patches -> 196 vision tokens, 12 layers of width 768; its text tower too, as the hub
checkpoint is a dual encoder) and HuggingFaceTB/SmolLM2-135M (30 layers of width 576, 9 heads, 3 KV
heads, vocabulary 49,152, tied embeddings). The tokenizers are trained locally and are small, which
changes no tensor shape: the LM keeps its 49,152-row embedding and head.

Training is `loracap.train.train` as `loracap train` runs it (projector + LoRA, the tower frozen) on
synthetic captioned scenes, with and without `--cache-features`. Each case runs twice, for `--short`
and `--long` steps, and samples/s is the extra samples of the long run over its extra loop time:
start-up, the first batches (CUDA kernels, allocator) and the final validation cancel out.

    python benchmarks/train_throughput.py --device-note "1x H100" --batch-size 32   # on a GPU: bf16
    python benchmarks/train_throughput.py --batch-size 4 --short 2 --long 6         # on a CPU (slow)
    python benchmarks/train_throughput.py --size tiny --batch-size 4 --short 2 --long 4   # a quick check
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from loracap.data.synthetic import write_dataset
from loracap.train.loop import train
from loracap.train.settings import TrainSettings

SIGLIP_BASE_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
}
SIGLIP_BASE_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 64,
    "projection_size": 768,
}
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "tie_word_embeddings": True,
}


def build_siglip_base(out: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    from loracap.testing.clip_models import build_siglip_tokenizer

    tokenizer = build_siglip_tokenizer()
    text = {
        **SIGLIP_BASE_TEXT,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP_BASE_VISION))
    image_processor = SiglipImageProcessorPil(size={"height": 224, "width": 224})
    model.save_pretrained(out)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_smollm2_135m(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loracap.testing.seeding import set_generation_ids
    from loracap.testing.text_models import build_smollm2_tokenizer

    tokenizer = build_smollm2_tokenizer()
    config = LlamaConfig(
        **SMOLLM2_135M,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    set_generation_ids(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def samples_per_second(settings: dict, work: Path, name: str, short: int, long: int) -> tuple[float, int]:
    """Samples/s of the long run beyond the short one, and the trainable parameter count."""
    runs = [
        train(TrainSettings(out=str(work / f"{name}-{steps}"), max_steps=steps, eval_every=steps, **settings))
        for steps in (short, long)
    ]
    extra_seconds = runs[1].train_seconds - runs[0].train_seconds
    extra_samples = (runs[1].steps - runs[0].steps) * settings["batch_size"]
    return extra_samples / extra_seconds, runs[1].trainable_parameters


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--size", choices=("full", "tiny"), default="full", help="tiny: the test kit's towers"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--short", type=int, default=10, help="steps of the shorter timing run")
    parser.add_argument("--long", type=int, default=50, help="steps of the longer timing run")
    parser.add_argument("--pixel-shuffle", type=int, default=1, help="1: 196 vision tokens; 2: 49")
    parser.add_argument("--mixed-precision", default="auto", help="auto: bf16 on a GPU that has it")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers")
    parser.add_argument("--device-note", default="", help="what to call the machine in the result line")
    parser.add_argument("--work", type=Path, help="folder for models and runs (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        if args.size == "tiny":  # checks the script end to end in seconds; not a throughput number
            from loracap.testing import make_tiny_model

            vision, lm = make_tiny_model("siglip", work / "siglip"), make_tiny_model("llama", work / "llama")
        else:
            vision = build_siglip_base(work / "siglip-base")
            lm = build_smollm2_135m(work / "smollm2-135m")
        # Enough images that the long run never repeats one; a few for the validation that ends each run.
        n = args.batch_size * args.long + 16
        write_dataset(work / "data", n, size=256, splits={"train": 1 - 8 / n, "val": 8 / n})
        print(f"built the towers and {n} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)

        settings = dict(
            data=str(work / "data"),
            vision=str(vision),
            lm=str(lm),
            pixel_shuffle=args.pixel_shuffle,
            batch_size=args.batch_size,
            mixed_precision=args.mixed_precision,
            workers=args.workers,
            warmup_steps=0,
            checkpoint_every=10**9,
            val_metrics=False,
            test_metrics=False,
            progress=False,
        )
        images, trainable = samples_per_second(settings, work, "images", args.short, args.long)
        settings.update(cache_features=True, feature_cache_dir=str(work / "features"))
        cached, _ = samples_per_second(settings, work, "cached", args.short, args.long)

    cpu = f"CPU ({torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    print(
        f"{args.device_note or device}, torch {torch.__version__}, {platform.machine()}, {args.size} towers: "
        f"batch {args.batch_size}, pixel shuffle {args.pixel_shuffle}, "
        f"mixed precision {args.mixed_precision}, "
        f"{trainable:,} trainable parameters"
    )
    print(f"images: {images:.2f} samples/s")
    print(f"cached features: {cached:.2f} samples/s")
    print(f"ratio {cached / images:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
