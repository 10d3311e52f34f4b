"""What `loracap dreambooth` is asked to do: `DreamBoothConfig` (one field per option) and its checks.

Plain data with no torch: the CLI builds it from its flags and `--config FILE`, `loracap.dreambooth.loop`
runs it. Settings that must not change between a run and its `--resume` are listed in `FIXED_ON_RESUME`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "CROPS",
    "FIXED_ON_RESUME",
    "LORA_FORMATS",
    "LR_SCHEDULERS",
    "MIXED_PRECISIONS",
    "DreamBoothConfig",
    "check_config",
    "optimizer_name",
    "tracked_settings",
    "uses_prior",
]

CROPS = ("center", "random")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
LORA_FORMATS = ("kohya", "diffusers")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
TIMESTEP_SAMPLINGS = ("sigmoid", "uniform", "logit-normal")
QUANTIZATIONS = ("nf4", "fp8")
DEFAULT_STEPS = 1000
"""Steps trained when neither --max-steps nor --epochs is given."""

# diffusers' DreamBooth-LoRA targets: the attention projections of every transformer block (UNet), and for
# Flux those plus the text stream's projections and both feed-forwards (train_dreambooth_lora_flux.py).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class DreamBoothConfig:
    data: str
    """The captioned image folder (any layout `loracap report` reads)."""
    base: str
    """The base pipeline: hub id or local diffusers folder (SD 1.x/2.x, SDXL or Flux)."""
    out: str
    """The run's folder: the LoRA file, checkpoints/, samples/, logs/, loracap-dreambooth.json."""

    # --- captions
    trigger: str | None = None
    """Replaces "[trigger]" in captions and is put first where a caption lacks it (ai-toolkit's rule)."""
    instance_prompt: str | None = None
    """The caption of images that have none (the trigger alone when not given)."""
    layout: str = "auto"
    """Caption layout: auto, sidecar, jsonl, kohya-json."""
    caption_ext: str = ".txt"
    """Sidecar extension (.txt, .caption)."""
    metadata_file: str | None = None
    """A metadata.jsonl / kohya JSON elsewhere than in the dataset folder."""
    caption_dropout: float = 0.0
    """Share of steps an image trains with an empty caption (unconditioned)."""
    shuffle_tags: bool = False
    """Tag captions: shuffle the tags each time an image is seen (after the first --keep-tokens)."""
    keep_tokens: int = 0
    """Tag captions: the first N tags stay in place when shuffling (the trigger is the first)."""
    strict: bool = False
    """Dataset warnings (missing or over-long captions, fused trigger) become errors."""

    # --- class-prior preservation
    class_prompt: str | None = None
    """Turns prior preservation on: the prompt of the class images ("photo of a woman")."""
    class_data_dir: str | None = None
    """Folder of class images: your own, or where generated ones go (default OUT/class-images)."""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_batch_size: int = 4
    """Class images generated per pipeline call."""
    class_inference_steps: int = 30
    class_guidance: float | None = None
    """Default: 7.5 (SD 1.x/2.x, SDXL), 3.5 (Flux's guidance input; schnell has none)."""
    class_seed: int = 0
    """Class image i is generated with seed class_seed + i."""

    # --- LoRA
    rank: int = 16
    alpha: float | None = None
    """LoRA alpha (scale alpha / rank); default: the rank (scale 1)."""
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    """Denoiser module names LoRA goes on; none given: UNET_TARGETS (SD) or FLUX_TARGETS (Flux)."""
    train_text_encoder: bool = False
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    text_encoder_lr: float = 5e-5

    # --- optimisation
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_steps: int | None = None
    """Optimizer steps; wins over --epochs. Neither given: 1000."""
    epochs: int | None = None
    """Passes over the instance images."""
    batch_size: int = 1
    """Instance images per batch (with prior preservation as many class images join them)."""
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    """adamw, adamw8bit (bitsandbytes, CUDA only) or adafactor (transformers', at the fixed --lr)."""
    use_8bit_adam: bool = False
    """The same as optimizer="adamw8bit" (the diffusers scripts' flag)."""
    quantize_base: str | None = None
    """The denoiser's frozen weights stored quantized: "fp8" (float8 storage, computed in the training
    dtype, any device) or "nf4" (bitsandbytes 4-bit, CUDA only). The LoRA weights stay float32."""
    compile: bool = False
    """torch.compile the denoiser (its repeated blocks where diffusers names them)."""
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp16 on a GPU, none on a CPU), no, bf16, fp16."""
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    """Min-SNR loss weighting (5.0 is the paper's value); off when None."""
    noise_offset: float = 0.0
    seed: int = 0
    resolution: int | None = None
    """Training side in pixels (buckets hold about its square in pixels); default the base's own (512 SD 1.5,
    768 SD 2.x-768, 1024 SDXL and Flux)."""
    bucket: bool = True
    """Aspect-ratio buckets (kohya's --enable_bucket); False: every image centre- or random-cropped square."""
    min_bucket_reso: int | None = None
    """Shortest bucket side; default min(256, resolution)."""
    max_bucket_reso: int | None = None
    """Longest bucket side; default 2 x resolution."""
    bucket_reso_steps: int = 64
    """Bucket sides are multiples of this."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: small ones get a bucket of their own size (floored to the steps)."""
    crop: str = "center"
    random_flip: bool = False
    workers: int = 2
    """Data loader processes decoding images (not needed for cached latents)."""
    cache_latents: bool = False
    """Encode every image once, before training, into a latent cache on disk (needs --crop center)."""
    cache_text: bool = True
    """Encode every caption once while the text encoders are frozen (off by itself with --shuffle-tags)."""
    cache_dir: str | None = None
    """The latent cache's folder; default OUT/cache. Entries are keyed by content, so runs may share one."""

    # --- Flux
    timestep_sampling: str = "sigmoid"
    """How flow-matching timesteps are drawn: sigmoid (of a standard normal), uniform, logit-normal."""
    timestep_shift: float = 1.0
    """t -> shift*t / (1 + (shift-1)*t): above 1 trains noisier timesteps more (SD3/Flux's shift)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    """logit-normal's mean and deviation (0 and 1: the same as sigmoid)."""
    flux_guidance: float = 1.0
    """The guidance input of Flux models that have one (dev) during training."""
    max_sequence_length: int | None = None
    """T5 tokens of a Flux caption; default 512 (dev), 256 (schnell)."""

    # --- checkpoints
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = None
    """Keep only the newest N checkpoints (all when None)."""
    resume: bool = False
    overwrite: bool = False
    """Start over in an OUT that holds a run (its checkpoints, samples, logs and LoRA are removed)."""

    # --- validation
    validation_prompt: tuple[str, ...] = ()
    """Prompts sampled every --validation-every steps ("[trigger]" replaced); none: no validation."""
    validation_every: int = 100
    validation_images: int = 2
    """Images per prompt, at seeds validation_seed, validation_seed + 1, ..."""
    validation_seed: int = 0
    validation_inference_steps: int = 25
    validation_guidance: float | None = None
    """Default: as --class-guidance."""

    # --- output
    output_name: str | None = None
    """The LoRA file's name without .safetensors (default: OUT's folder name)."""
    lora_format: str = "kohya"
    """kohya (ComfyUI, A1111/Forge, diffusers all load it) or diffusers."""
    log_every: int = 10
    """Steps between loss readings (logs, progress bar): reading a loss waits for the GPU."""
    progress: bool = True

    def __post_init__(self) -> None:
        # TOML and the CLI give lists; the dataclass keeps tuples so a config stays hashable and comparable.
        for name in ("lora_targets", "text_encoder_targets", "validation_prompt"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))


