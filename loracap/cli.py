"""The `loracap` command. Exit status: 0 ok, 1 some files failed (caption) or a --fail-on rule broke (report),
2 usage error."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

# Light: loracap.backends imports no torch or transformers until a model is loaded.
from .backends import BackendError, ModelUnavailable
from .backends.registry import ANY_STYLE, DEFAULT_MODEL, KNOWN_MODELS, REMOTE_PREFIX
from .config import build, defaults, read_config_file

# What a user can fix (a missing folder, a bad option, a model that cannot be had): one line, exit 2.
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, ModelUnavailable, BackendError)

# Each command's settings class, by import path: resolved only when needed, so `loracap --help` stays light.
CAPTION_CONFIG = "loracap.pipeline:CaptionConfig"
REPORT_CONFIG = "loracap.quality.report:ReportConfig"
SERVE_CONFIG = "loracap.serve.config:ServeConfig"
TRAIN_SETTINGS = "loracap.train.settings:TrainSettings"
GENERATE_CONFIG = "loracap.dreambooth.generate:GenerateConfig"
DREAMBOOTH_CONFIG = "loracap.dreambooth.settings:DreamBoothConfig"
EXPORT_CONFIG = "loracap.scale.export:ExportConfig"
MERGE_CONFIG = "loracap.merge:MergeConfig"
EDIT_CONFIG = "loracap.edit.app:EditConfig"
WEB_CONFIG = "loracap.browser:WebConfig"
EXPORT_ONNX_CONFIG = "loracap.onnx_export:ExportOnnxConfig"
EXPLAIN_CONFIG = "loracap.quality.explain:ExplainConfig"
# Where a flag's default differs from the settings class's (the Python API's), the flag's wins here.
_CLI_DEFAULTS = {TRAIN_SETTINGS: {"mixed_precision": "auto"}}
# Given on the command line but not settings of a command: how to run, not what to do.
_NOT_SETTINGS = ("command", "config", "offline", "verbose")


def _settings_class(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _batch_size(text: str) -> int | str:
    """--batch-size: a whole number from 1, or auto."""
    from .backends.batch_size import AUTO, parse_batch_size

    try:
        return parse_batch_size(text) or AUTO
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split_list(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """`--remove-tags a,b --remove-tags c` -> ("a", "b", "c")."""
    values = [values] if isinstance(values, str) else values or ()
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def _help_showing_defaults(settings_path: str) -> type[argparse.HelpFormatter]:
    """A help formatter that shows each flag's default as the settings class has it: argparse itself
    holds no defaults (see `_command_parser`), so the class is the one place they are written."""

    class Formatter(argparse.HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            help = action.help or ""
            cls = _settings_class(settings_path)
            known = {**defaults(cls), **_CLI_DEFAULTS.get(settings_path, {})}
            value = known.get(action.dest)
            if (
                action.option_strings
                and value not in (None, "", (), [], False, True)
                and "default" not in help
            ):
                help += f" (default: {value})"
            return help

    return Formatter


def _command_parser(
    commands: argparse._SubParsersAction, name: str, settings_path: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand whose flags are settings of `settings_path`'s class. Its flags have no argparse
    defaults, so the parsed namespace holds only what the user typed: `--config FILE` fills the rest,
    then the class's defaults."""
    parser = commands.add_parser(
        name,
        argument_default=argparse.SUPPRESS,
        formatter_class=_help_showing_defaults(settings_path),
        **kwargs,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="say more about what happens")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help='read settings from a TOML file, one key per flag (max_new_tokens = 60, trigger = "ohwx"); '
        "flags given here override it",
    )
    return parser


