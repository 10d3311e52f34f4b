"""Pick the captioning model that fits the machine when the user names none.

The table follows the models' published memory needs: Florence-2-large-PromptGen runs in 1-2 GB,
SmolVLM in 4-5 GB, JoyCaption (8B) in about 17 GB at bf16, 9 GB at 8-bit and 5.5 GB at 4-bit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from .registry import DEFAULT_MODEL

FLORENCE_BASE = "MiaoshouAI/Florence-2-base-PromptGen-v1.5"  # Florence-2-base, with PromptGen's modes
SMOLVLM = "HuggingFaceTB/SmolVLM-Instruct"
JOYCAPTION = "fancyfeast/llama-joycaption-beta-one-hf-llava"


@dataclass(frozen=True)
class Choice:
    model: str
    quant: str | None
    reason: str


def free_accelerator_gb(device: str | None = None) -> tuple[str, float | None]:
    """(device kind, free memory in GB) of the accelerator a run would use; (\"cpu\", None) without one."""
    import torch

    if (device in (None, "auto") or str(device).startswith("cuda")) and torch.cuda.is_available():
        index = torch.device(device if device not in (None, "auto") else "cuda").index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return "cuda", free / 2**30
    if (
        device in (None, "auto", "mps")
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        # Unified memory: what the Metal driver recommends, less what is already allocated.
        return "mps", (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()) / 2**30
    return "cpu", None


def choose_default_model(
    free_gb: float | None,
    *,
    available: Callable[[str], bool] = lambda model: True,
    can_quantize: bool = False,
    runnable: Callable[[str], bool] = lambda model: True,
) -> Choice:
    """The model for this much free accelerator memory (None: CPU only), per the table:

    | free memory      | primary                                   | fallback             |
    | CPU or < 4 GB    | Florence-2-large-PromptGen                | Florence-2-base      |
    | 4-8 GB           | Florence-2-large-PromptGen                | SmolVLM              |
    | 8-12 GB          | JoyCaption 4-bit (bitsandbytes on CUDA)   | Florence-2-large-PG  |
    | 12-20 GB         | JoyCaption 8-bit (bitsandbytes on CUDA)   | Florence-2-large-PG  |
    | 20 GB +          | JoyCaption bf16                           | Florence-2-large-PG  |

    JoyCaption rows need bitsandbytes below 20 GB; without it those rows fall to the 4-8 GB row. The
    fallback is taken when the primary is not available (offline and not downloaded) but it is, or
    when this install has no backend for the primary's family.
    """
    where = "CPU only" if free_gb is None else f"{free_gb:.1f} GB free"
    if free_gb is None or free_gb < 4:
        primary, fallback = (DEFAULT_MODEL, None), (FLORENCE_BASE, None)
    elif free_gb >= 20:
        primary, fallback = (JOYCAPTION, None), (DEFAULT_MODEL, None)
    elif free_gb >= 8 and can_quantize:
        primary, fallback = (JOYCAPTION, "8bit" if free_gb >= 12 else "4bit"), (DEFAULT_MODEL, None)
    else:
        primary, fallback = (DEFAULT_MODEL, None), (SMOLVLM, None)
    if not runnable(primary[0]):
        return Choice(*fallback, f"{where}; {primary[0]} needs a backend this install lacks")
    if available(primary[0]) or not available(fallback[0]):
        return Choice(*primary, where)
    return Choice(*fallback, f"{where}; {primary[0]} is not downloaded")


def auto_model(device: str | None = None) -> Choice:
    """`choose_default_model` for this machine: its free memory, its cache, its network setting."""
    from ..hub import is_cached, offline_mode
    from . import supports

    kind, free_gb = free_accelerator_gb(device)
    offline = offline_mode()
    return choose_default_model(
        free_gb,
        available=lambda model: is_cached(model) or not offline,
        can_quantize=kind == "cuda" and importlib.util.find_spec("bitsandbytes") is not None,
        runnable=supports,
    )
