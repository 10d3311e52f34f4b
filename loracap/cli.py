"""The `loracap` command. Exit status: 0 ok, 1 some files failed (caption) or a --fail-on rule broke (report),
2 usage error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import closing, nullcontext

from . import __version__

# Light: loracap.backends imports no torch or transformers until a model is loaded.
from .backends import BackendError, GenerationSettings, ModelUnavailable
from .backends.registry import ANY_STYLE, DEFAULT_MODEL, KNOWN_MODELS, REMOTE_PREFIX

# What a user can fix (a missing folder, a bad option, a model that cannot be had): one line, exit 2.
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, ModelUnavailable, BackendError)


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
        help="hub id, local folder, or cached id (see `loracap models`), or openai:MODEL for a remote "
        "server (--api-base); default: chosen by free GPU memory",
    )
    cap.add_argument("--no-recursive", dest="recursive", action="store_false", help="only DIR itself")
    style = _add_style_arguments(cap)
    # Only a folder run has image files to read {tags} from; a server renders its prompt without one.
    style.add_argument(
        "--tags-from",
        metavar="EXT",
        help="fill {tags} from each image's <stem>EXT file, e.g. .tags (default: its existing caption)",
    )

    remote = cap.add_argument_group("remote model (--model openai:MODEL)")
    remote.add_argument(
        "--api-base",
        help="an OpenAI-compatible server's URL, e.g. http://gpu-box:8000/v1 (default: $OPENAI_BASE_URL)",
    )
    remote.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (the key itself is never printed)",
    )
    remote.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    remote.add_argument("--timeout", type=float, default=120, help="seconds per request")
    remote.add_argument("--max-retries", type=int, default=4, help="retries with back-off per image")

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
    post.add_argument(
        "--trigger", help="trigger word(s), put first and never twice (prose that names it keeps it in place)"
    )
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
    _add_model_arguments(run)
    run.add_argument("--repetition-penalty", type=float)
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("models", help="list the models loracap knows and which are downloaded")
    commands.add_parser("styles", help="list the caption styles and --extra options")
    _add_serve_parser(commands)
    _add_report_parser(commands)
    _add_train_parsers(commands)
    return parser


def _add_style_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("caption style (see `loracap styles`)")
    group.add_argument(
        "--style",
        "--mode",
        dest="style",
        default="caption",
        metavar="STYLE",
        help="a shipped style (booru-tags, training-caption, descriptive, sd-prompt, ...; Florence-2 "
        "modes such as tags or more_detailed) or the path of your own .toml style",
    )
    group.add_argument("--length", help="short, medium, long, or a word count such as 40-words (chat models)")
    group.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="EXTRA",
        help="an instruction added to the prompt: a named extra (lighting, camera-angle, no-text, name, "
        "...) or a sentence in quotes; repeatable (chat models)",
    )
    group.add_argument("--name", help="fills {name}, e.g. with --extra name: 'refer to the person as NAME'")
    group.add_argument(
        "--prompt",
        help="your own instruction for a chat model, with {trigger} {name} {tags} {folder} {length}; "
        "for Florence-2 / BLIP the raw task prompt ('<GENERATE_TAGS>', 'a photo of')",
    )
    group.add_argument("--prompt-file", help="like --prompt, read from a text file")
    return group


def _add_model_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    group.add_argument("--quant", choices=("4bit", "8bit"), help="load through bitsandbytes (CUDA only)")
    group.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default per mode)")
    group.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    group.add_argument(
        "--num-beams", type=int, default=1, help="beam search width (3 is a little better, slower)"
    )
    group.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    srv = commands.add_parser(
        "serve",
        help="serve a model as an OpenAI-compatible captioning endpoint",
        description="Load a model once and caption for many clients over /v1/chat/completions "
        "(base64 image_url content), with /v1/models and /health. Needs `pip install loracap[serve]`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    srv.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or cached id")
    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    srv.add_argument("--port", type=int, default=8000)
    _add_style_arguments(srv)
    _add_model_arguments(srv)
    srv.add_argument("--max-batch", type=int, default=16, help="requests captioned together at most")
    srv.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with"
    )
    srv.add_argument("--max-image-pixels", type=int, help="larger images get 413 (default: Pillow's limit)")
    srv.add_argument("--max-body-mb", type=float, default=32, help="larger request bodies get 413")
    srv.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=1024,
        help="requests whose text (system and user) has more tokens, by the model's tokenizer, get 400",
    )
    srv.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer KEY' on /v1 routes, KEY read from environment variable VAR "
        "(never printed or logged); without it anyone who reaches the port can use the server",
    )
    srv.add_argument("--served-model-name", help="the model name clients see (default: --model)")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _add_report_parser(commands: argparse._SubParsersAction) -> None:
    rep = commands.add_parser(
        "report",
        help="check a captioned dataset before training on it",
        description="Check the captions and images under DIR: CLIP score per pair (lowest first), token "
        "lengths against the text encoder's window, duplicates, trigger word, tag balance, sensitive terms, "
        "image sizes, near-duplicate images and aspect buckets. Writes report.html and report.json and "
        "prints a summary. Exit status: 0 ok, 1 a --fail-on rule failed, 2 usage error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument("dir", help="the dataset folder")
    rep.add_argument("--out", help="where report.html and report.json go (default: DIR/loracap-report)")
    rep.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="RULES",
        help="exit 1 when a rule breaks, e.g. 'missing-caption,truncated>3,clip<20,duplicate-image'; "
        "repeatable (names: see README)",
    )
    src = rep.add_argument_group("captions")
    src.add_argument("--layout", default="auto", choices=("auto", "sidecar", "jsonl", "kohya-json"))
    src.add_argument("--ext", default=".txt", help="sidecar extension (.txt, .caption)")
    src.add_argument("--metadata-file", help="metadata.jsonl or kohya JSON to read (default: found in DIR)")
    src.add_argument("--no-recursive", dest="recursive", action="store_false", help="only DIR itself")
    text = rep.add_argument_group("text checks")
    text.add_argument("--trigger", help="audit this trigger word: presence, position, tokenizer fusion")
    text.add_argument(
        "--tokenizer",
        help="tokenizer for token counts and the trigger audit (default: --clip-model's; with --no-clip only "
        "if it is already on this machine, else the token checks are skipped)",
    )
    text.add_argument("--max-length", type=int, help="token window (default: the tokenizer's, 77 for CLIP)")
    text.add_argument("--t5-tokenizer", help="also count T5 tokens (Flux/SD3), e.g. google/t5-v1_1-xxl")
    text.add_argument(
        "--t5-max-length", type=int, default=512, help="T5 window: 512 Flux-dev, 256 schnell/SD3"
    )
    text.add_argument(
        "--terms", help="TOML file of sensitive terms, one list per category (default: built in)"
    )
    text.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard for near-duplicate captions")
    clip = rep.add_argument_group("CLIP score")
    clip.add_argument(
        "--clip-model", default="openai/clip-vit-large-patch14", help="any CLIP or SigLIP checkpoint"
    )
    clip.add_argument("--no-clip", dest="clip", action="store_false", help="skip CLIP scoring")
    clip.add_argument("--no-cache", dest="cache", action="store_false", help="rescore everything")
    clip.add_argument("--batch-size", type=int, help="pairs per model call (default: 64 on a GPU, 8 on CPU)")
    clip.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model")
    clip.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    clip.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    clip.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    img = rep.add_argument_group("image checks")
    img.add_argument("--no-images", dest="images", action="store_false", help="skip the image checks")
    img.add_argument("--min-side", default="1024", help="smallest shorter side in px, or sd15 / sdxl / flux")
    img.add_argument("--resolution", default="1024", help="training resolution for the bucket preview")
    img.add_argument("--hash-threshold", type=int, help="phash bits apart that still count as duplicates (6)")
    img.add_argument("--thumbnails", type=int, default=24, help="worst pairs shown with thumbnails")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_train_parsers(commands: argparse._SubParsersAction) -> None:
    trn = commands.add_parser(
        "train",
        help="train a small captioner on your own captions",
        description="Teach a prefix captioner (frozen vision tower -> projector -> LM with LoRA) the style "
        "of the captions in DATA (a loracap-captioned folder, or a Hugging Face dataset id / saved dataset). "
        "The result in --out is a model folder for `loracap caption --model`. Needs loracap[train].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    trn.add_argument("data", help="captioned image folder, or a Hugging Face dataset")
    trn.add_argument("--out", required=True, help="the captioner folder to write (checkpoints go inside)")
    trn.add_argument(
        "--vision", default="google/siglip-base-patch16-224", help="SigLIP / CLIP vision checkpoint"
    )
    trn.add_argument("--lm", default="HuggingFaceTB/SmolLM2-135M", help="decoder-only LM checkpoint")
    trn.add_argument("--from", dest="init_from", help="continue from a trained captioner folder")
    trn.add_argument("--prompt", default="", help="text between image and caption, e.g. 'A photo of'")
    trn.add_argument("--projector", default="mlp", choices=("linear", "mlp"))
    trn.add_argument(
        "--pixel-shuffle", type=int, default=1, help="2 folds 2x2 patches: 4x fewer prefix tokens"
    )
    trn.add_argument("--max-caption-tokens", type=int, default=64)
    trn.add_argument(
        "--unfreeze-vision-layers", type=int, default=0, help="train the top N vision layers too"
    )
    trn.add_argument("--lora-r", type=int, default=16)
    trn.add_argument("--lora-alpha", type=int, default=32)
    trn.add_argument("--lora-dropout", type=float, default=0.05)
    trn.add_argument("--lora-targets", help="comma-separated module names (default: peft's for the LM)")
    trn.add_argument("--lr-projector", type=float, default=1e-3)
    trn.add_argument("--lr-lora", type=float, default=2e-4)
    trn.add_argument("--lr-vision", type=float, default=1e-5)
    trn.add_argument("--warmup-steps", type=int, default=50)
    trn.add_argument("--epochs", type=int, default=10)
    trn.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    trn.add_argument("--batch-size", type=int, default=16)
    trn.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    trn.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    trn.add_argument("--seed", type=int, default=0, help="split, shuffling and initialisation")
    trn.add_argument("--val-share", type=float, default=0.1)
    trn.add_argument("--test-share", type=float, default=0.1)
    trn.add_argument("--eval-every", type=int, default=100, help="validate every N steps")
    trn.add_argument("--checkpoint-every", type=int, default=200)
    trn.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping"
    )
    trn.add_argument("--clip-loss-weight", type=float, default=0.0, help="weight of the CLIP alignment term")
    trn.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="for --clip-loss-weight")
    trn.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    trn.add_argument(
        "--cache-features",
        action="store_true",
        help="run the frozen vision tower once per image and reuse its features every epoch and in later "
        "runs (not with --unfreeze-vision-layers)",
    )
    trn.add_argument(
        "--feature-cache",
        dest="feature_cache_dir",
        metavar="DIR",
        help="where --cache-features keeps them (default: $LORACAP_CACHE/vision-features); implies it",
    )
    trn.add_argument("--workers", type=int, default=2, help="data loader processes")
    trn.add_argument("--image-column", default="image", help="Hugging Face datasets: the image column")
    trn.add_argument("--caption-column", default="text", help="Hugging Face datasets: the caption column")
    trn.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    trn.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = commands.add_parser(
        "eval",
        help="score a trained captioner: BLEU-4, ROUGE-L, CIDEr, CLIPScore",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("model", help="a captioner folder written by `loracap train` (or any captioning model)")
    ev.add_argument("data", help="the captioned folder or dataset it was trained on")
    ev.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    ev.add_argument("--clip-model", help="also compute CLIPScore with this CLIP/SigLIP checkpoint")
    ev.add_argument("--image-column", default="image", help="Hugging Face datasets: the image column")
    ev.add_argument("--caption-column", default="text", help="Hugging Face datasets: the caption column")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", help="JSON file to write (default: MODEL/eval-SPLIT.json)")
    ev.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    try:
        from .train.loop import TrainSettings, train
    except ImportError as exc:
        print(f"loracap: error: training needs {exc.name}: pip install 'loracap[train]'", file=sys.stderr)
        return 2
    fields = {f: getattr(args, f) for f in TrainSettings.__dataclass_fields__ if hasattr(args, f)}
    fields["lora_targets"] = list(_split_list([args.lora_targets])) if args.lora_targets else None
    try:
        result = train(TrainSettings(**fields, progress=not args.quiet))
    except _USER_ERRORS as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nloracap: interrupted; run again with --resume to continue from the last checkpoint.",
            file=sys.stderr,
        )
        return 130
    if not result.is_main_process:  # the main process reports and saves
        return 0
    share = result.trainable_parameters / max(result.total_parameters, 1)
    print(
        f"loracap: trained {result.steps} steps in {result.seconds:.0f} s "
        f"({result.samples_per_second:.1f} samples/s), "
        f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters ({share:.1%}); "
        f"best validation loss {result.best_val_loss if result.best_val_loss is not None else '-'} "
        f"at step {result.best_step}{' (stopped early)' if result.stopped_early else ''}"
    )
    if result.test_metrics:
        m = result.test_metrics
        print(
            f"loracap: test split: BLEU-4 {m['bleu4']:.3f}, ROUGE-L {m['rouge_l']:.3f}, "
            f"CIDEr {m['cider']:.3f}"
        )
    print(f"loracap: captioner saved to {result.out}; use it with: loracap caption DIR --model {result.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        from .train.metrics import evaluate_captioner

        result = evaluate_captioner(
            args.model,
            args.data,
            split=args.split,
            image_column=args.image_column,
            caption_column=args.caption_column,
            clip_model=args.clip_model,
            batch_size=args.batch_size,
            device=args.device,
            out_file=args.out,
            progress=not args.quiet,
        )
    except ImportError as exc:
        print(f"loracap: error: evaluation needs {exc.name}: pip install 'loracap[train]'", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    clip = f", CLIPScore {result['clip_score']:.2f}" if result.get("clip_score") is not None else ""
    print(
        f"loracap: {result['images']} images ({result['split']}): BLEU-4 {result['bleu4']:.3f}, "
        f"ROUGE-L {result['rouge_l']:.3f}, CIDEr {result['cider']:.3f}{clip}"
        + (f"; written to {result['written_to']}" if "written_to" in result else "")
    )
    return 0


def _pixels_or_preset(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _report(args: argparse.Namespace) -> int:
    from .quality.report import build_report, load_terms, print_summary, write_report

    try:
        rep = build_report(
            args.dir,
            layout=args.layout,
            ext=args.ext,
            metadata_file=args.metadata_file,
            recursive=args.recursive,
            clip_model=args.clip_model,
            clip=args.clip,
            tokenizer=args.tokenizer,
            t5_tokenizer=args.t5_tokenizer,
            t5_max_length=args.t5_max_length,
            max_length=args.max_length,
            trigger=args.trigger,
            sensitive_terms=load_terms(args.terms) if args.terms else None,
            near_threshold=args.near_threshold,
            images=args.images,
            min_side=_pixels_or_preset(args.min_side),
            resolution=_pixels_or_preset(args.resolution),
            hash_threshold=args.hash_threshold,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            cache=args.cache,
            fail_on=args.fail_on,
            progress=not args.quiet,
        )
        write_report(rep, args.out, thumbnails=args.thumbnails)
    except _USER_ERRORS as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"loracap: error: the report needs {exc.name}: pip install 'loracap[report]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nloracap: interrupted; CLIP scores computed so far are cached for the next run.",
            file=sys.stderr,
        )
        return 130
    print(f"loracap report: {args.dir}")
    print_summary(rep)
    return 0 if rep.passed else 1


def _generation(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        repetition_penalty=getattr(args, "repetition_penalty", None),
    )


def _style_kwargs(args: argparse.Namespace) -> dict:
    return {
        "style": args.style,
        "length": args.length,
        "extras": tuple(args.extra),
        "name": args.name,
        "prompt": args.prompt,
        "prompt_file": args.prompt_file,
    }


def _remote_backend(args: argparse.Namespace):
    from .backends import load_backend

    return load_backend(
        args.model,
        api_base=args.api_base,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
    )


def _caption(args: argparse.Namespace) -> int:
    from .pipeline import caption_folder
    from .postprocess import PostProcess, parse_replace_tags

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
        backend = _remote_backend(args) if (args.model or "").startswith(REMOTE_PREFIX) else None
        with closing(backend) if backend is not None else nullcontext():
            summary = caption_folder(
                args.dir,
                model=args.model,
                backend=backend,
                **_style_kwargs(args),
                tags_ext=args.tags_from,
                recursive=args.recursive,
                existing=args.existing,
                format=args.format,
                ext=args.ext,
                metadata_file=args.metadata_file,
                options=options,
                generation=_generation(args),
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
                dtype=args.dtype,
                quant=args.quant,
                errors_file=args.errors_file,
                progress=not args.quiet,
            )
    except _USER_ERRORS as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nloracap: interrupted; captions written so far are kept. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    if summary.write_problem():
        print(f"loracap: error: {summary.write_problem()}", file=sys.stderr)
    print(f"loracap: {summary.describe()}", file=sys.stderr)
    return 0 if summary.ok else 1


def _models() -> int:
    from .backends.hub import is_cached
    from .styles import list_styles

    styles = list_styles()
    print(f"{'model':47} {'family':22} {'bf16':>5} {'8bit':>5} {'4bit':>5}  {'cached':6}  styles")
    for m in KNOWN_MODELS:
        cached = "yes" if is_cached(m.id) else "no"
        star = "*" if m.id == DEFAULT_MODEL else " "
        sizes = f"{m.memory_gb(2):5.1f} {m.memory_gb(1):5.1f} {m.memory_gb(0.5):5.1f}"
        extra = f"  NOT SUPPORTED: {m.unsupported}" if m.unsupported else (f"  ({m.note})" if m.note else "")
        # A fixed-mode model writes the styles that map to one of its modes; a chat model writes any.
        able = m.modes if m.modes == ANY_STYLE else [s.name for s in styles if s.florence_task in m.modes]
        print(f"{star}{m.id:46} {m.family:22} {sizes}  {cached:6}  {', '.join(able)}{extra}")
    print(
        f"\n{REMOTE_PREFIX}MODEL --api-base URL: any OpenAI-compatible server (vLLM, Ollama, loracap serve)."
    )
    print("GB: weights alone; add 1-2 GB for activations. 8bit/4bit need a CUDA GPU (--quant).")
    print("* default on CPU and small GPUs; without --model loracap picks by free GPU memory.")
    print("Any local folder or hub checkpoint of these families works too: --model PATH_OR_ID.")
    return 0


def _styles() -> int:
    from .styles import STYLES_DIR, extra_names, list_styles

    print(f"{'style':18} {'output':6} {'Florence-2 mode':16} description")
    for style in list_styles():
        output = "tags" if style.tags else "prose"
        task = style.florence_task or "-"
        chat = "" if style.prompt else " (Florence-2 only)"
        print(f"{style.name:18} {output:6} {task:16} {style.description}{chat}")
    print(f"\nStyle files are in {STYLES_DIR}: copy one, edit it, pass its path to --style.")
    print("Chat models write every style; fixed-mode models (Florence-2, BLIP, PaliGemma) the ones")
    print("with a Florence-2 mode they have. --length short|medium|long|N-words applies to chat models.")
    print("\n--extra options (or write your own sentence in quotes):")
    for key, text in extra_names().items():
        print(f"  {key:18} {text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as exc:
        print(f"loracap: error: serving needs {exc.name}: pip install 'loracap[serve]'", file=sys.stderr)
        return 2
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "").strip()
        if not api_key:  # refuse to start open when a key was asked for
            print(f"loracap: error: --api-key-env: ${args.api_key_env} is not set or empty", file=sys.stderr)
            return 2
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            quant=args.quant,
            log_level=args.log_level,
            **_style_kwargs(args),
            generation=_generation(args),
            model_name=args.served_model_name,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_image_pixels=args.max_image_pixels,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_prompt_tokens=args.max_prompt_tokens,
            api_key=api_key,
        )
    except (ValueError, ModelUnavailable, BackendError) as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):  # before any command imports the Hugging Face libraries
        os.environ["HF_HUB_OFFLINE"] = "1"
    if args.command == "caption":
        return _caption(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "styles":
        return _styles()
    if args.command == "report":
        return _report(args)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    return _models()


if __name__ == "__main__":
    sys.exit(main())
