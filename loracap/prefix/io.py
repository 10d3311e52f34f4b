"""The captioner folder: model (config + safetensors), image processor and tokenizer, side by side.

The folder is a normal Hugging Face model folder: `PrefixCaptioner.from_pretrained(DIR)`,
`AutoImageProcessor.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` each read their part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer

from loracap.prefix.modeling import PrefixCaptioner

__all__ = ["LoadedCaptioner", "load_captioner", "save_captioner"]


@dataclass
class LoadedCaptioner:
    model: PrefixCaptioner
    image_processor: Any
    tokenizer: Any


def save_captioner(model: PrefixCaptioner, image_processor: Any, tokenizer: Any, out: str | Path) -> Path:
    """Write the three parts into `out`. A LoRA-wrapped LM is merged first, so loading needs no peft."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):  # a peft model: fold the adapter into plain weights
        model.language_model = lm.merge_and_unload()
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_captioner(folder: str | Path) -> LoadedCaptioner:
    """The three parts of a captioner folder, the model in eval mode on the CPU (as saved)."""
    return LoadedCaptioner(
        PrefixCaptioner.from_pretrained(folder).eval(),
        AutoImageProcessor.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
    )