def _settings(path: str, args: argparse.Namespace, given: Mapping[str, Any] | None = None) -> Any:
    """The command's settings object: its class's defaults, then --config, then the flags typed.
    `given`: the typed flags, converted where the command line spells a setting differently."""
    flags = dict(given) if given is not None else vars(args)
    flags = {k: v for k, v in flags.items() if k not in _NOT_SETTINGS}
    config_file = getattr(args, "config", None)
    from_file = read_config_file(config_file) if config_file else {}
    where = f"--config {config_file}" if config_file else "the command line"
    values = {**_CLI_DEFAULTS.get(path, {}), **from_file, **flags}
    return build(_settings_class(path), values, where=where)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracap", description="Caption image folders for LoRA training.")
    parser.add_argument("--version", action="version", version=f"loracap {version('loracap')}")
    commands = parser.add_subparsers(dest="command", required=True)

    cap = _command_parser(
        commands,
        "caption",
        CAPTION_CONFIG,
        help="caption every image in a folder",
        description="Caption every image under DIR and write what LoRA trainers read.",
    )
    cap.add_argument(
        "dir",
        nargs="?",
        help="folder of images (searched recursively); with --engine ray also .tar shards, parquet or a "
        "Hugging Face dataset",
    )
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
        dest="tags_ext",
        metavar="EXT",
        help="fill {tags} from each image's <stem>EXT file, e.g. .tags (default: its existing caption)",
    )
    style.add_argument(
        "--tagger",
        metavar="MODEL",
        help="fill {tags} with a WD tagger's tags, tagged first in the same run (wd-vit-tagger-v3 or another "
        "SmilingWolf name, a hub id or a folder); a prompt without {tags} gets --extra existing-tags",
    )

    remote = cap.add_argument_group("remote model (--model openai:MODEL)")
    remote.add_argument(
        "--api-base",
        help="an OpenAI-compatible server's URL, e.g. http://gpu-box:8000/v1 (default: $OPENAI_BASE_URL)",
    )
    remote.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (the key itself is never printed)",
    )
    remote.add_argument("--concurrency", type=int, help="requests in flight at once")
    remote.add_argument("--timeout", type=float, help="seconds per request")
    remote.add_argument("--max-retries", type=int, help="retries with back-off per image")

    out = cap.add_argument_group("output")
    out.add_argument(
        "--format",
        choices=("sidecar", "jsonl", "kohya-json"),
        help="sidecar: <stem>.txt next to each image; jsonl: metadata.jsonl for HF imagefolder; "
        "kohya-json: sd-scripts fine-tune metadata",
    )
    out.add_argument("--ext", help="sidecar extension (sd-scripts' default is .caption)")
    out.add_argument("--metadata-file", help="where jsonl / kohya-json output goes (default: in DIR)")
    out.add_argument(
        "--existing",
        choices=("skip", "overwrite", "prepend", "append"),
        help="what to do with images that already have a caption",
    )
    out.add_argument(
        "--errors-file", help="per-file errors as JSON lines (default: DIR/loracap-errors.jsonl)"
    )
    out.add_argument(
        "--retry-failed",
        action="store_true",
        help="try again the files the last run could not decode, even if unchanged (by default they are "
        "listed as failed again without loading the model)",
    )

    post = cap.add_argument_group("caption clean-up")
    post.add_argument(
        "--trigger", help="trigger word(s), put first and never twice (prose that names it keeps it in place)"
    )
    post.add_argument("--prefix", help="text added after the trigger, verbatim")
    post.add_argument("--suffix", help="text added at the end, verbatim")
    post.add_argument(
        "--keep-boilerplate",
        dest="strip_boilerplate",
        action="store_false",
        help="keep openers like 'The image shows'",
    )
    post.add_argument(
        "--remove-tags",
        "--undesired-tags",  # sd-scripts' name (its tagger's --undesired_tags)
        dest="remove_tags",
        action="append",
        metavar="TAGS",
        help="tags to drop, comma-separated",
    )
    post.add_argument("--replace-tags", action="append", metavar="A=B", help="rename tags: 'a=b,c=d'")
    post.add_argument("--max-tags", type=int, help="keep at most this many tags")
    post.add_argument(
        "--underscores-to-spaces",
        "--remove-underscore",  # sd-scripts' name (its tagger's --remove_underscore)
        dest="underscores_to_spaces",
        action="store_true",
        help="'long_hair' -> 'long hair'; kaomoji such as '^_^' keep theirs",
    )

    scale = cap.add_argument_group("scale out (--engine ray / vllm)")
    scale.add_argument(
        "--engine",
        choices=("local", "ray", "vllm", "ray-vllm", "onnx"),
        help="local: this process; ray: Ray Data on every local GPU/core or the cluster at RAY_ADDRESS; "
        "vllm: a chat model in vLLM (CUDA); ray-vllm: Ray Data with a vLLM actor per GPU; onnx: export the "
        "captioner to ONNX once (cached) and run it on onnxruntime",
    )
    scale.add_argument("--out", help="--engine ray on shards or tables: the folder for caption shards")
    scale.add_argument("--image-column", metavar="NAME", help="shards/tables: the image column or suffix")
    scale.add_argument("--id-column", metavar="NAME", help="tables: the column naming each row")
    scale.add_argument("--shard-rows", type=int, metavar="N", help="rows per caption shard (default 1000)")
    scale.add_argument("--ray-actors", type=int, metavar="N", help="model copies (default: one per GPU)")

    run = cap.add_argument_group("speed and hardware")
    run.add_argument(
        "--batch-size",
        type=_batch_size,
        help="images per model call, or auto: as many as fit in free memory, by what the first batch took "
        "(default: auto, at most 64)",
    )
    run.add_argument("--workers", type=int, help="threads decoding images ahead of the model")
    run.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: the CPUs this process may use less --workers; at most 4 on a GPU)",
    )
    _add_model_arguments(run)
    run.add_argument("--repetition-penalty", type=float)
    run.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bars; only warnings and errors"
    )
    _add_decoding_arguments(cap)

    commands.add_parser("models", help="list the models loracap knows and which are downloaded")
    commands.add_parser("styles", help="list the caption styles and --extra options")
    _add_serve_parser(commands)
    _add_report_parser(commands)
    _add_train_parsers(commands)
    _add_generate_parser(commands)
    _add_dreambooth_parser(commands)
    _add_export_parser(commands)
    _add_merge_parser(commands)
    _add_edit_parser(commands)
    _add_web_parser(commands)
    _add_export_onnx_parser(commands)
    _add_explain_parser(commands)
    return parser


def _add_style_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("caption style (see `loracap styles`)")
    group.add_argument(
        "--style",
        "--mode",
        dest="style",
        metavar="STYLE",
        help="a shipped style (booru-tags, training-caption, descriptive, sd-prompt, ...; Florence-2 "
        "modes such as tags or more_detailed) or the path of your own .toml style",
    )
    group.add_argument("--length", help="short, medium, long, or a word count such as 40-words (chat models)")
    group.add_argument(
        "--extra",
        dest="extras",
        action="append",
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
    group.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    group.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), help="(default: auto)")
    group.add_argument(
        "--quant",
        choices=("4bit", "8bit", "int8", "fp16"),
        help="4bit/8bit: load through bitsandbytes (CUDA only); int8/fp16: an exported ONNX captioner's "
        "quantized graphs",
    )
    group.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default per mode)")
    group.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    group.add_argument("--num-beams", type=int, help="beam search width (3 is a little better, slower)")
    group.add_argument(
        "--length-penalty",
        type=float,
        metavar="P",
        help="beam search: above 1 favours longer captions, below 1 shorter ones (default 1)",
    )
    group.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    group.add_argument(
        "--general-threshold", type=float, metavar="P", help="taggers: keep general tags at P or more (0.35)"
    )
    group.add_argument(
        "--character-threshold",
        type=float,
        metavar="P",
        help="taggers: keep character tags at P or more (0.85)",
    )
    group.add_argument("--character-tags-first", action="store_true", help="taggers: character tags first")
    group.add_argument("--rating-tags", action="store_true", help="taggers: the most likely rating tag first")


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling and several captions (greedy decoding unless one of these is given; see also --num-beams)"
    )
    group.add_argument(
        "--temperature", type=float, help="sample at this temperature (above 0; 1 is the model's)"
    )
    group.add_argument(
        "--top-p", type=float, metavar="P", help="sample from the tokens holding P of the mass"
    )
    group.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    group.add_argument(
        "--seed",
        type=int,
        help="make sampled captions repeatable: each image's own draws, whatever its batch",
    )
    group.add_argument(
        "--captions-per-image",
        type=int,
        metavar="N",
        help="write N captions per image, a line each (sampled, or the N best beams with --num-beams N+)",
    )


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    srv = _command_parser(
        commands,
        "serve",
        SERVE_CONFIG,
        help="serve a model as an OpenAI-compatible captioning endpoint",
        description="Load a model once and caption for many clients over /v1/chat/completions "
        "(base64 image_url content), with /v1/models and /health. Needs `pip install loracap[serve]`.",
    )
    srv.add_argument("--model", help="hub id, local folder, or cached id")
    srv.add_argument(
        "--engine", choices=("local", "vllm"), help="local: transformers; vllm: a chat model on vLLM (CUDA)"
    )
    srv.add_argument("--host", help="0.0.0.0 to accept other machines")
    srv.add_argument("--port", type=int)
    _add_style_arguments(srv)
    _add_model_arguments(srv)
    srv.add_argument("--max-batch", type=int, help="requests captioned together at most")
    srv.add_argument("--batch-wait-ms", type=float, help="how long a request waits for others to batch with")
    srv.add_argument("--max-image-pixels", type=int, help="larger images get 413 (default: Pillow's limit)")
    srv.add_argument("--max-body-mb", type=float, help="larger request bodies get 413")
    srv.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="requests whose text (system and user) has more tokens, by the model's tokenizer, get 400",
    )
    srv.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer KEY' on /v1 routes, KEY read from environment variable VAR "
        "(never printed or logged); without it anyone who reaches the port can use the server",
    )
    srv.add_argument(
        "--served-model-name", dest="model_name", help="the model name clients see (default: --model)"
    )
    srv.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))


