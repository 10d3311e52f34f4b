"""`loracap generate`: images from a base model, with or without a LoRA, written as files and one grid.

Classifier-free guidance. Stable Diffusion 1.x/2.x and SDXL: with `cfg` above 1 diffusers' pipelines run the
conditional and the unconditional (negative-prompt) input through the UNet as one batch of 2 x images each
step (`torch.cat([latents] * 2)` in StableDiffusionPipeline and StableDiffusionXLPipeline), and mix the two
predictions by `cfg`. Flux models are guidance-distilled and need no CFG, so there `cfg` defaults to 1 (off);
above 1 it is FluxPipeline's "true CFG" (`true_cfg_scale`), which runs the transformer twice a step, once on
the prompt and once on the negative prompt (empty unless given), not as one batch. Flux-dev's own guidance
embedding stays at diffusers' default (3.5); Flux-schnell has none.

Seeds: image j of every prompt starts from `seed + j` (its own CPU `torch.Generator`, so a GPU and a CPU start
from the same noise), and one pipeline call never mixes prompts, so adding prompts leaves the images of the
earlier ones as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracap.dreambooth.base import base_family, load_base, pipeline_family, resolve_base
from loracap.files import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

log = logging.getLogger(__name__)

ADAPTER = "loracap"
"""The adapter name the LoRA is loaded under."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""What diffusers' `save_lora_weights` writes; read from a --lora folder first."""

# name -> (diffusers class, settings over the base's scheduler config); "" keeps the base's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Flux samples by flow matching: its own Euler sampler is the one that fits.
FLUX_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
}

_DEFAULT_CFG = {"sd15": 7.5, "sdxl": 5.0, "flux": 1.0}
_DEFAULT_STEPS = {"sd15": 30, "sdxl": 30}
_DEFAULT_BATCH = {"sd15": 4, "sdxl": 2, "flux": 2}
_SIZE_MULTIPLE = {"sd15": 8, "sdxl": 8, "flux": 16}  # the VAE's factor (x2 for Flux's 2x2 token packing)


