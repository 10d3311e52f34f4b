"""What a run measures on its validation split at each evaluation: the loss (which decides early stopping
and the best step) and, for the log, BLEU-4 / ROUGE-L / CIDEr of greedy captions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from loracap.backends.device import Placement
from loracap.backends.prefix_captioner import PrefixCaptionerBackend
from loracap.prefix.modeling import PrefixCaptioner
from loracap.train.data import Example
from loracap.train.metrics import caption_metrics, generate_for

__all__ = ["evaluate_loss", "main_caption_metrics", "val_caption_metrics"]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: Iterable[dict[str, Any] | None], accelerator: Any) -> float:
    """Mean token loss over the validation set (weighted by predicted tokens).

    With several processes each one scores its share of the set; the sums are added up across them, so
    every process gets the same number and takes the same early-stopping and best-step decisions."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        if batch is None:
            continue
        batch = dict(batch)
        batch.pop("captions")
        n = int((batch["labels"] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    # Alone, a process keeps its sums as they are (and needs no float64 tensor, which MPS lacks).
    if accelerator.num_processes > 1:
        sums = torch.tensor([total, tokens], dtype=torch.float64, device=accelerator.device)
        total, tokens = accelerator.reduce(sums, "sum").tolist()
    return total / max(tokens, 1)


def main_caption_metrics(
    accelerator: Any, model: torch.nn.Module, examples: list[Example], image_processor: Any, tokenizer: Any
) -> dict[str, float]:
    """`val_caption_metrics` on the main process alone (the whole validation set), for the log: no decision
    depends on them, only on the loss, which every process shares. The others get {}."""
    metrics = {}
    if accelerator.is_main_process:
        metrics = val_caption_metrics(accelerator.unwrap_model(model), examples, image_processor, tokenizer)
    # The others wait here instead of running ahead into the next step's collectives, or into the end of
    # training, while the main process captions (a process group torn down out of step can hang).
    accelerator.wait_for_everyone()
    return metrics


def val_caption_metrics(
    model: PrefixCaptioner,
    examples: list[Example],
    image_processor: Any,
    tokenizer: Any,
    batch_size: int = 32,
) -> dict[str, float]:
    """BLEU-4 / ROUGE-L / CIDEr of greedy captions of `examples`, made by the backend `loracap caption`
    uses, around the model in training as it is (its device, its dtype)."""
    model.eval()
    weight = next(model.projector.parameters())
    placement = Placement(weight.device, weight.dtype)
    backend = PrefixCaptionerBackend.from_parts(model, image_processor, tokenizer, placement)
    generated = generate_for(backend, examples, batch_size=batch_size)
    decoded = [e for e in examples if e.key in generated.captions]  # the others were reported while training
    if not decoded:
        return {}
    return caption_metrics(generated.captions, {e.key: e.references for e in decoded})