def _add_report_parser(commands: argparse._SubParsersAction) -> None:
    rep = _command_parser(
        commands,
        "report",
        REPORT_CONFIG,
        help="check a captioned dataset before training on it",
        description="Check the captions and images under DIR: CLIP score per pair (lowest first), token "
        "lengths against the text encoder's window, duplicates, trigger word, tag balance, sensitive terms, "
        "image sizes, near-duplicate images and aspect buckets. Writes report.html and report.json and "
        "prints a summary. Exit status: 0 ok, 1 a --fail-on rule failed, 2 usage error.",
    )
    rep.add_argument("dir", nargs="?", help="the dataset folder")
    rep.add_argument("--out", help="where report.html and report.json go (default: DIR/loracap-report)")
    rep.add_argument(
        "--fail-on",
        action="append",
        metavar="RULES",
        help="exit 1 when a rule breaks, e.g. 'missing-caption,truncated>3,clip<20,duplicate-image'; "
        "repeatable (names: see README)",
    )
    src = rep.add_argument_group("captions")
    src.add_argument("--layout", choices=("auto", "sidecar", "jsonl", "kohya-json"))
    src.add_argument("--ext", help="sidecar extension (.txt, .caption)")
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
    text.add_argument("--t5-max-length", type=int, help="T5 window: 512 Flux-dev, 256 schnell/SD3")
    text.add_argument(
        "--terms", help="TOML file of sensitive terms, one list per category (default: built in)"
    )
    text.add_argument("--near-threshold", type=float, help="Jaccard for near-duplicate captions")
    clip = rep.add_argument_group("CLIP score")
    clip.add_argument("--clip-model", help="any CLIP or SigLIP checkpoint")
    clip.add_argument("--no-clip", dest="clip", action="store_false", help="skip CLIP scoring")
    clip.add_argument(
        "--itm-model",
        metavar="ID_OR_FOLDER",
        help="also score each pair with a BLIP image-text matching checkpoint, e.g. "
        "Salesforce/blip-itm-base-coco: the probability that caption and image match (off by default)",
    )
    clip.add_argument("--no-cache", dest="cache", action="store_false", help="rescore everything")
    clip.add_argument(
        "--explain-model",
        metavar="ID_OR_FOLDER",
        help="a BLIP, ViT-GPT2 or Florence-2 captioner: write where it looked for each word of its caption "
        "(OUT/explain/*.png, see loracap explain) for the captions to check first, linked from the page",
    )
    clip.add_argument("--batch-size", type=int, help="pairs per model call (default: 64 on a GPU, 8 on CPU)")
    clip.add_argument("--workers", type=int, help="threads decoding images ahead of the model")
    clip.add_argument(
        "--threads", type=int, help="torch threads (default: the CPUs this process may use less --workers)"
    )
    clip.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    clip.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"))
    clip.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    bal = rep.add_argument_group("balance")
    bal.add_argument("--rare-below", type=int, metavar="N", help="list the tags in fewer than N captions")
    bal.add_argument(
        "--balance-prompts",
        metavar="FILE",
        help="write a prompt per missing image of each rare tag (for loracap generate --prompts-file)",
    )
    img = rep.add_argument_group("image checks")
    img.add_argument("--no-images", dest="images", action="store_false", help="skip the image checks")
    img.add_argument("--min-side", help="smallest shorter side in px, or sd15 / sdxl / flux")
    img.add_argument("--resolution", help="training resolution for the bucket preview")
    img.add_argument("--min-bucket-reso", type=int, metavar="PX", help="as loracap dreambooth takes it")
    img.add_argument("--max-bucket-reso", type=int, metavar="PX", help="as loracap dreambooth takes it")
    img.add_argument("--bucket-reso-steps", type=int, metavar="PX", help="as loracap dreambooth takes it")
    img.add_argument("--bucket-no-upscale", action="store_true", help="as loracap dreambooth takes it")
    img.add_argument("--hash-threshold", type=int, help="phash bits apart that still count as duplicates (6)")
    img.add_argument("--thumbnails", type=int, help="worst pairs shown with thumbnails")
    rep.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bars; only warnings and errors"
    )


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    gen = _command_parser(
        commands,
        "generate",
        GENERATE_CONFIG,
        help="generate images from a Stable Diffusion / SDXL / Flux base, with or without a LoRA",
        description="Generate --n images for each prompt with the --base model (and --lora, if given) and "
        "write them beside --out, which gets one grid of them all (a row per prompt). Image j of every "
        "prompt uses seed --seed + j. Needs `pip install loracap[dreambooth]`.",
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="what to draw; several make several rows")
    gen.add_argument("--prompts-file", metavar="FILE", help="more prompts, one a line")
    gen.add_argument("--base", help="the base model: a diffusers folder or hub id (SD 1.x/2.x, SDXL, Flux)")
    gen.add_argument("--lora", help="a LoRA .safetensors file or its folder (diffusers or kohya format)")
    gen.add_argument(
        "--lora-scale", type=float, help="how much of the LoRA to apply; 0: the base alone (default: 1)"
    )
    gen.add_argument("--negative", help="negative prompt (needs --cfg above 1)")
    gen.add_argument("--n", type=int, help="images per prompt")
    gen.add_argument("--seed", type=int, help="image j of each prompt uses SEED + j (default: 0)")
    gen.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance scale, 1: off (default 7.5 SD 1.x/2.x, 5 SDXL, 1 Flux; for Flux, "
        "above 1 runs diffusers' true CFG: a second transformer pass each step)",
    )
    gen.add_argument("--steps", type=int, help="denoising steps (default 30; Flux 4 schnell, 28 dev)")
    gen.add_argument(
        "--scheduler",
        help="default (the base's own), ddim, pndm, euler, euler-a, heun, dpm++, dpm++-karras, dpm++-sde, "
        "unipc; Flux: default or euler",
    )
    gen.add_argument("--width", type=int, help="pixels (default: the base's native size)")
    gen.add_argument("--height", type=int, help="pixels (default: the base's native size)")
    gen.add_argument("--out", help="the grid PNG; the images go beside it as STEM-PROMPT-IMAGE.png")
    gen.add_argument(
        "--captions", action="store_true", help="write each image's prompt beside it as its caption (.txt)"
    )
    gen.add_argument("--batch-size", type=int, help="images per pipeline call (default: 4 SD, 2 SDXL/Flux)")
    gen.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    gen.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), help="(default: auto)")
    gen.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    gen.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bars; only warnings and errors"
    )


