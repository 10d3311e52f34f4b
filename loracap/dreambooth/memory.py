"""Fitting the run on the card: a quantized base, parts that leave the GPU after caching, torch.compile,
and the peak memory the run reached.

`--quantize-base fp8`: the denoiser's frozen weights are stored as float8 (e4m3) and each layer is cast to
the training dtype just for its own forward (diffusers' layerwise casting; the norms and the patch and
position embeddings stay as they were): about half the memory of bf16 weights, on any device. `nf4`:
bitsandbytes' 4-bit NormalFloat weights computed in bf16 (the QLoRA recipe), loaded that way from the
files; CUDA only. Either way peft puts the LoRA layers beside the quantized ones, in float32.
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "check_quantization",
    "compile_denoiser",
    "move_off_accelerator",
    "nf4_quantization",
    "peak_memory",
    "quantize_fp8",
]


def check_quantization(config: Any, device: torch.device) -> None:
    """ValueError, before anything loads, when `--quantize-base` cannot run here."""
    if config.quantize_base != "nf4":
        return
    if device.type != "cuda":
        raise ValueError(
            f"--quantize-base nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels), and this run is on "
            f"{device.type}; --quantize-base fp8 runs anywhere"
        )
    try:
        import bitsandbytes  # noqa: F401  (a probe)
    except ImportError:
        raise ValueError("--quantize-base nf4 needs bitsandbytes: pip install bitsandbytes") from None


def nf4_quantization(config: Any, denoiser_name: str) -> Any:
    """diffusers' pipeline quantization for `--quantize-base nf4` (the denoiser only), or None."""
    if config.quantize_base != "nf4":
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": torch.bfloat16,
        },
        components_to_quantize=[denoiser_name],
    )


def quantize_fp8(denoiser: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store the denoiser's weights in float8, cast up per layer while it runs (before LoRA is added)."""
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def move_off_accelerator(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Move frozen parts whose work is cached (the VAE, the text encoders) to the CPU, freeing GPU memory
    for the training step; on a CPU run there is nothing to free."""
    if device.type == "cpu":
        return
    for module in modules:
        module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_denoiser(denoiser: torch.nn.Module) -> None:
    """torch.compile the denoiser in place: only its repeated blocks where diffusers names them (Flux's,
    the UNet's transformer blocks), which compiles once per block type instead of the whole graph."""
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks()
    else:
        denoiser.compile()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The run's peak memory in bytes and what was measured: torch's peak allocation on a CUDA device,
    else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU memory allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process memory (RSS)"
