"""LoRA adapters on a family's denoiser (UNet or Flux transformer; optionally the SD text encoders too),
through peft, and their weights.

Everything else stays frozen: the VAE (also in eval mode), the base weights of the UNet and the text
encoders. The adapters start as peft's "gaussian" init (A random, B zero), so before the first step the
model computes exactly what the base does: the first validation grid is the base model's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loracap.dreambooth.families import Family, default_targets
from loracap.dreambooth.settings import DreamBoothConfig

log = logging.getLogger(__name__)

__all__ = ["add_lora", "lora_modules", "lora_state", "load_lora_state"]


def _config(rank: int, alpha: float, dropout: float, targets: tuple[str, ...]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def _add(module: torch.nn.Module, config: Any, what: str, flag: str) -> None:
    try:
        module.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        if "not found" not in str(exc):
            raise
        raise ValueError(
            f"{flag} {','.join(sorted(config.target_modules))} names no module of the {what}; "
            f"e.g. {', '.join(_linear_names(module)[:6])}"
        ) from None


def _linear_names(module: torch.nn.Module) -> list[str]:
    """Distinct last-part names of the Linear layers, the usual targets (for the message above)."""
    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def add_lora(family: Family, config: DreamBoothConfig) -> list[dict[str, Any]]:
    """Freeze the base, add the adapters, and return the optimizer's parameter groups (UNet at --lr, text
    encoders at --text-encoder-lr). Trainable weights are float32 whatever the base's dtype: half-precision
    weights would lose most small updates."""
    alpha = config.alpha if config.alpha is not None else config.rank
    vae = getattr(family, "vae", None)
    for part in [family.denoiser, *family.text_encoders, *([vae] if vae is not None else [])]:
        part.requires_grad_(False)
    if vae is not None:
        vae.eval()
    targets = config.lora_targets or default_targets(family.name)
    what = "Flux transformer" if family.name == "flux" else "UNet"
    _add(family.denoiser, _config(config.rank, alpha, config.lora_dropout, targets), what, "--lora-targets")
    groups = [{"params": _trainable(family.denoiser), "lr": config.lr, "name": "denoiser"}]
    if config.train_text_encoder:
        encoder_config = _config(config.rank, alpha, config.lora_dropout, config.text_encoder_targets)
        params = []
        for encoder in family.text_encoders:
            _add(encoder, encoder_config, "text encoder", "--text-encoder-targets")
            params += _trainable(encoder)
        groups.append({"params": params, "lr": config.text_encoder_lr, "name": "text_encoder"})
    if config.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
        for encoder in family.text_encoders if config.train_text_encoder else []:
            # transformers 5 renamed it; the old name still works there, with a deprecation warning.
            enable = getattr(encoder, "activation_checkpointing_enable", None)
            (enable or encoder.gradient_checkpointing_enable)()
    for group in groups:
        for param in group["params"]:
            param.data = param.data.float()
    return groups


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_modules(family: Family, config: DreamBoothConfig) -> dict[str, torch.nn.Module]:
    """The modules that carry adapters, by the name their weights are saved under."""
    modules = {"denoiser": family.denoiser}
    if config.train_text_encoder:
        for i, encoder in enumerate(family.text_encoders):
            modules["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    return modules


def lora_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapters' weights, "<module>.<parameter name>" -> tensor (a checkpoint needs nothing else: the
    base never changes)."""
    state = {}
    for prefix, module in modules.items():
        for name, param in _unwrap(module).named_parameters():
            if param.requires_grad:
                state[f"{prefix}.{name}"] = param.detach()
    return state


def load_lora_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (as `lora_state` gives it) into the adapters; ValueError when it does not fit them."""
    for prefix, module in modules.items():
        params = {name: p for name, p in _unwrap(module).named_parameters() if p.requires_grad}
        wanted = {f"{prefix}.{name}" for name in params}
        missing = wanted - state.keys()
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} LoRA weights of the {prefix}, e.g. {min(missing)}"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[f"{prefix}.{name}"])


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # accelerate's DistributedDataParallel (and torch.compile) wrappers keep the model in .module / ._orig_mod
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module