def _generate(args: argparse.Namespace) -> int:
    import time

    from .dreambooth.generate import generate

    config = _settings(GENERATE_CONFIG, args)
    start = time.monotonic()
    written = generate(config)
    seconds = time.monotonic() - start
    grid, images = written[-1], len(written) - 1
    print(
        f"loracap: {images} image(s) in {seconds:.0f} s ({seconds / images:.1f} s each, loading included); "
        f"grid {grid}, images beside it as {grid.stem}-PROMPT-IMAGE.png",
        file=sys.stderr,
    )
    return 0


def _add_export_onnx_parser(commands: argparse._SubParsersAction) -> None:
    onx = _command_parser(
        commands,
        "export-onnx",
        EXPORT_ONNX_CONFIG,
        help="export a captioner (Florence-2, ViT-GPT2-style or `loracap train`'s) to ONNX (onnxruntime, no "
        "PyTorch, or the browser with loracap web)",
        description="Write MODEL as ONNX graphs in the layout transformers.js reads, with its config, image "
        "processor and tokenizer, into OUT, after checking that onnxruntime's greedy tokens equal PyTorch's. "
        "`loracap caption --model OUT` then runs it on onnxruntime, and `loracap web OUT` in a browser. "
        "Needs `pip install loracap[onnx]`.",
    )
    onx.add_argument("model", nargs="?", help="hub id or folder of the captioner")
    onx.add_argument("out", nargs="?", help="the folder to write")
    onx.add_argument(
        "--quantize",
        metavar="KINDS",
        help="also write int8 (*_quantized.onnx) and/or fp16 (*_fp16.onnx) graphs: int8, fp16 or int8,fp16",
    )
    onx.add_argument("--opset", type=int)
    onx.add_argument("--check-images", type=int, metavar="N", help="probe images of the parity check (20)")


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    result = export_onnx(_settings(EXPORT_ONNX_CONFIG, args))
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result["files"].items())
    parity = result["parity"]
    line = f"first-step logits within {parity['first_step_max_logit_difference']:.1e}, greedy tokens equal"
    for kind in ("int8", "fp16"):
        if kind in parity:
            line += f"; {kind} agrees on {100 * parity[kind]['token_agreement']:.0f}% of tokens"
    print(f"loracap: exported ({sizes}); {line}", file=sys.stderr)
    return 0


def _add_explain_parser(commands: argparse._SubParsersAction) -> None:
    exp = _command_parser(
        commands,
        "explain",
        EXPLAIN_CONFIG,
        help="show where a captioner looked for each word of its caption (BLIP, ViT-GPT2, Florence-2)",
        description="Caption IMAGE with an encoder-decoder captioner and write a PNG: the caption, and for "
        "each word a heatmap of the decoder's cross-attention over the image patches (mean of the heads and "
        "of --layers).",
    )
    exp.add_argument("image", nargs="?", help="the image file")
    exp.add_argument("--model", help="a BLIP, ViT-GPT2 or Florence-2 hub id, local folder, or cached id")
    exp.add_argument("--out", help="the PNG to write (default: IMAGE's name + .explain.png, here)")
    exp.add_argument(
        "--layers", help="decoder layers to average, e.g. 0,-1 (negative: from the last; default: all)"
    )
    exp.add_argument("--mode", help="caption, or a Florence-2 mode such as detailed or tags")
    exp.add_argument("--tile", type=int, metavar="PX", help="side of each word's heatmap")
    exp.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    exp.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), help="(default: auto)")
    exp.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default per mode)")
    exp.add_argument("--min-new-tokens", type=int, help="shortest caption in tokens")
    exp.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    exp.add_argument("--quiet", dest="progress", action="store_false", help="only warnings and errors")


def _explain(args: argparse.Namespace) -> int:
    from .quality.explain import explain

    out, shown = explain(_settings(EXPLAIN_CONFIG, args))
    words = len(shown.words)
    rows, cols = shown.grid
    print(f"loracap: {shown.caption!r}: {words} word(s) over {rows}x{cols} patches -> {out}", file=sys.stderr)
    return 0


