"""What `loracap train` is asked to do: `TrainSettings` (one field per CLI option) and its checks.

Plain data with no torch: the CLI builds it from its arguments, `loracap.train.loop.train` runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TrainSettings", "check_settings", "tracked_settings", "uses_feature_cache"]


@dataclass
class TrainSettings:
    data: str
    out: str
    vision: str = "google/siglip-base-patch16-224"
    lm: str = "HuggingFaceTB/SmolLM2-135M"
    init_from: str | None = None
    """A captioner folder to continue from (`--from`): its towers, projector and tokenizer."""
    prompt: str = ""
    projector: str = "mlp"
    pixel_shuffle: int = 1
    max_caption_tokens: int = 64
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    """Module names for LoRA; None: peft's default for the LM's architecture (q_proj/v_proj for Llama)."""
    unfreeze_vision_layers: int = 0
    lr_projector: float = 1e-3
    lr_lora: float = 2e-4
    lr_vision: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 50
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"
    """"no", "bf16" or "fp16" (accelerate's names); "auto" picks bf16 on a GPU that has it."""
    max_grad_norm: float = 1.0
    seed: int = 0
    val_share: float = 0.1
    test_share: float = 0.1
    eval_every: int = 100
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    patience: int = 5
    """Stop after this many evaluations without a better validation loss (0: never stop early)."""
    test_metrics: bool = True
    """After training, caption the test split with the saved captioner and score it."""
    val_metrics: bool = True
    """Caption the validation images at each evaluation and log BLEU-4 / ROUGE-L / CIDEr."""
    clip_loss_weight: float = 0.0
    clip_model: str = "openai/clip-vit-base-patch32"
    resume: bool = False
    cache_features: bool = False
    """Compute the frozen vision tower's features once and read them back (needs unfreeze_vision_layers=0)."""
    feature_cache_dir: str | None = None
    """Where the feature cache lives (default: loracap_cache_dir()/vision-features); setting it turns the
    cache on."""
    workers: int = 2
    progress: bool = True
    image_column: str = "image"
    caption_column: str = "text"


def uses_feature_cache(settings: TrainSettings) -> bool:
    """Whether the run reads the vision tower's features from the cache (`--cache-features` or a
    `--feature-cache` folder)."""
    return settings.cache_features or settings.feature_cache_dir is not None


def check_settings(settings: TrainSettings) -> None:
    """Raise ValueError for options that contradict each other (checked before anything loads)."""
    if uses_feature_cache(settings) and settings.unfreeze_vision_layers:
        raise ValueError(
            f"--cache-features needs a frozen vision tower, but --unfreeze-vision-layers "
            f"{settings.unfreeze_vision_layers} trains its top layers: their features change at every step, "
            "so cached ones would be stale. Leave out one of the two options."
        )


def tracked_settings(settings: TrainSettings) -> dict[str, Any]:
    """The scalar settings, for the experiment tracker's run config (it takes no lists or None)."""
    return {k: v for k, v in asdict(settings).items() if isinstance(v, int | float | str | bool)}
