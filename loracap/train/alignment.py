"""`--clip-loss-weight`: pull each image's prefix towards its caption's CLIP (or SigLIP) text embedding.

The prefix is mean-pooled and mapped by a small trainable head into the text tower's embedding space;
an in-batch contrastive loss (InfoNCE, both directions) then asks each prefix to be closest to its own
caption. Only the frozen text tower runs without gradient: the loss is a function of the prefix, so its
gradient reaches the projector (and an unfrozen vision top) in the same backward pass as the LM loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from loracap.hub import resolve_model
from loracap.quality.clipscore import PAD_TO_WINDOW, features, text_inputs

__all__ = ["ClipAlignment"]


class ClipAlignment(nn.Module):
    def __init__(self, clip_model: str, prefix_width: int) -> None:
        super().__init__()
        folder = resolve_model(clip_model)
        encoder = AutoModel.from_pretrained(folder)
        if not hasattr(encoder, "get_text_features"):
            raise ValueError(
                f"{clip_model} has no text tower: --clip-model needs a CLIP or SigLIP checkpoint"
            )
        _drop_image_side(encoder)
        encoder.requires_grad_(False).eval()
        self.encoder = [encoder]  # a list: kept out of state_dict, optimizers and .to() of the head
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        text_config = getattr(encoder.config, "text_config", encoder.config)
        self.max_length = _text_window(text_config, self.tokenizer)
        self.pad_to_window = encoder.config.model_type in PAD_TO_WINDOW
        dim = getattr(encoder.config, "projection_dim", None) or text_config.hidden_size
        self.head = nn.Linear(prefix_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @torch.no_grad()
    def text_embeddings(self, captions: list[str], device: torch.device) -> torch.Tensor:
        encoder = self.encoder[0].to(device)
        text = text_inputs(
            self.tokenizer, captions, max_length=self.max_length, pad_to_window=self.pad_to_window
        )
        embedding = features(encoder.get_text_features(**text.to(device)))
        return nn.functional.normalize(embedding.float(), dim=-1)

    def forward(self, prefix: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Contrastive loss between pooled prefixes (B, P, D) and the captions' text embeddings."""
        targets = self.text_embeddings(captions, prefix.device)
        pooled = nn.functional.normalize(self.head(prefix.float().mean(dim=1)), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * pooled @ targets.T
        labels = torch.arange(len(captions), device=prefix.device)
        return (
            nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        ) / 2

    def extra_repr(self) -> str:
        return f"text tower frozen, max_length={self.max_length}"


def _text_window(text_config: Any, tokenizer: Any) -> int:
    """How many tokens of a caption the text tower reads: its position window, or the tokenizer's limit where
    that is shorter. The rule `loracap.quality.clipscore` scores with, so the loss pulls each prefix towards
    the embedding CLIPScore will compare the caption with."""
    window = getattr(text_config, "max_position_embeddings", None) or 77
    return min(window, tokenizer.model_max_length or window)


def _drop_image_side(encoder: nn.Module) -> None:
    # Only text features are used: the image tower and its projection (a ViT-L's is some 300M parameters)
    # would sit in memory, and be moved to the GPU, for the whole run for nothing.
    for name in ("vision_model", "visual_projection"):
        if isinstance(getattr(encoder, name, None), nn.Module):
            delattr(encoder, name)