def _add_edit_parser(commands: argparse._SubParsersAction) -> None:
    ed = _command_parser(
        commands,
        "edit",
        EDIT_CONFIG,
        help="review and fix captions in the browser",
        description="Serve a local web editor for the captions of DIR (any layout loracap reads), indexed "
        "under DIR/.loracap/. Needs `pip install loracap[serve]`.",
    )
    ed.add_argument("dir", nargs="?", help="the dataset folder")
    ed.add_argument("--host", help="address to bind (default 127.0.0.1; any other needs the printed token)")
    ed.add_argument("--port", type=int, help="default 7861")
    ed.add_argument("--no-browser", dest="browser", action="store_false", help="do not open the browser")
    ed.add_argument("--model", help="the captioner re-captioning offers (any --model of loracap caption)")
    ed.add_argument(
        "--tokenizer", help="CLIP tokenizer for the token counter (default: ViT-L/14's, if cached)"
    )
    ed.add_argument("--layout", choices=("auto", "sidecar", "jsonl", "kohya-json"))
    ed.add_argument("--ext", help="sidecar extension (default .txt)")
    ed.add_argument("--metadata-file", help="metadata.jsonl / kohya JSON elsewhere than in DIR")
    ed.add_argument("--token", help="the access token to require (default: made when --host is not local)")
    ed.add_argument("--device", help="where re-captioning runs")
    ed.add_argument(
        "--explain-model",
        metavar="ID_OR_FOLDER",
        help="a BLIP, ViT-GPT2 or Florence-2 captioner: the page shows where it looked for each word of its "
        "caption of the focused image (see loracap explain)",
    )


def _edit(args: argparse.Namespace) -> int:
    from .edit.app import edit

    edit(_settings(EDIT_CONFIG, args))
    return 0


def _add_web_parser(commands: argparse._SubParsersAction) -> None:
    web = _command_parser(
        commands,
        "web",
        WEB_CONFIG,
        help="a page that captions dropped images in the browser (onnxruntime-web), from an ONNX export",
        description="Serve one static page that captions the images dropped on it in the browser, with the "
        "captioner `loracap export-onnx` wrote to OUT; no image is uploaded. --export DIR writes the page's "
        "files to host anywhere instead. The page's JavaScript runtime (onnxruntime-web) comes from npm at a "
        "pinned version, fetched once with --fetch-runtime. Needs `pip install loracap[onnx]`.",
    )
    web.add_argument("model", nargs="?", help="the folder `loracap export-onnx` wrote")
    web.add_argument("--export", metavar="DIR", help="write the page's files into DIR instead of serving")
    web.add_argument("--host", help="address to bind (default 127.0.0.1)")
    web.add_argument("--port", type=int, help="default 8766")
    web.add_argument(
        "--fetch-runtime",
        action="store_true",
        default=None,
        help="fetch onnxruntime-web from npm (once) and stop",
    )


def _web(args: argparse.Namespace) -> int:
    from .browser import run

    return run(_settings(WEB_CONFIG, args))


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    mrg = _command_parser(
        commands,
        "merge",
        MERGE_CONFIG,
        help="merge captioned datasets (any layout loracap reads, saved HF datasets) into one folder",
        description="Copy the images of every DATASET, with their captions, into --out in one caption "
        "format, dropping byte-identical and near-duplicate images; every image is listed with its source "
        "in OUT/merge-manifest.jsonl. Needs `pip install loracap[report]` ([train] too for saved Hugging "
        "Face datasets and --to-hub).",
    )
    mrg.add_argument(
        "sources",
        nargs="*",
        metavar="DATASET",
        help="a dataset folder (sidecar .txt/.caption, metadata.jsonl, kohya meta_cap.json) or a Hugging "
        "Face dataset saved with save_to_disk; the first given keeps its file names when names clash",
    )
    mrg.add_argument("--out", help="the merged dataset folder to write")
    mrg.add_argument("--format", choices=("sidecar", "jsonl", "kohya-json"), help="how captions are written")
    mrg.add_argument("--ext", help="sidecar extension (default .txt)")
    mrg.add_argument(
        "--link", action="store_true", help="hard-link the images instead of copying (copied across disks)"
    )
    mrg.add_argument(
        "--keep-dupes", action="store_true", help="keep byte-identical and near-duplicate images"
    )
    mrg.add_argument("--hash-threshold", type=int, help="phash bits apart that still count as duplicates (6)")
    mrg.add_argument("--sample", type=int, metavar="N", help="at most N images of each dataset, at random")
    mrg.add_argument("--seed", type=int, help="seeds --sample and --split (default: 0)")
    mrg.add_argument(
        "--split",
        metavar="TRAIN,VAL,TEST",
        help="shares for the train/, validation/ and test/ folders, e.g. 0.9,0.05,0.05",
    )
    mrg.add_argument("--to-hub", metavar="ORG/NAME", help="push the merged dataset to the Hugging Face hub")
    mrg.add_argument(
        "--overwrite", action="store_true", help="replace an earlier merge in --out (nothing else is deleted)"
    )
    src = mrg.add_argument_group("reading the datasets")
    src.add_argument("--layout", choices=("auto", "sidecar", "jsonl", "kohya-json"))
    src.add_argument("--image-column", help="saved Hugging Face datasets: the image column")
    src.add_argument(
        "--caption-column",
        help="saved Hugging Face datasets: the caption column (default: text, else caption)",
    )
    mrg.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge

    summary = merge(_settings(MERGE_CONFIG, args))
    print(f"loracap: {summary.describe()}", file=sys.stderr)
    return 0


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    exp = _command_parser(
        commands,
        "export",
        EXPORT_CONFIG,
        help="caption shards (--engine ray on shards/tables) -> a trainer folder",
        description="Write the images of a `loracap caption --engine ray --out SHARDS` run, read again from "
        "its sources, with their captions, into --to in a trainer's layout; each image once.",
    )
    exp.add_argument("shards", nargs="?", help="the --out folder of the captioning run")
    exp.add_argument("--to", help="the trainer folder to write")
    exp.add_argument("--format", choices=("sidecar", "jsonl", "kohya-json"))
    exp.add_argument("--ext", help="sidecar extension (default .txt)")
    exp.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def _export(args: argparse.Namespace) -> int:
    from .scale.export import export

    summary = export(_settings(EXPORT_CONFIG, args))
    print(f"loracap: {summary.describe()}", file=sys.stderr)
    return 0 if not summary.missing else 1


