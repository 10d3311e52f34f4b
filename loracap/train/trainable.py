"""The captioner a run trains: built from two towers or continued from a folder, then frozen but for the
projector, LoRA adapters on the LM and (if asked) the top vision layers, each group with its own
learning rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from loracap.hub import resolve_model
from loracap.prefix.io import load_captioner
from loracap.prefix.modeling import PrefixCaptioner, build_captioner
from loracap.train.settings import TrainSettings

__all__ = ["count_parameters", "load_parts", "prepare_trainable"]


def load_parts(
    settings: TrainSettings, init_dir: Path | None, caption_format: str
) -> tuple[PrefixCaptioner, Any, Any]:
    """(model, image processor, tokenizer): the captioner in `init_dir` (`--from`), else a new one on the
    settings' vision tower and LM that writes `caption_format` ("tags" or "prose")."""
    if init_dir is not None:
        loaded = load_captioner(init_dir)
        return loaded.model, loaded.image_processor, loaded.tokenizer
    vision_dir, lm_dir = resolve_model(settings.vision), resolve_model(settings.lm)
    model = build_captioner(
        vision_dir,
        lm_dir,
        projector=settings.projector,
        pixel_shuffle=settings.pixel_shuffle,
        prompt=settings.prompt,
        max_caption_tokens=settings.max_caption_tokens,
        caption_format=caption_format,
        vision_id=settings.vision,  # the names asked for (hub ids), not the cache folders they resolved to
        lm_id=settings.lm,
    )
    return model, AutoImageProcessor.from_pretrained(vision_dir), AutoTokenizer.from_pretrained(lm_dir)


def prepare_trainable(model: PrefixCaptioner, settings: TrainSettings) -> list[dict[str, Any]]:
    """Freeze the towers, wrap the LM in LoRA, open the top vision layers; the optimizer's param groups."""
    from peft import LoraConfig, get_peft_model  # the optional `train` extra: imported when used

    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, lora)
    groups = [
        {"params": list(model.projector.parameters()), "lr": settings.lr_projector, "name": "projector"},
        {
            "params": [p for p in model.language_model.parameters() if p.requires_grad],
            "lr": settings.lr_lora,
            "name": "lora",
        },
    ]
    layers = _vision_layers(model)
    if settings.unfreeze_vision_layers:
        opened = layers[-settings.unfreeze_vision_layers :]
        for layer in opened:
            layer.requires_grad_(True)
        groups.append(
            {
                "params": [p for layer in opened for p in layer.parameters()],
                "lr": settings.lr_vision,
                "name": "vision",
            }
        )
    return groups


def _vision_layers(model: PrefixCaptioner) -> list[torch.nn.Module]:
    encoder = getattr(model.vision_tower, "encoder", None)
    return list(getattr(encoder, "layers", []) or getattr(encoder, "layer", []))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
