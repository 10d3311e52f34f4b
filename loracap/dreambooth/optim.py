"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW on CUDA) and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from loracap.dreambooth.settings import DreamBoothConfig

__all__ = ["check_8bit_adam", "make_optimizer", "make_scheduler"]


def check_8bit_adam(config: DreamBoothConfig, device: torch.device) -> None:
    """ValueError, before anything loads, when 8-bit Adam cannot run here: bitsandbytes' optimizers are
    CUDA kernels."""
    if not config.use_8bit_adam:
        return
    if device.type != "cuda":
        raise ValueError(
            f"--use-8bit-adam needs a CUDA GPU (bitsandbytes' kernels), and this run is on {device.type}; "
            "leave the option out"
        )
    try:
        import bitsandbytes  # noqa: F401  (a probe)
    except ImportError:
        raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None


def make_optimizer(groups: list[dict[str, Any]], config: DreamBoothConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups if g["params"]]
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
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