def _add_dreambooth_parser(commands: argparse._SubParsersAction) -> None:
    db = _command_parser(
        commands,
        "dreambooth",
        DREAMBOOTH_CONFIG,
        help="train a DreamBooth LoRA (SD 1.5 / SDXL / Flux) on a captioned folder",
        description="Train a LoRA of the subject in DATA (any caption layout loracap reads) on --base, with "
        "class-prior preservation when --class-prompt is given. --out gets the LoRA (OUT/NAME.safetensors, "
        "kohya layout: ComfyUI models/loras/, A1111/Forge models/Lora/), checkpoints/, samples/ (validation "
        "grids), logs/ (TensorBoard). Needs `pip install loracap[dreambooth]`.",
    )
    db.add_argument("data", nargs="?", help="the captioned image folder")
    db.add_argument("--base", help="the base model: a diffusers folder or hub id (SD 1.x/2.x, SDXL, Flux)")
    db.add_argument("--out", help="the run's folder")
    cap = db.add_argument_group("captions")
    cap.add_argument("--trigger", help="replaces [trigger] in captions; put first where a caption lacks it")
    cap.add_argument("--instance-prompt", help="the caption of images that have none (default: the trigger)")
    cap.add_argument("--layout", choices=("auto", "sidecar", "jsonl", "kohya-json"), help="caption layout")
    cap.add_argument("--caption-ext", metavar="EXT", help="sidecar extension, e.g. .caption")
    cap.add_argument("--metadata-file", help="metadata.jsonl / kohya JSON elsewhere than in DATA")
    cap.add_argument("--caption-dropout", type=float, help="share of steps an image trains uncaptioned")
    cap.add_argument("--shuffle-tags", action="store_true", help="tag captions: shuffle tags every step")
    cap.add_argument("--keep-tokens", type=int, help="tag captions: the first N tags stay in place")
    cap.add_argument("--strict", action="store_true", help="dataset warnings stop the run (exit 2)")
    prior = db.add_argument_group("class-prior preservation")
    prior.add_argument(
        "--class-prompt", help='the class, e.g. "photo of a woman"; turns prior preservation on'
    )
    prior.add_argument(
        "--class-data-dir", metavar="DIR", help="your class images, or where generated ones go"
    )
    prior.add_argument("--num-class-images", type=int, help="class images used (missing ones are generated)")
    prior.add_argument("--prior-loss-weight", type=float)
    prior.add_argument("--class-batch-size", type=int, help="class images generated per pipeline call")
    prior.add_argument("--class-inference-steps", type=int)
    prior.add_argument("--class-guidance", type=float)
    prior.add_argument("--class-seed", type=int, help="class image i uses seed CLASS_SEED + i")
    lora = db.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int)
    lora.add_argument("--alpha", type=float, help="scale alpha/rank (default: the rank)")
    lora.add_argument("--lora-dropout", type=float)
    lora.add_argument(
        "--lora-targets",
        help="denoiser modules, comma-separated (default: to_q,to_k,to_v,to_out.0 for a UNet; Flux: "
        "diffusers' attn.*, ff.* and ff_context.* list)",
    )
    lora.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder(s) too")
    lora.add_argument(
        "--text-encoder-targets", help="comma-separated (default: q_proj,k_proj,v_proj,out_proj)"
    )
    lora.add_argument("--text-encoder-lr", type=float)
    opt = db.add_argument_group("training")
    opt.add_argument("--lr", type=float)
    opt.add_argument(
        "--lr-scheduler",
        choices=(
            "constant",
            "constant_with_warmup",
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
        ),
    )
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--max-steps", type=int, help="optimizer steps (wins over --epochs; neither: 1000)")
    opt.add_argument("--epochs", type=int, help="passes over the instance images")
    opt.add_argument("--batch-size", type=int, help="instance images per batch (+ as many class images)")
    opt.add_argument("--grad-accum", type=int, help="batches per optimizer step")
    opt.add_argument("--max-grad-norm", type=float)
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"))
    opt.add_argument("--use-8bit-adam", action="store_true", help="the same as --optimizer adamw8bit (CUDA)")
    opt.add_argument(
        "--quantize-base",
        choices=("fp8", "nf4"),
        help="store the frozen denoiser quantized: fp8 (any device), nf4 (bitsandbytes, CUDA)",
    )
    opt.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    opt.add_argument("--log-every", type=int, metavar="STEPS", help="steps between loss readings")
    opt.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"))
    opt.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 20%% slower")
    opt.add_argument("--snr-gamma", type=float, help="min-SNR loss weighting, e.g. 5")
    opt.add_argument("--noise-offset", type=float, help="e.g. 0.05: lets it learn darker and brighter images")
    opt.add_argument("--seed", type=int)
    opt.add_argument(
        "--resolution", type=int, help="side in px (default: the base's: 512 SD 1.5, 1024 SDXL and Flux)"
    )
    opt.add_argument("--crop", choices=("center", "random"))
    opt.add_argument("--random-flip", action="store_true", help="mirror images at random")
    opt.add_argument("--workers", type=int, help="data loader processes")
    bkt = db.add_argument_group("aspect-ratio buckets (kohya's)")
    bkt.add_argument(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        help="each image in the bucket nearest its aspect ratio; --no-bucket: square crops",
    )
    bkt.add_argument("--min-bucket-reso", type=int, metavar="PX", help="default min(256, resolution)")
    bkt.add_argument("--max-bucket-reso", type=int, metavar="PX", help="default 2 x resolution")
    bkt.add_argument("--bucket-reso-steps", type=int, metavar="PX")
    bkt.add_argument("--bucket-no-upscale", action="store_true", help="never enlarge small images")
    cache = db.add_argument_group("caches")
    cache.add_argument(
        "--cache-latents", action="store_true", help="encode each image once, to disk (needs --crop center)"
    )
    cache.add_argument(
        "--cache-text",
        action=argparse.BooleanOptionalAction,
        help="encode each caption once while the text encoders are frozen",
    )
    cache.add_argument("--cache-dir", metavar="DIR", help="the latent cache (default OUT/cache)")
    flux = db.add_argument_group("Flux")
    flux.add_argument("--timestep-sampling", choices=("sigmoid", "uniform", "logit-normal"))
    flux.add_argument("--timestep-shift", type=float, help="above 1 trains noisier timesteps more")
    flux.add_argument("--logit-mean", type=float)
    flux.add_argument("--logit-std", type=float)
    flux.add_argument("--flux-guidance", type=float, help="guidance input of dev-style models in training")
    flux.add_argument("--max-sequence-length", type=int, help="T5 tokens (default 512 dev, 256 schnell)")
    ckpt = db.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    ckpt.add_argument(
        "--checkpoints-total-limit", type=int, metavar="N", help="keep the newest N checkpoints"
    )
    ckpt.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    ckpt.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    val = db.add_argument_group("validation")
    val.add_argument(
        "--validation-prompt", action="append", metavar="PROMPT", help="repeatable; [trigger] is replaced"
    )
    val.add_argument("--validation-every", type=int, metavar="STEPS")
    val.add_argument("--validation-images", type=int, help="images per prompt (seeds SEED, SEED+1, ...)")
    val.add_argument("--validation-seed", type=int)
    val.add_argument("--validation-inference-steps", type=int)
    val.add_argument("--validation-guidance", type=float)
    out = db.add_argument_group("output")
    out.add_argument("--output-name", metavar="NAME", help="OUT/NAME.safetensors (default: OUT's name)")
    out.add_argument("--lora-format", choices=("kohya", "diffusers"), help="kohya loads everywhere")
    db.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    db.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bars; only warnings and errors"
    )


