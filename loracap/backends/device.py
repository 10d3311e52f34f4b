"""Pick the device and precision a model runs in: CUDA bf16/fp16, Apple MPS fp16, CPU fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
