"""A run's state on disk: its checkpoints (to `--resume` from) and the best validation step's weights.

    OUT/checkpoints/step-N/        accelerate's `save_state` (model, optimizer, scheduler, RNG states)
                                   plus trainer_state.json: step, epoch, batch in the epoch, best step,
                                   history; the newest `keep` folders are kept
    OUT/best-trainable.safetensors the trainable weights of the best validation step so far (on disk, so
                                   a resumed run has them too)
    OUT/trainer_state.json         the final state, next to the saved captioner

`--resume` loads the newest checkpoint; the saved captioner gets the best step's weights.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loracap.files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "BEST_FILE",
    "STATE_FILE",
    "checkpoint_folders",
    "load_weights",
    "resume_state",
    "save_checkpoint",
    "save_weights",
    "trainable_state",
    "write_state",
]

STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"step-(\d+)")
BEST_FILE = "best-trainable.safetensors"  # the best validation step's trainable weights, during training


def save_checkpoint(accelerator: Any, out: Path, state: dict[str, Any], keep: int) -> None:
    """OUT/checkpoints/step-N for the state's step; older ones beyond the newest `keep` are removed
    (keep <= 0: none is)."""
    folder = out / "checkpoints" / f"step-{state['step']}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        write_state(folder, state)
        old = checkpoint_folders(out)
        for stale in old[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_folders(out: Path) -> list[Path]:
    """OUT/checkpoints/step-N folders, lowest N first (by number: as text step-1000 sorts before step-200);
    complete ones only (a `step-N.partial` being written, or a stray file, is not a checkpoint)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if _STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_state(accelerator: Any, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load the latest checkpoint into `accelerator`'s objects and return `state` updated with its saved
    state; `state` as it is when there is none."""
    checkpoints = checkpoint_folders(out)
    if not checkpoints:
        log.warning("no checkpoint in %s; starting from step 0", out / "checkpoints")
        return state
    latest = checkpoints[-1]
    accelerator.load_state(str(latest))
    saved = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
    log.info("resuming from %s (step %s)", latest, saved["step"])
    return {**state, **saved}


def write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train: all a best-step copy needs, since the frozen rest never changes."""
    # No clone: the tensors are written to disk at once.
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items() if k in names}
