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
    "tracked_settings",
    "uses_prior",
]

CROPS = ("center", "random")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
LORA_FORMATS = ("kohya", "diffusers")
DEFAULT_STEPS = 1000
"""Steps trained when neither --max-steps nor --epochs is given."""

# diffusers' DreamBooth-LoRA targets: the attention projections of every transformer block.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class DreamBoothConfig:
    data: str
    """The captioned image folder (any layout `loracap report` reads)."""
    base: str
    """The base pipeline: hub id or local diffusers folder (SD 1.5 or SDXL)."""
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
    class_guidance: float = 7.5
    class_seed: int = 0
    """Class image i is generated with seed class_seed + i."""

    # --- LoRA
    rank: int = 16
    alpha: float | None = None
    """LoRA alpha (scale alpha / rank); default: the rank (scale 1)."""
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = UNET_TARGETS
    """UNet module names LoRA goes on."""
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
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA only)."""
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp16 on a GPU, none on a CPU), no, bf16, fp16."""
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    """Min-SNR loss weighting (5.0 is the paper's value); off when None."""
    noise_offset: float = 0.0
    seed: int = 0
    resolution: int | None = None
    """Training side in pixels; default the base's own (512 SD 1.5, 768 SD 2.x-768, 1024 SDXL)."""
    crop: str = "center"
    random_flip: bool = False
    workers: int = 2
    """Data loader processes decoding images."""

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
    validation_guidance: float = 7.5

    # --- output
    output_name: str | None = None
    """The LoRA file's name without .safetensors (default: OUT's folder name)."""
    lora_format: str = "kohya"
    """kohya (ComfyUI, A1111/Forge, diffusers all load it) or diffusers."""
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
    )
    for name, value, allowed in (
        ("crop", config.crop, CROPS),
        ("lr-scheduler", config.lr_scheduler, LR_SCHEDULERS),
        ("mixed-precision", config.mixed_precision, MIXED_PRECISIONS),
        ("lora-format", config.lora_format, LORA_FORMATS),
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
    if not config.lora_targets:
        raise ValueError("--lora-targets names no module")
    if config.resolution is not None and config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's factor), not {config.resolution}")
    if config.output_name is not None and ("/" in config.output_name or "\\" in config.output_name):
        raise ValueError(f"--output-name is a file name, not a path: {config.output_name!r}")


def tracked_settings(config: DreamBoothConfig) -> dict[str, Any]:
    """The scalar settings, for TensorBoard's run config (it takes no lists or None)."""
    return {k: v for k, v in asdict(config).items() if isinstance(v, int | float | str | bool)}


def setting_values(config: DreamBoothConfig) -> dict[str, Any]:
    """Every setting as JSON-ready values (tuples as lists), for OUT/loracap-dreambooth.json."""
    return {
        f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in fields(config)
    }