@dataclass
class GenerateConfig:
    """Every setting of `loracap generate`: from its flags, a TOML file (`--config`) or code (see
    loracap.config). A setting left None takes the base family's default."""

    base: str | Path | None = None
    """The base pipeline: a diffusers folder or a hub id (SD 1.x/2.x, SDXL or Flux)."""
    lora: str | Path | None = None
    """A LoRA .safetensors file, or a folder holding one (diffusers or kohya format); None: the base alone."""
    prompts: list[str] = dataclasses.field(default_factory=list)
    prompts_file: str | Path | None = None
    """A text file of more prompts, one a line (blank lines skipped), after `prompts`."""
    negative: str = ""
    """The negative prompt: what guidance steers away from (only with cfg above 1)."""
    n: int = 4
    """Images per prompt."""
    seed: int = 0
    """Image j of each prompt uses seed + j."""
    cfg: float | None = None
    """Classifier-free guidance scale; 1 or less: none (default 7.5 SD 1.x/2.x, 5 SDXL, 1 Flux)."""
    steps: int | None = None
    """Denoising steps (default 30; Flux 4 for schnell, 28 for a model with a guidance embedding)."""
    scheduler: str = "default"
    """The sampler: default (the base's own), or one of SCHEDULERS (Flux: default or euler)."""
    lora_scale: float = 1.0
    """How much of the LoRA is applied; 0 gives the base's images exactly."""
    width: int | None = None
    """Image width in pixels (default: the base's native size)."""
    height: int | None = None
    out: str | Path = "generated/grid.png"
    """The grid PNG; the images go beside it as <stem>-<prompt index>-<image index>.png."""
    captions: bool = False
    """Also write each image's prompt beside it as its caption (<image stem>.txt): generated images that
    join a dataset come captioned with the prompt they were made from."""
    batch_size: int | None = None
    """Images per pipeline call (default: 4 SD 1.x/2.x, 2 SDXL and Flux); CFG doubles the UNet's batch."""
    device: str | None = None
    dtype: str | None = None
    progress: bool = True

    def all_prompts(self) -> list[str]:
        """`prompts`, then the lines of `prompts_file`."""
        prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        if self.prompts_file is not None:
            try:
                text = Path(self.prompts_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"cannot read --prompts-file {self.prompts_file}: {exc.strerror or exc}"
                ) from None
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        return prompts

    def grid_path(self) -> Path:
        """Where the grid goes: `out`, or grid.png inside it when it is a folder."""
        out = Path(self.out).expanduser()
        return out / "grid.png" if out.is_dir() else out

    def check(self) -> None:
        """ValueError (FileNotFoundError for a missing LoRA) for settings that cannot work, before any model
        is found or loaded."""
        if not self.base:
            raise ValueError("no base model: give --base (a diffusers folder or hub id)")
        if not self.all_prompts():
            raise ValueError("no prompt: give one or more prompts, or --prompts-file")
        for name in ("n", "steps", "batch_size", "width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.grid_path().suffix.lower() != ".png":
            raise ValueError(f"--out names the grid PNG (e.g. grid.png) or a folder, not {self.out}")
        if self.lora is not None:
            lora_file(self.lora)


def generate(config: GenerateConfig) -> list[Path]:
    """Generate `n` images for each prompt and write them, then the grid (rows: prompts, columns: images).

    Returns the image paths, prompt by prompt, then the grid's. The base is refused before anything loads
    when it is not a pipeline of a supported family (ValueError), or cannot be had (ModelUnavailable).
    """
    config.check()
    family = base_family(resolve_base(config.base))
    _check_for_family(config, family)
    pipe = load_base(config.base, device=config.device, dtype=config.dtype, progress=config.progress)
    set_scheduler(pipe, config.scheduler)
    if config.lora is not None:
        apply_lora(pipe, config.lora, config.lora_scale)
    elif config.lora_scale != 1.0:
        log.warning("--lora-scale has no effect without --lora")
    config = _with_defaults(config, pipe, pipeline_family(pipe))
    grid_path = config.grid_path()
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    prompts = config.all_prompts()
    written: list[Path] = []

    def save(prompt_index: int, first: int, batch: list[Image.Image]) -> None:
        for j, image in enumerate(batch, start=first):  # as each batch comes: Ctrl-C keeps them
            path = grid_path.with_name(f"{grid_path.stem}-{prompt_index}-{j}.png")
            _save_image(image, path, _parameters(config, prompts[prompt_index], config.seed + j, image))
            if config.captions:
                atomic_write_text(path.with_suffix(".txt"), prompts[prompt_index] + "\n")
            written.append(path)

    images = render_images(pipe, config, on_batch=save)
    _grid(images).save(grid_path)
    return [*written, grid_path]


def render_images(
    pipe: Any,
    config: GenerateConfig,
    *,
    on_batch: Callable[[int, int, list[Image.Image]], None] | None = None,
) -> list[list[Image.Image]]:
    """The images of `config`'s prompts from a pipeline already in memory (`load_base`, with any LoRA and
    scheduler set): one list of `n` images per prompt. Reads the sampling settings of `config` only (not
    base, lora, scheduler or out). `on_batch(prompt index, index of the first image, images)` is called
    as each pipeline call returns."""
    import torch
    from tqdm.auto import tqdm

    family = pipeline_family(pipe)
    prompts = config.all_prompts()
    config = _with_defaults(config, pipe, family)
    _say_plan(config, family, len(prompts))
    if config.negative and config.cfg <= 1:
        log.warning("--negative has no effect without --cfg above 1")
    calls = [
        (i, start, min(config.batch_size, config.n - start))
        for i in range(len(prompts))
        for start in range(0, config.n, config.batch_size)
    ]
    images: list[list[Image.Image]] = [[] for _ in prompts]
    bar = tqdm(
        total=len(prompts) * config.n,
        desc="generating",
        bar_format="{l_bar}{bar}| {n:.0f}/{total} img [{elapsed}<{remaining}, {rate_fmt}]",
        unit="img",
        disable=not config.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    done = 0
    with bar:
        for i, start, count in calls:
            generators = [torch.Generator().manual_seed(config.seed + j) for j in range(start, start + count)]

            def step_done(pipe: Any, step: int, timestep: Any, tensors: dict, count: int = count) -> dict:
                bar.update(count / max(pipe.num_timesteps, 1))
                return tensors

            result = pipe(
                prompt=prompts[i],
                num_images_per_prompt=count,
                generator=generators,
                num_inference_steps=config.steps,
                width=config.width,
                height=config.height,
                callback_on_step_end=step_done,
                output_type="pil",
                **_guidance_arguments(config, family, pipe),
            )
            images[i].extend(result.images)
            if on_batch is not None:
                on_batch(i, start, result.images)
            done += count
            bar.n = done  # whole images, whatever the per-step fractions added up to
            bar.refresh()
    return images


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by `name`'s (see SCHEDULERS), built from the base's scheduler config
    so its noise schedule and prediction type (epsilon, v) carry over."""
    import diffusers

    family = pipeline_family(pipe)
    table = FLUX_SCHEDULERS if family == "flux" else SCHEDULERS
    if name not in table:
        raise ValueError(f"scheduler {name!r} does not sample {family}; choose one of {', '.join(table)}")
    class_name, settings = table[name]
    if class_name:
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)


def lora_file(path: str | Path) -> Path:
    """The LoRA weights file `--lora` names: the file itself, or in a folder pytorch_lora_weights.safetensors,
    else its only .safetensors file."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.is_dir():
        raise FileNotFoundError(f"no LoRA file or folder at {path}")
    if (given / LORA_WEIGHT_NAME).is_file():
        return given / LORA_WEIGHT_NAME
    found = sorted(given.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    names = f": {', '.join(f.name for f in found)}" if found else ""
    raise ValueError(
        f"{path} holds {len(found)} .safetensors files{names}; pass the one to use with --lora FILE"
    )


def apply_lora(pipe: Any, path: str | Path, scale: float = 1.0) -> None:
    """Load a LoRA (diffusers or kohya format; diffusers converts kohya's keys) into the pipeline's denoiser
    and text encoders, at `scale`. ValueError when it does not fit the base or matches none of its layers."""
    from safetensors import SafetensorError

    file = lora_file(path)
    family = pipeline_family(pipe)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the LoRA {file} into this {family} base: {reason}") from None
    if not any(ADAPTER in names for names in pipe.get_list_adapters().values()):
        raise ValueError(
            f"the LoRA {file} matches no layer of this {family} base (a LoRA for another model?)"
        )
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    log.info("LoRA %s at scale %g", file, scale)


# ------------------------------------------------------------------------------------------------ helpers


def _check_for_family(config: GenerateConfig, family: str) -> None:
    """What can be refused once the family is known, still before loading."""
    table = FLUX_SCHEDULERS if family == "flux" else SCHEDULERS
    if config.scheduler not in table:
        raise ValueError(
            f"scheduler {config.scheduler!r} does not sample {family}; choose one of {', '.join(table)}"
        )
    multiple = _SIZE_MULTIPLE[family]
    for name in ("width", "height"):
        value = getattr(config, name)
        if value is not None and value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} for {family}, not {value}")


def _with_defaults(config: GenerateConfig, pipe: Any, family: str) -> GenerateConfig:
    """`config` with the family's defaults in place of the settings left None."""
    if family == "flux":
        native = pipe.default_sample_size * pipe.vae_scale_factor
        steps = 28 if pipe.transformer.config.guidance_embeds else 4
    else:
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        steps = _DEFAULT_STEPS[family]
    return dataclasses.replace(
        config,
        cfg=_DEFAULT_CFG[family] if config.cfg is None else config.cfg,
        steps=config.steps or steps,
        width=config.width or native,
        height=config.height or native,
        batch_size=config.batch_size or _DEFAULT_BATCH[family],
    )


def _guidance_arguments(config: GenerateConfig, family: str, pipe: Any) -> dict[str, Any]:
    """The pipeline arguments for `cfg` and the negative prompt."""
    guided = config.cfg > 1
    if family == "flux":
        # Schnell reads a 256-token T5 prompt; the models with a guidance embedding (dev) 512.
        kwargs: dict[str, Any] = {
            "max_sequence_length": 512 if pipe.transformer.config.guidance_embeds else 256
        }
        if guided:  # an empty negative prompt still turns true CFG on (unconditional = "")
            kwargs.update(true_cfg_scale=config.cfg, negative_prompt=config.negative)
        return kwargs
    # None, not "": SDXL then uses zeros for the unconditional input, as its base model was trained to.
    return {"guidance_scale": config.cfg, "negative_prompt": config.negative or None}


def _say_plan(config: GenerateConfig, family: str, prompts: int) -> None:
    if config.cfg <= 1:
        guidance = "no CFG"
    elif family == "flux":
        guidance = f"true CFG {config.cfg:g} (two transformer passes a step)"
    else:
        guidance = f"CFG {config.cfg:g} (prompt and negative in one UNet batch)"
    last = config.seed + config.n - 1
    seeds = f"seed {config.seed}" if last == config.seed else f"seeds {config.seed}-{last}"
    log.info(
        "%d image(s) (%d prompt(s) x %d) at %dx%d: %d steps, %s, %s",
        prompts * config.n,
        prompts,
        config.n,
        config.width,
        config.height,
        config.steps,
        guidance,
        seeds,
    )


def _parameters(config: GenerateConfig, prompt: str, seed: int, image: Image.Image) -> str:
    """The settings of one image, as the PNG's "parameters" text (the A1111 layout other tools read)."""
    lines = [prompt]
    if config.negative:
        lines.append(f"Negative prompt: {config.negative}")
    fields = {
        "Steps": config.steps,
        "Sampler": config.scheduler,
        "CFG scale": f"{config.cfg:g}" if config.cfg is not None else None,
        "Seed": seed,
        "Size": f"{image.width}x{image.height}",
        "Model": config.base,
        "Lora": f"{config.lora} ({config.lora_scale:g})" if config.lora is not None else None,
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _save_image(image: Image.Image, path: Path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)


def _grid(images: list[list[Image.Image]]) -> Image.Image:
    """One image: a row per prompt, a column per image."""
    from PIL import Image

    width, height = images[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in images), height * len(images)))
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            grid.paste(image, (j * width, i * height))
    return grid
