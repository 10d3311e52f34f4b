"""Pick the device and precision a model runs in: CUDA bf16/fp16, Apple MPS fp16, CPU fp32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sizes import image_side  # noqa: F401  (the backends import it from here)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        name = {v: k for k, v in DTYPES.items()}[self.dtype]
        return f"{self.device.type} {name}"


def choose_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """The fastest sensible default for this machine, each part overridable.

    CPU kernels for half precision are slow or missing, so the CPU gets fp32 unless asked.
    """
    if device in (None, "auto"):
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dtype in (None, "auto"):
        if dev.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "mps":
            dtype = "fp16"
        else:
            dtype = "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return Placement(dev, DTYPES[dtype])


def default_batch_size(placement: Placement, gpu_batch: int, cpu_batch: int = 4) -> int:
    """Accelerators want wide batches; on a CPU a few images at a time keeps latency and memory sane."""
    return gpu_batch if placement.device.type in ("cuda", "mps") else cpu_batch


QUANT_MODES = ("4bit", "8bit")


def quantization_kwargs(quant: str | None, placement: Placement) -> dict:
    """`from_pretrained` arguments for 4-bit / 8-bit loading through bitsandbytes, which needs CUDA.

    Empty when no quantization is asked for. Raises BackendError where it cannot work, rather than
    letting bitsandbytes fail deep inside loading.
    """
    from .base import BackendError

    if quant is None:
        return {}
    if quant not in QUANT_MODES:
        raise BackendError(
            f"unknown quantization {quant!r}; choose {' or '.join(QUANT_MODES)} (int8 is for ONNX "
            "captioners, see loracap export-onnx)"
        )
    if placement.device.type != "cuda":
        raise BackendError(
            f"--quant {quant} loads through bitsandbytes, which needs a CUDA GPU; this run is on "
            f"{placement.device.type}. Leave --quant out, or pick a smaller model (see `loracap models`)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BackendError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=placement.dtype
        )
    # Quantized weights are placed while loading; moving the model afterwards is not allowed.
    return {"quantization_config": config, "device_map": {"": placement.device}}


def load_model(model_class: Any, folder: Path, placement: Placement, quant: str | None = None) -> Any:
    """`model_class.from_pretrained(folder)` in the placement's dtype, on its device, in eval mode.

    With `quant` the weights are quantized and placed while loading (see `quantization_kwargs`).
    """
    quantized = quantization_kwargs(quant, placement)
    model = model_class.from_pretrained(folder, dtype=placement.dtype, **quantized)
    if not quantized:
        model.to(placement.device)
    return model.eval()