def _dreambooth(args: argparse.Namespace) -> int:
    from .dreambooth.loop import dreambooth

    given = vars(args)
    for key in ("lora_targets", "text_encoder_targets"):
        if key in given:
            given = {**given, key: _split_list(given[key])}
    config = _settings(DREAMBOOTH_CONFIG, args, given)
    result = dreambooth(config)
    if not result.is_main_process:  # the main process reports and saves
        return 0
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(
        f"loracap: trained {result.steps} steps{resumed} on {result.instances} images in "
        f"{result.seconds:.0f} s ({result.steps_per_second:.2f} steps/s)",
        file=sys.stderr,
    )
    if result.grids:
        print(f"loracap: validation grids in {result.grids[-1].parent}", file=sys.stderr)
    prompt = f"photo of {config.trigger}" if config.trigger else "PROMPT"
    print(
        f"loracap: LoRA saved to {result.lora} (ComfyUI: models/loras/, A1111/Forge: models/Lora/); try it: "
        f'loracap generate --base {config.base} --lora {result.lora} "{prompt}"',
        file=sys.stderr,
    )
    return 0


def _add_train_parsers(commands: argparse._SubParsersAction) -> None:
    trn = _command_parser(
        commands,
        "train",
        TRAIN_SETTINGS,
        help="train a small captioner on your own captions",
        description="Teach a prefix captioner (frozen vision tower -> projector -> LM with LoRA) the style "
        "of the captions in DATA (a loracap-captioned folder, or a Hugging Face dataset id / saved dataset). "
        "The result in --out is a model folder for `loracap caption --model`. Needs loracap[train].",
    )
    trn.add_argument("data", nargs="?", help="captioned image folder, or a Hugging Face dataset")
    trn.add_argument("--out", help="the captioner folder to write (checkpoints go inside)")
    trn.add_argument("--vision", help="SigLIP / CLIP vision checkpoint")
    trn.add_argument("--lm", help="decoder-only LM checkpoint")
    trn.add_argument("--from", dest="init_from", help="continue from a trained captioner folder")
    trn.add_argument("--prompt", help="text between image and caption, e.g. 'A photo of'")
    trn.add_argument("--projector", choices=("linear", "mlp"))
    trn.add_argument("--pixel-shuffle", type=int, help="2 folds 2x2 patches: 4x fewer prefix tokens")
    trn.add_argument("--max-caption-tokens", type=int)
    trn.add_argument("--unfreeze-vision-layers", type=int, help="train the top N vision layers too")
    trn.add_argument("--lora-r", type=int)
    trn.add_argument("--lora-alpha", type=int)
    trn.add_argument("--lora-dropout", type=float)
    trn.add_argument("--lora-targets", help="comma-separated module names (default: peft's for the LM)")
    trn.add_argument("--lr-projector", type=float)
    trn.add_argument("--lr-lora", type=float)
    trn.add_argument("--lr-vision", type=float)
    trn.add_argument("--warmup-steps", type=int)
    trn.add_argument("--epochs", type=int)
    trn.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    trn.add_argument("--batch-size", type=int)
    trn.add_argument("--grad-accum", type=int, help="batches per optimizer step")
    trn.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"))
    trn.add_argument("--seed", type=int, help="split, shuffling and initialisation")
    trn.add_argument("--val-share", type=float)
    trn.add_argument("--test-share", type=float)
    trn.add_argument("--eval-every", type=int, help="validate every N steps")
    trn.add_argument("--checkpoint-every", type=int)
    trn.add_argument("--patience", type=int, help="evaluations without improvement before stopping")
    trn.add_argument("--clip-loss-weight", type=float, help="weight of the CLIP alignment term")
    trn.add_argument("--clip-model", help="for --clip-loss-weight")
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
    trn.add_argument("--workers", type=int, help="data loader processes")
    trn.add_argument("--image-column", help="Hugging Face datasets: the image column")
    trn.add_argument("--caption-column", help="Hugging Face datasets: the caption column")
    trn.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    trn.add_argument(
        "--quiet", dest="progress", action="store_false", help="no progress bars; only warnings and errors"
    )

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
    ev.add_argument("--quiet", action="store_true", help="no progress bars; only warnings and errors")


