"""onnxruntime sessions for the backends that run ONNX graphs (WD taggers, exported captioners)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import BackendError
from .resources import cpu_threads


def onnx_session(path: Path, device: str | None, *, what: str, extra: str) -> Any:
    """An onnxruntime session for the graph at `path`: on CUDA when a CUDA device is asked for and
    onnxruntime has it, else on the CPU with `cpu_threads()` threads. `what` and `extra` name the model
    and the pip extra in the one-line error when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError(f'{what} runs on onnxruntime: pip install "loracap[{extra}]"') from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    providers = ["CPUExecutionProvider"]
    if device not in (None, "auto", "cpu") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)
