"""The base model a DreamBooth LoRA is trained on and generated with: a diffusers pipeline folder.

`base_family(folder)` says which of the supported families a folder holds ("sd15", "sdxl", "flux") from its
model_index.json alone, so anything else is refused before a weight is read; `load_base(spec)` finds the
folder (a local path, the Hugging Face cache, or a download of just the files the pipeline needs), checks it
and loads the family's pipeline on the chosen device in the chosen precision.

"sd15" is every `StableDiffusionPipeline`: SD 1.x, and SD 2.x too. An SD 2.x "-v" model predicts v rather
than noise; its scheduler config says so (`prediction_type`), and diffusers' pipelines and schedulers follow
that setting, so generation works unchanged. Training code must read it (see `prediction_type`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loracap.hub import ModelUnavailable, hf_cache_dir, offline_mode, resolve_model

log = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "flux")

PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
}
"""The diffusers class each family is loaded with."""

# model_index.json `_class_name`s accepted per family: the text-to-image pipeline and the image-to-image one,
# which saves the same components.
_CLASS_NAMES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}
_COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SUPPORTED = (
    "Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) "
    "or Flux (FluxPipeline)"
)


def base_family(folder: str | Path) -> str:
    """ "sd15", "sdxl" or "flux": the family of the diffusers pipeline saved in `folder`, from its
    model_index.json (and the denoiser's config.json), without loading anything.

    ValueError, naming what was found, for a folder that holds no diffusers pipeline, another pipeline, an
    SDXL refiner (no first text encoder) or an inpainting model (a denoiser fed more than the latents).
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json{_what_else(folder)}"
        )
    index = _read_json(index_file)
    name = index.get("_class_name")
    family = _CLASS_NAMES.get(name)
    if family is None:
        raise ValueError(
            f"{folder} holds a {name or 'pipeline of no named class'}, not a base loracap can use: "
            f"{_SUPPORTED}"
        )
    missing = [c for c in _COMPONENTS[family] if not (isinstance(index.get(c), list) and index[c][0])]
    if missing:
        refiner = " (an SDXL refiner?)" if family == "sdxl" and "text_encoder" in missing else ""
        raise ValueError(
            f"{folder} holds a {name} without {', '.join(missing)}{refiner}: a text-to-image base has them"
        )
    if family != "flux":
        channels = _read_json(folder / "unet" / "config.json").get("in_channels", 4)
        if channels != 4:
            raise ValueError(
                f"{folder} holds a {name} whose UNet takes {channels} input channels (an inpainting model?); "
                "a text-to-image base takes 4"
            )
    return family


def prediction_type(folder: str | Path) -> str:
    """What the base's denoiser predicts, from its scheduler config: "epsilon" (SD 1.x, SD 2.x base, SDXL),
    "v_prediction" (SD 2.x -v models) or "flow" for Flux (a flow-matching velocity)."""
    folder = Path(folder)
    if base_family(folder) == "flux":
        return "flow"
    return _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")


def resolve_base(spec: str | Path, *, offline: bool | None = None) -> Path:
    """The local folder of `--base`: a path as given; for a hub id, its files in the Hugging Face cache,
    fetching what is missing unless offline (model_index.json first, checked with `base_family` before
    any weights come, then only the files the pipeline loads).

    ModelUnavailable (one line saying what to do) when it cannot be had, ValueError when it is not a base.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    is_offline = offline_mode() if offline is None else offline
    if not is_offline:
        if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
            return _download(spec)  # files already in the cache are not fetched again
        raise ModelUnavailable(
            f"no model folder at {spec}, and it is not a Hugging Face model id (owner/name)"
        )
    try:
        return resolve_model(spec, offline=True)  # the cached snapshot, or the one-line fix
    except ModelUnavailable as exc:
        raise ModelUnavailable(str(exc).replace("--model PATH", "--base PATH")) from None


def load_base(
    spec: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    quantization: Any = None,
) -> Any:
    """The family's diffusers pipeline for `spec` (folder or hub id), on `device` in `dtype` ("auto" or None:
    CUDA bf16/fp16, Apple MPS fp16, else CPU fp32), with no safety checker and its sampling progress bar off.
    `progress=False` also hides diffusers' and transformers' loading bars. `quantization`: a diffusers
    `PipelineQuantizationConfig` the weights are loaded with.

    The family is checked (`base_family`) before anything loads.
    """
    folder = resolve_base(spec)
    family = base_family(folder)
    import diffusers

    from loracap.backends.device import choose_placement

    placement = choose_placement(device, dtype)

    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    extra = extra if family == "sd15" else {}
    log.info("loading the %s base %s on %s", family, spec, placement.describe())
    # diffusers 0.42 takes dtype (torch_dtype still works there, with a deprecation warning); older
    # releases take torch_dtype.
    new_name = tuple(int(x) for x in re.findall(r"\d+", diffusers.__version__)[:2]) >= (0, 42)
    extra["dtype" if new_name else "torch_dtype"] = placement.dtype
    if quantization is not None:
        extra["quantization_config"] = quantization
    with _loading_bars(progress):
        pipe = pipeline_class.from_pretrained(folder, **extra)
    pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_family(pipe: Any) -> str:
    """The family of a pipeline `load_base` returned (or any pipeline of those classes)."""
    for family, name in PIPELINE_CLASSES.items():
        if any(cls.__name__ == name for cls in type(pipe).__mro__):
            return family
    raise ValueError(f"{type(pipe).__name__} is not a pipeline of {_SUPPORTED}")


@contextmanager
def _loading_bars(shown: bool) -> Iterator[None]:
    """diffusers' and transformers' loading progress bars, hidden while loading unless `shown`."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hidden = [
        m for m in (diffusers_logging, transformers_logging) if not shown and m.is_progress_bar_enabled()
    ]
    for module in hidden:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in hidden:
            module.enable_progress_bar()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _what_else(folder: Path) -> str:
    """What a folder without model_index.json holds instead, said after the refusal."""
    if folder.is_file():
        return " (a single-file checkpoint: pass the diffusers folder or hub id of the pipeline instead)"
    config = _read_json(folder / "config.json") if folder.is_dir() else {}
    kinds = config.get("architectures") or [config.get("model_type") or config.get("_class_name")]
    kinds = [k for k in kinds if k]
    return f"; its config.json describes a {', '.join(kinds)}" if kinds else ""


def _download(repo_id: str) -> Path:
    """model_index.json, the family check, then the pipeline's own files (not the single-file checkpoints
    and other precisions that hub repositories of these models also hold)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    cache = hf_cache_dir()
    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", cache_dir=cache))
        family = base_family(index.parent)
        import diffusers

        log.info("downloading the %s base %s (first use; cached for next time in %s)", family, repo_id, cache)
        skip = {"safety_checker": None, "feature_extractor": None} if family == "sd15" else {}
        return Path(diffusers.DiffusionPipeline.download(repo_id, cache_dir=cache, **skip))
    except GatedRepoError:
        raise ModelUnavailable(
            f"{repo_id} is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"no model named {repo_id} on the Hugging Face hub (check the spelling)"
        ) from None
    except EntryNotFoundError:
        raise ValueError(f"{repo_id} is not a diffusers pipeline: it has no model_index.json") from None
    except (ValueError, ModelUnavailable):
        raise
    except Exception as exc:  # network failures arrive as httpx, OSError or hub errors alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(
            f"could not download {repo_id} ({reason}): check the connection, or run `hf download {repo_id}` "
            f"on a machine with internet and copy {cache} here (then HF_HUB_OFFLINE=1 skips the network)"
        ) from None
