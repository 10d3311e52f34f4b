"""`loracap web MODEL`: one static page that captions the images dropped on it in the browser, with
onnxruntime-web (WASM; WebGPU where the browser has it), from a model `loracap export-onnx` wrote. No image
leaves the machine: the server only hands out the page, the runtime and the model's files.

The page's files (`--export DIR` writes them to host anywhere):

    index.html, caption.js, caption.css       the page (loracap/web/templates + static)
    vendor/                                   onnxruntime-web and fflate, pinned (see runtime.py)
    model/manifest.json                       what the page needs to know of the model (below)
    model/tokens.json                         each token id's bytes, to turn token ids into text
    model/onnx/*.onnx                         the exported graphs

The manifest holds what Python knows and JavaScript should not have to work out again: the layout and its
graphs per precision, the image processor's resize / rescale / normalize, the start, end and prompt ids,
the caption length, and each cache input's shape. Decoding is the same greedy loop as the onnxruntime
backend's (`loracap.backends.onnx_captioner`), so for the same pixels the page writes the same tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracap.backends.onnx_captioner import LAYOUTS, SUFFIXES, onnx_layout
from loracap.hub import resolve_model

from .runtime import PACKAGES, fetch_runtime, package_dir, runtime_dir

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parents[1] / "web"
PAGE_FILES = {"caption.js": WEB / "static" / "caption.js", "caption.css": WEB / "static" / "caption.css"}

__all__ = ["WebConfig", "manifest", "page_files", "serve_page", "write_page"]


@dataclass
class WebConfig:
    """Every setting of `loracap web`."""

    model: str | Path | None = None
    """A folder (or hub id) that `loracap export-onnx` wrote."""
    export: str | Path | None = None
    """Write the page's files into this folder instead of serving them."""
    host: str = "127.0.0.1"
    port: int = 8766
    fetch_runtime: bool = False
    """Only fetch onnxruntime-web and fflate from npm (once) and stop."""


