"""How many images go into one model call: as given, or chosen from free memory and what an image costs.

`auto` (the default) captions a run's first two images as one batch and measures the memory that took:
the peak resident memory's growth on a CPU, the peak of torch's allocator on CUDA. The rest of the run
uses as many images a batch as fit in half the free RAM (CPU) or 80% of the free GPU memory, at most 64
(or the model's own default where that is larger). Where memory cannot be measured (no Linux /proc, MPS, a
remote model) the model's default is used. Whatever the size, a batch that runs out of memory is halved
and retried, and the run keeps the smaller size.

What an image costs differs by three orders of magnitude between a test-sized Florence-2 and
Florence-2-large (450 MB at 768 px on a CPU), so it is measured rather than guessed from the config.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .resources import available_memory

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTO = "auto"
AUTO_CAP = 64
PROBE_IMAGES = 2
# Out of RAM, Linux kills a process rather than fail an allocation, and other programs need RAM too.
CPU_SHARE = 0.5
# Out of GPU memory, torch raises and the run backs off; the rest covers allocator fragmentation.
GPU_SHARE = 0.8
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def parse_batch_size(value: Any) -> int | None:
    """A batch-size setting as an int, or None for auto: a whole number from 1, "auto" or None (digits in
    a string, as a flag or a file may give them, count as the number). ValueError for anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch size must be a whole number from 1 or 'auto', not {value!r}")
    return value


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a failed model call ran out of memory: torch's OutOfMemoryError (CUDA), MemoryError, or the
    RuntimeError that torch's CPU allocator ("not enough memory") and MPS ("out of memory") raise."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _status(key: str) -> int | None:
    """A size from /proc/self/status in bytes (VmRSS, VmHWM, RssFile)."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart VmHWM (the peak resident memory) from the current size; False where Linux does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def nbytes(inputs: Any) -> int:
    """Bytes held by the tensors in prepared model inputs (a tensor, or dicts / lists / tuples of them)."""
    if hasattr(inputs, "element_size") and hasattr(inputs, "nelement"):
        return inputs.element_size() * inputs.nelement()
    if isinstance(inputs, dict):
        return sum(nbytes(v) for v in inputs.values())
    if isinstance(inputs, list | tuple):
        return sum(nbytes(v) for v in inputs)
    return 0


def fit(budget: float, per_image: float, cap: int) -> int:
    """Images a batch that fit `budget` bytes at `per_image` bytes each: from 1 to `cap`."""
    return max(1, min(cap, int(budget // max(per_image, 1.0))))


class BatchSize:
    """The batch size of one run: `size` is what the next batch should hold.

    Given a number, that is the size. Auto (`given` None): the first batch holds `PROBE_IMAGES` images and
    is measured (`run`), which sets the size for the rest. Either way `shrink` halves it after an
    out-of-memory, and an auto choice never goes back above a size that ran out."""

    def __init__(self, given: int | None, backend: Any, *, workers: int) -> None:
        self.default = backend.default_batch_size
        self.placement = getattr(backend, "placement", None)
        self.model = getattr(backend, "model", None)
        self.workers = max(1, workers)
        self.probing = False
        self.ceiling: int | None = None  # the largest size not known to run out of memory
        self._touched = False
        if given is not None:
            self.size = given
        elif self._can_measure():
            self.size, self.probing = PROBE_IMAGES, True
        else:
            self.size = self.default
            log.info("batch size %d (the model's default: its memory use cannot be measured here)", self.size)

    @property
    def device(self) -> str:
        return self.placement.device.type if self.placement is not None else "remote"

    def _can_measure(self) -> bool:
        if self.model is None or not hasattr(self.model, "parameters"):
            return False  # a remote model: memory is the server's business
        if self.device == "cuda":
            return True
        # On a CPU: Linux's resident-memory peak, which can be restarted, and MemAvailable.
        return self.device == "cpu" and _CLEAR_REFS.exists() and available_memory() is not None

    def run(self, call: Callable[[], T], inputs: Any, images: int) -> T:
        """`call()`: the model on one prepared batch of `images` images (`inputs`). While probing, the
        memory it takes is measured and sets the size for the rest of the run."""
        if not self.probing:
            return call()
        start = self._start()
        result = call()
        growth = self._growth(start)
        if growth is None:  # the measurement failed after all: fall back to the model's default
            self.size, self.probing = min(self.default, self.ceiling or self.default), False
            log.info("batch size %d (the model's default: its memory use could not be measured)", self.size)
        else:
            self._choose(images, growth, nbytes(inputs) / max(images, 1))
        return result

    def shrink(self, failed: int) -> bool:
        """A batch of `failed` images ran out of memory: halve the size for the rest of the run and say so.
        False for one image, which cannot be halved."""
        if failed <= 1:
            return False
        self.size = self.ceiling = max(1, min(self.size, failed // 2))
        torch = sys.modules.get("torch")
        if self.device == "cuda" and torch is not None:
            torch.cuda.empty_cache()  # give the failed batch's blocks back before the smaller retry
        log.warning("out of memory on a batch of %d images: batch size %d from here on", failed, self.size)
        return True

    # -- measuring ------------------------------------------------------------------------------------

    def _start(self) -> int | None:
        import torch

        if self.device == "cuda":
            device = self.placement.device
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        self._touch_weights()
        return _status("VmRSS") if _reset_peak_rss() else None

    def _growth(self, start: int | None) -> int | None:
        import torch

        if start is None:
            return None
        if self.device == "cuda":
            torch.cuda.synchronize(self.placement.device)
            return max(0, torch.cuda.max_memory_allocated(self.placement.device) - start)
        peak = _status("VmHWM")
        return None if peak is None else max(0, peak - start)

    def _touch_weights(self) -> None:
        """Read every weight once. Weights loaded from safetensors stay file pages until first used, and the
        first batch pages them in while its activations are alive: its peak would count them."""
        import torch

        if self._touched:
            return
        self._touched = True
        with torch.inference_mode():
            for tensor in (*self.model.parameters(), *self.model.buffers()):
                if tensor.numel():
                    tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one read a page

    def _free(self) -> int | None:
        """Bytes a batch may still take on the model's device."""
        import torch

        if self.device == "cuda":
            device = self.placement.device
            free, _total = torch.cuda.mem_get_info(device)
            # Blocks torch's allocator holds but does not use are free for the next batch too.
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        available = available_memory()
        # MemAvailable counts file pages as reclaimable, the model's memory-mapped weights and torch's
        # libraries among them; this process needs them resident.
        return None if available is None else max(0, available - (_status("RssFile") or 0))

    def _choose(self, images: int, growth: int, input_bytes: float) -> None:
        per_image = growth / max(images, 1)
        if self.device == "cpu":
            # The batches decoded ahead of the model wait in RAM too: one per decode thread, and one more.
            per_image += (self.workers + 1) * input_bytes
        free = self._free()
        cap = max(AUTO_CAP, self.default)
        if free is None:
            size, why = self.default, "the model's default: free memory unknown"
        else:
            budget = free * (GPU_SHARE if self.device == "cuda" else CPU_SHARE)
            size = fit(budget, per_image, cap)
            limit = "the most it takes" if size == cap else f"{budget / 2**30:.1f} GB of memory for batches"
            why = (
                f"auto: {per_image / 2**20:,.0f} MB an image, measured on the first {images}; "
                f"{free / 2**30:.1f} GB free; {limit}"
            )
        if self.ceiling is not None and size > self.ceiling:
            size, why = self.ceiling, f"{why}; kept at {self.ceiling}: more ran out of memory"
        self.size, self.probing = size, False
        log.info("batch size %d (%s)", size, why)
