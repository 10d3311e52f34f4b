"""The `loracap` command. Exit status: 0 all captioned or skipped, 1 some files failed, 2 usage error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .backends.registry import DEFAULT_MODEL, KNOWN_MODELS

MODES = ("tags", "caption", "detailed", "more_detailed", "mixed", "mixed_plus", "analyze")


def _split_list(values: list[str] | None) -> tuple[str, ...]:
    """`--remove-tags a,b --remove-tags c` -> ("a", "b", "c")."""
    return tuple(t.strip() for v in values or () for t in v.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracap", description="Caption image folders for LoRA training.")
    parser.add_argument("--version", action="version", version=f"loracap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    cap = commands.add_parser(
        "caption",
        help="caption every image in a folder",
        description="Caption every image under DIR and write what LoRA trainers read.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cap.add_argument("dir", help="folder of images (searched recursively)")
    cap.add_argument(
        "--model",
        help="hub id, local folder, or cached id (see `loracap models`); default: chosen by free GPU memory",
    )
    cap.add_argument("--mode", default="caption", choices=MODES, help="what kind of caption to write")
    cap.add_argument(
        "--prompt",
        help="raw model prompt: a Florence-2 task token such as '<GENERATE_TAGS>', "
        "or a text prefix BLIP continues ('a photo of')",
    )
    cap.add_argument("--no-recursive", dest="recursive", action="store_false", help="only DIR itself")

    out = cap.add_argument_group("output")
    out.add_argument(
        "--format",
        default="sidecar",
        choices=("sidecar", "jsonl", "kohya-json"),
        help="sidecar: <stem>.txt next to each image; jsonl: metadata.jsonl for HF imagefolder; "
        "kohya-json: sd-scripts fine-tune metadata",
    )
    out.add_argument("--ext", default=".txt", help="sidecar extension (sd-scripts' default is .caption)")
    out.add_argument("--metadata-file", help="where jsonl / kohya-json output goes (default: in DIR)")
    out.add_argument(
        "--existing",
        default="skip",
        choices=("skip", "overwrite", "prepend", "append"),
        help="what to do with images that already have a caption",
    )
    out.add_argument(
        "--errors-file", help="per-file errors as JSON lines (default: DIR/loracap-errors.jsonl)"
    )

    post = cap.add_argument_group("caption clean-up")
    post.add_argument("--trigger", help="trigger word(s) placed first in every caption, once")
    post.add_argument("--prefix", default="", help="text added after the trigger, verbatim")
    post.add_argument("--suffix", default="", help="text added at the end, verbatim")
    post.add_argument("--keep-boilerplate", action="store_true", help="keep openers like 'The image shows'")
    post.add_argument("--remove-tags", action="append", metavar="TAGS", help="tags to drop, comma-separated")
    post.add_argument("--replace-tags", action="append", metavar="A=B", help="rename tags: 'a=b,c=d'")
    post.add_argument("--max-tags", type=int, help="keep at most this many tags")
    post.add_argument("--underscores-to-spaces", action="store_true", help="'long_hair' -> 'long hair'")

    run = cap.add_argument_group("speed and hardware")
    run.add_argument("--batch-size", type=int, help="images per model call (default: 64 on a GPU, 4 on CPU)")
    run.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    run.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    run.add_argument("--quant", choices=("4bit", "8bit"), help="load through bitsandbytes (CUDA only)")
    run.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default per mode)")
    run.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    run.add_argument(
        "--num-beams", type=int, default=1, help="beam search width (3 is a little better, slower)"
    )
    run.add_argument("--repetition-penalty", type=float)
    run.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("models", help="list the models loracap knows and which are downloaded")
    return parser


def _caption(args: argparse.Namespace) -> int:
    import os

    from .backends import BackendError, GenerationSettings, ModelUnavailable
    from .pipeline import caption_folder
    from .postprocess import PostProcess, parse_replace_tags

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        options = PostProcess(
            trigger=args.trigger,
            prefix=args.prefix,
            suffix=args.suffix,
            strip_boilerplate=not args.keep_boilerplate,
            remove_tags=_split_list(args.remove_tags),
            replace_tags=parse_replace_tags(args.replace_tags or ()),
            max_tags=args.max_tags,
            underscores_to_spaces=args.underscores_to_spaces,
        )
        generation = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            num_beams=args.num_beams,
            repetition_penalty=args.repetition_penalty,
        )
        summary = caption_folder(
            args.dir,
            model=args.model,
            mode=args.mode,
            recursive=args.recursive,
            existing=args.existing,
            format=args.format,
            ext=args.ext,
            metadata_file=args.metadata_file,
            options=options,
            generation=generation,
            prompt=args.prompt,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            quant=args.quant,
            errors_file=args.errors_file,
            progress=not args.quiet,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, ModelUnavailable, BackendError) as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nloracap: interrupted; captions written so far are kept. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    print(f"loracap: {summary.describe()}", file=sys.stderr)
    return 0 if summary.ok else 1


def _models() -> int:
    from .backends.hub import is_cached

    print(f"{'model':47} {'family':22} {'bf16':>5} {'8bit':>5} {'4bit':>5}  {'cached':6}  modes")
    for m in KNOWN_MODELS:
        cached = "yes" if is_cached(m.id) else "no"
        star = "*" if m.id == DEFAULT_MODEL else " "
        sizes = f"{m.memory_gb(2):5.1f} {m.memory_gb(1):5.1f} {m.memory_gb(0.5):5.1f}"
        extra = f"  NOT SUPPORTED: {m.unsupported}" if m.unsupported else (f"  ({m.note})" if m.note else "")
        print(f"{star}{m.id:46} {m.family:22} {sizes}  {cached:6}  {', '.join(m.modes)}{extra}")
    print("\nGB: weights alone; add 1-2 GB for activations. 8bit/4bit need a CUDA GPU (--quant).")
    print("* default on CPU and small GPUs; without --model loracap picks by free GPU memory.")
    print("Any local folder or hub checkpoint of these families works too: --model PATH_OR_ID.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "caption":
        return _caption(args)
    return _models()


if __name__ == "__main__":
    sys.exit(main())
