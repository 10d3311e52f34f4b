"""Seeded random weights and generation ids, shared by every builder of the test kit.

A leaf module (it imports nothing from the kit), so `models`, `chat_models`, `clip_models` and `text_models`
all import it at module level without a cycle. torch is imported inside the functions so
`import loracap.testing` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

M = TypeVar("M")

SPREAD = 0.2
"""The standard deviation tiny models redraw their matrices with.

At the usual 0.02 a model 32 wide produces nearly the same logits for any input and keeps emitting one
token (often a space), so every caption decodes empty; at about 0.2 the junk text varies with the image,
as tests need."""


def seeded_model(seed: int, build: Callable[[], M], *, spread: float | None = SPREAD) -> M:
    """`build()` with torch seeded, every matrix redrawn with std `spread` (None: keep the model's own
    init), in eval mode. The caller's global RNG state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        if spread is not None:
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() >= 2:
                        param.normal_(0.0, spread)
    model.eval()
    return model


def set_generation_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, **ids: int | None
) -> None:
    """Name the token ids `generate` reads in the model's generation config, as hub checkpoints do:
    bos / eos / pad from `tokenizer` when given, then `ids` (eos_token_id=..., decoder_start_token_id=...),
    which override or add to them."""
    named = {}
    if tokenizer is not None:
        named = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    gen = model.generation_config
    for name, value in {**named, **ids}.items():
        setattr(gen, name, value)