def _train(args: argparse.Namespace) -> int:
    from .train.loop import train

    given = vars(args)
    if "lora_targets" in given:
        given = {**given, "lora_targets": list(_split_list(given["lora_targets"])) or None}
    result = train(_settings(TRAIN_SETTINGS, args, given))
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
    clip = f", CLIPScore {result['clip_score']:.2f}" if result.get("clip_score") is not None else ""
    print(
        f"loracap: {result['images']} images ({result['split']}): BLEU-4 {result['bleu4']:.3f}, "
        f"ROUGE-L {result['rouge_l']:.3f}, CIDEr {result['cider']:.3f}{clip}"
        + (f"; written to {result['written_to']}" if "written_to" in result else "")
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .quality.report import report, summary_lines

    config = _settings(REPORT_CONFIG, args)
    rep = report(config)
    print(f"loracap report: {config.dir}")
    for line in summary_lines(rep):
        print(f"  {line}")
    print(f"report: {rep.html_path} (numbers in {rep.json_path.name})")
    for failure in rep.failures:
        print(f"FAIL {failure}")
    return 0 if rep.passed else 1


def _caption(args: argparse.Namespace) -> int:
    from .pipeline import caption_folder
    from .postprocess import parse_replace_tags

    given = vars(args)
    # The command line spells two settings its own way: lists as repeatable comma-separated flags.
    if "remove_tags" in given:
        given = {**given, "remove_tags": _split_list(given["remove_tags"])}
    if "replace_tags" in given:
        given = {**given, "replace_tags": parse_replace_tags(given["replace_tags"])}
    config = _settings(CAPTION_CONFIG, args, given)
    if config.engine in ("ray", "ray-vllm"):
        from .scale.ray_engine import caption_with_ray

        summary = caption_with_ray(config)
    else:
        summary = caption_folder(config)
    if summary.write_problem():
        print(f"loracap: error: {summary.write_problem()}", file=sys.stderr)
    print(f"loracap: {summary.describe()}", file=sys.stderr)
    return 0 if summary.ok else 1


def _models() -> int:
    from .hub import is_cached
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
    from .serve import serve

    with suppress(KeyboardInterrupt):  # how a server is stopped by hand: not an error
        serve(_settings(SERVE_CONFIG, args))
    return 0


@dataclass(frozen=True)
class _Command:
    """How `main` runs one command and maps what can go wrong to one line and an exit status."""

    run: Callable[[argparse.Namespace], int]
    extra: str | None = None
    """The pip extra whose missing packages mean "install it", not a crash."""
    interrupted: str = "interrupted."
    """What Ctrl-C leaves behind, said after "loracap: " (exit status 130)."""
    what: str = ""
    """What the command is called in "... needs X" (default: "the NAME command")."""


_COMMANDS = {
    "merge": _Command(
        _merge,
        extra="report",
        interrupted="interrupted; --out is as it was (the merge is written beside it and moved into place "
        "at the end).",
        what="merging",
    ),
    "export-onnx": _Command(_export_onnx, extra="onnx", what="ONNX export"),
    "explain": _Command(_explain),
    "web": _Command(_web, extra="onnx", what="the caption page"),
    "edit": _Command(
        _edit, extra="serve", interrupted="stopped; every saved caption is on disk.", what="editing"
    ),
    "export": _Command(
        _export,
        extra="ray",
        interrupted="interrupted; images and captions written so far are kept. Run it again to resume.",
    ),
    "caption": _Command(
        _caption,
        interrupted="interrupted; captions written so far are kept. Run the same command again to resume.",
    ),
    "report": _Command(
        _report,
        extra="report",
        interrupted="interrupted; CLIP scores computed so far are cached for the next run.",
    ),
    "serve": _Command(_serve, extra="serve", what="serving"),
    "train": _Command(
        _train,
        extra="train",
        interrupted="interrupted; run again with --resume to continue from the last checkpoint.",
        what="training",
    ),
    "eval": _Command(_eval, extra="train", what="evaluation"),
    "dreambooth": _Command(
        _dreambooth,
        extra="dreambooth",
        interrupted="interrupted; the last step's checkpoint is saved. Run the same command with --resume "
        "to continue.",
        what="DreamBooth training",
    ),
    "generate": _Command(
        _generate,
        extra="dreambooth",
        interrupted="interrupted; images already written are kept.",
        what="generation",
    ),
    "models": _Command(lambda args: _models()),
    "styles": _Command(lambda args: _styles()),
}


def run_command(name: str, args: argparse.Namespace) -> int:
    """Run a command: exit status 0/1 as it says, 2 with one line for what the user can fix (a bad option,
    a missing folder or model, a missing extra), 130 after Ctrl-C."""
    command = _COMMANDS[name]
    try:
        return command.run(args)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if command.extra is None or not missing or missing == "loracap":
            raise
        what = command.what or f"the {name} command"
        print(
            f"loracap: error: {what} needs {missing}: pip install 'loracap[{command.extra}]'", file=sys.stderr
        )
        return 2
    except _USER_ERRORS as exc:
        print(f"loracap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nloracap: {command.interrupted}", file=sys.stderr)
        return 130


class _ConsoleHandler(logging.Handler):
    """loracap's messages on stderr, written around any progress bar on screen instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup_logging(quiet: bool, verbose: bool) -> None:
    """Library code logs; the command shows it: info and up by default, warnings and up with --quiet
    (which also silences the Hugging Face libraries' own progress bars), everything with -v."""
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("loracap: %(message)s"))
    logger = logging.getLogger("loracap")
    logger.handlers = [handler]  # one, however often main() runs in a process
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if quiet:
        # Read by huggingface_hub (and through it transformers) when first imported; if they already are,
        # tell them directly. "Loading weights" is a transformers bar.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            import transformers.utils.logging

            transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):  # before any command imports the Hugging Face libraries
        os.environ["HF_HUB_OFFLINE"] = "1"
    quiet = getattr(args, "progress", True) is False or getattr(args, "quiet", False)
    setup_logging(quiet, getattr(args, "verbose", False))
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