FIXED_ON_RESUME = (
    "base",
    "rank",
    "alpha",
    "lora_targets",
    "train_text_encoder",
    "text_encoder_targets",
    "batch_size",
    "grad_accum",
    "seed",
    "resolution",
    "class_prompt",
    "bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "quantize_base",
)
"""Settings a resumed run must share with the run it continues: its checkpoint holds weights, optimizer
state and a data position that only mean something for these. The rest (--max-steps, validation,
checkpointing) may change on a resume."""


def uses_prior(config: DreamBoothConfig) -> bool:
    """Whether class-prior preservation is on (a --class-prompt was given)."""
    return config.class_prompt is not None


def _positive(config: DreamBoothConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be more than 0, not {value}")


def check_config(config: DreamBoothConfig) -> None:
    """Raise ValueError, one line, for options that are out of range or contradict each other; checked
    before anything loads."""
    _positive(
        config,
        "rank",
        "alpha",
        "lr",
        "text_encoder_lr",
        "max_steps",
        "epochs",
        "batch_size",
        "grad_accum",
        "num_class_images",
        "class_batch_size",
        "class_inference_steps",
        "resolution",
        "checkpoint_every",
        "checkpoints_total_limit",
        "validation_every",
        "validation_images",
        "validation_inference_steps",
        "snr_gamma",
        "bucket_reso_steps",
        "min_bucket_reso",
        "max_bucket_reso",
        "timestep_shift",
        "logit_std",
        "max_sequence_length",
        "log_every",
    )
    for name, value, allowed in (
        ("crop", config.crop, CROPS),
        ("lr-scheduler", config.lr_scheduler, LR_SCHEDULERS),
        ("mixed-precision", config.mixed_precision, MIXED_PRECISIONS),
        ("lora-format", config.lora_format, LORA_FORMATS),
        ("optimizer", config.optimizer, OPTIMIZERS),
        ("timestep-sampling", config.timestep_sampling, TIMESTEP_SAMPLINGS),
    ):
        if value not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    if not 0.0 <= config.caption_dropout <= 1.0:
        raise ValueError(f"--caption-dropout is a share of steps, from 0 to 1, not {config.caption_dropout}")
    if config.keep_tokens < 0 or config.warmup_steps < 0 or config.workers < 0:
        raise ValueError("--keep-tokens, --warmup-steps and --workers must be 0 or more")
    if config.noise_offset < 0 or config.prior_loss_weight < 0 or config.lora_dropout < 0:
        raise ValueError("--noise-offset, --prior-loss-weight and --lora-dropout must be 0 or more")
    if config.resume and config.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one")
    if config.class_data_dir is not None and config.class_prompt is None:
        raise ValueError(
            "--class-data-dir needs --class-prompt: the prompt the class images are trained with "
            '(e.g. --class-prompt "photo of a woman")'
        )
    if config.quantize_base is not None and config.quantize_base not in QUANTIZATIONS:
        raise ValueError(
            f"--quantize-base must be one of {', '.join(QUANTIZATIONS)}, not {config.quantize_base!r}"
        )
    if config.use_8bit_adam and config.optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(
            f"--use-8bit-adam is --optimizer adamw8bit; it contradicts --optimizer {config.optimizer}"
        )
    if config.cache_latents and config.crop == "random":
        raise ValueError(
            "--cache-latents encodes each image once, so it needs --crop center (a random crop differs each "
            "step); drop one of them"
        )
    if config.bucket_reso_steps % 8:
        raise ValueError(
            f"--bucket-reso-steps must be a multiple of 8 (the VAE's factor), not {config.bucket_reso_steps}"
        )
    if config.resolution is not None and config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's factor), not {config.resolution}")
    if config.output_name is not None and ("/" in config.output_name or "\\" in config.output_name):
        raise ValueError(f"--output-name is a file name, not a path: {config.output_name!r}")


def optimizer_name(config: DreamBoothConfig) -> str:
    """The optimizer the run uses (--use-8bit-adam is the same as --optimizer adamw8bit)."""
    return "adamw8bit" if config.use_8bit_adam else config.optimizer


def tracked_settings(config: DreamBoothConfig) -> dict[str, Any]:
    """The scalar settings, for TensorBoard's run config (it takes no lists or None)."""
    return {k: v for k, v in asdict(config).items() if isinstance(v, int | float | str | bool)}


def setting_values(config: DreamBoothConfig) -> dict[str, Any]:
    """Every setting as JSON-ready values (tuples as lists), for OUT/loracap-dreambooth.json."""
    return {
        f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in fields(config)
    }