def manifest(folder: Path) -> dict[str, Any]:
    """What the page needs to know of the exported model in `folder` (see the module docstring)."""
    import onnx

    layout = onnx_layout(folder)
    if layout is None:
        raise ValueError(
            f"{folder} is not an ONNX captioner: run `loracap export-onnx MODEL OUT` and give OUT"
        )
    from transformers import AutoImageProcessor

    from loracap.backends.onnx_captioner import generation_rules

    config = json.loads((folder / "config.json").read_text())
    processor = AutoImageProcessor.from_pretrained(folder).to_dict()
    tokenizer = _tokenizer(folder)
    variants = {
        (quant or "fp32"): {g: f"onnx/{g}{suffix}.onnx" for g in LAYOUTS[layout]}
        for quant, suffix in SUFFIXES.items()
        if all((folder / "onnx" / f"{g}{suffix}.onnx").is_file() for g in LAYOUTS[layout])
    }
    decoder = onnx.load(str(folder / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    caches = [
        {"name": i.name, "heads": i.type.tensor_type.shape.dim[1].dim_value,
         "width": i.type.tensor_type.shape.dim[3].dim_value}
        for i in decoder.graph.input if i.name.startswith("past_key_values")
    ]  # fmt: skip
    rules = {**generation_rules(folder), "suppress": [], "prefix": []}
    info: dict[str, Any] = {"name": folder.name, "layout": layout, "variants": variants, "caches": caches,
                            "image": _image_settings(processor), "start_id": None,
                            "prompt_ids": []}  # fmt: skip
    if layout == "prefix":
        prompt = config.get("prompt") or ""
        info["prompt_ids"] = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        info.update(eos_id=tokenizer.eos_token_id, max_new_tokens=config.get("max_caption_tokens") or 32)
    elif layout == "florence2":
        info.update(_florence2(folder, rules))
    else:
        info["start_id"] = config.get("decoder_start_token_id") or 0
        info["eos_id"] = config.get("eos_token_id", config.get("decoder", {}).get("eos_token_id"))
        info["max_new_tokens"] = 32
        rules["prefix"] = [info["start_id"]]
    return {**info, "rules": rules}


def _florence2(folder: Path, rules: dict[str, Any]) -> dict[str, Any]:
    """Florence-2's tasks as the page runs them: each caption mode's encoder input ids (the task prompt with
    the image's placeholder tokens), its caption length, and the decoder's start and suppressed ids."""
    from PIL import Image
    from transformers import AutoProcessor

    from loracap.backends.florence2_tasks import DEFAULT_MAX_NEW_TOKENS, task_text

    processor = AutoProcessor.from_pretrained(folder)
    settings = json.loads((folder / "onnx" / "florence2.json").read_text())
    blank = Image.new("RGB", (8, 8))
    modes = {
        mode: {
            "input_ids": processor(
                text=[task_text(settings["tasks"], settings["modes"], mode, None)], images=[blank]
            )["input_ids"][0],
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS.get(mode, 256),
        }
        for mode in settings["modes"]
    }
    generation = json.loads((folder / "generation_config.json").read_text())
    rules.update(suppress=settings["suppress_ids"], prefix=settings["decoder_prefix"], forced_bos=None)
    return {
        "modes": modes,
        "image_token_id": settings["image_token_id"],
        "decoder_prefix": settings["decoder_prefix"],
        "eos_id": generation.get("eos_token_id"),
        "max_new_tokens": modes.get("caption", next(iter(modes.values())))["max_new_tokens"],
    }


@functools.cache  # the manifest and the token table both need it: loaded once per folder
def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _image_settings(processor: dict[str, Any]) -> dict[str, Any]:
    """The image processor's steps, as the page repeats them: resize to height x width (or the shortest
    edge, then a centre crop), rescale, normalize."""
    size = processor.get("size") or {}
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    return {
        "height": size.get("height"),
        "width": size.get("width"),
        "shortest_edge": size.get("shortest_edge"),
        "crop": crop,
        "rescale": processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0,
        "mean": processor.get("image_mean", [0.0, 0.0, 0.0]) if processor.get("do_normalize", True) else None,
        "std": processor.get("image_std", [1.0, 1.0, 1.0]) if processor.get("do_normalize", True) else None,
    }


def token_bytes(folder: Path) -> dict[str, Any]:
    """Each token id's bytes (hex) and the ids of special tokens, which captions leave out: the page
    joins the bytes of a caption's tokens and decodes them as UTF-8, as the tokenizer's decode does."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = _tokenizer(folder)
    data = (
        json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    )
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pieces = []
    for token in tokens:
        if token is None:
            pieces.append("")
        elif byte_level:
            pieces.append(bytes(to_byte[c] for c in token if c in to_byte).hex())
        else:  # SentencePiece-style: a word starts with "▁"
            pieces.append(token.replace("\u2581", " ").encode().hex())
    return {"bytes": pieces, "special": sorted(set(tokenizer.all_special_ids))}


def page_files(model: Path) -> dict[str, Path | bytes]:
    """Every file of the page: its path on the site -> a file to serve, or the bytes of a generated one."""
    vendor = runtime_dir()
    if vendor is None:
        raise ValueError(
            "the page's runtime (onnxruntime-web, fflate) is not here yet: run `loracap web --fetch-runtime` "
            "once (it downloads them from npm)"
        )
    folder = resolve_model(str(model))
    info = manifest(folder)
    files: dict[str, Path | bytes] = {
        "index.html": _render_index(info),
        **PAGE_FILES,
        "model/manifest.json": json.dumps(info, indent=1).encode(),
        "model/tokens.json": json.dumps(token_bytes(folder)).encode(),
    }
    for graphs in info["variants"].values():
        for path in graphs.values():
            files[f"model/{path}"] = folder / path
    for package in PACKAGES:
        for name in package.files:
            files[f"vendor/{package.name}/{name}"] = package_dir(vendor, package) / name
    return files


def _render_index(info: dict[str, Any]) -> bytes:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(WEB / "templates"), autoescape=select_autoescape())
    return env.get_template("caption.html.j2").render(model=info).encode()


def write_page(config: WebConfig) -> Path:
    """`--export DIR`: the page's files in DIR (graphs hard-linked where the file system allows)."""
    out = Path(config.export)
    for name, source in page_files(Path(str(config.model))).items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
            continue
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, target)
    return out


def serve_page(config: WebConfig) -> None:
    """Serve the page until interrupted. Only the page's own files are served, by exact path."""
    from .server import serve_files

    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach it can download the model", config.host)
    serve_files(page_files(Path(str(config.model))), config.host, config.port)


def run(config: WebConfig) -> int:
    if config.fetch_runtime:
        print(fetch_runtime())
        return 0
    if config.model is None:
        raise ValueError("give the exported model's folder: loracap web OUT")
    if config.export is not None:
        print(f"loracap: wrote the page to {write_page(config)}; open index.html through any web server")
        return 0
    serve_page(config)
    return 0
