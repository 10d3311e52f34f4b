"""The optimizer (AdamW, bitsandbytes' 8-bit AdamW on CUDA, or Adafactor) and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from loracap.dreambooth.settings import DreamBoothConfig, optimizer_name

__all__ = ["check_optimizer", "make_optimizer", "make_scheduler"]


def check_optimizer(config: DreamBoothConfig, device: torch.device) -> None:
    """ValueError, before anything loads, when the optimizer cannot run here: bitsandbytes' optimizers are
    CUDA kernels."""
    if optimizer_name(config) != "adamw8bit":
        return
    if device.type != "cuda":
        raise ValueError(
            f"--optimizer adamw8bit (--use-8bit-adam) needs a CUDA GPU (bitsandbytes' kernels), and this run "
            f"is on {device.type}; use adamw or adafactor"
        )
    try:
        import bitsandbytes  # noqa: F401  (a probe)
    except ImportError:
        raise ValueError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None


def make_optimizer(groups: list[dict[str, Any]], config: DreamBoothConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups if g["params"]]
    name = optimizer_name(config)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # At the given learning rate and schedule (its relative-step mode would ignore both), as kohya's
        # `--optimizer_type adafactor --optimizer_args scale_parameter=False relative_step=False` runs it.
        return Adafactor(
            groups,
            lr=config.lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: DreamBoothConfig, total_steps: int, processes: int
) -> Any:
    """diffusers' schedules by name, warmup included. accelerate steps a prepared scheduler once per process
    at every optimizer step, so warmup and horizon are counted in process-steps (as `loracap train` does)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * processes,
        num_training_steps=total_steps * processes,
    )
