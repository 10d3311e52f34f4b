"""Captions -> the text half of a training batch, with every position's role explicit.

Each row is [prompt][caption][eos][padding], right-padded. `labels` copies the ids where the model must
predict them (caption and eos) and is -100 elsewhere (prompt and padding), decided by position, never by
comparing with the pad id: many LMs (SmolLM2, GPT-2) pad with their eos token, and masking "every pad id"
would also mask the real eos, so the model would never learn to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["caption_ids", "encode_captions", "pad_id", "prompt_ids"]


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids, identical at training and inference (no special tokens)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def pad_id(tokenizer: Any) -> int | None:
    """The id that fills padding: the tokenizer's pad token, else its eos (SmolLM2 and GPT-2 have no pad
    token; padding sits after the eos that ends each caption, so nothing mistakes it for text)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def caption_ids(tokenizer: Any, caption: str, *, after_prompt: bool) -> list[int]:
    # After a prompt the caption is a continuation ("A photo of" + " a dog"), so it starts with a space
    # the way the LM saw such text in pre-training.
    text = (" " + caption.strip()) if after_prompt else caption.strip()
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_captions(
    tokenizer: Any, captions: Sequence[str], *, prompt: str = "", max_caption_tokens: int = 64
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels (B, T) for `captions`; see the module docstring.

    Captions longer than `max_caption_tokens` are cut there and still end with eos, so generation
    learns to stop within the budget it will be given."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; the captioner could never learn to stop")
    pad = pad_id(tokenizer)
    head = prompt_ids(tokenizer, prompt)
    rows, targets = [], []
    for caption in captions:
        body = caption_ids(tokenizer, caption, after_prompt=bool(head))[: max(max_caption_tokens - 1, 0)] + [
            eos
        ]
        rows.append(head + body)
        targets.append([-100] * len(head) + body)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
