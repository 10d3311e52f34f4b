"""A run's folder: what it holds, its checkpoints, and how a run may (not) reuse it.

    OUT/loracap-dreambooth.json     settings and state of the run (step, epoch, data position, status):
                                    its presence is what "OUT holds a run" means
    OUT/checkpoints/step-N/         accelerate's `save_state` (optimizer, scheduler, RNG states, step
                                    counter, the fp16 loss scaler) with the model weights replaced by the
                                    LoRA weights alone (lora.safetensors: a few MB instead of the whole
                                    UNet), trainer_state.json (step, epoch, batch in the epoch) and the
                                    LoRA as a usable file, to try the run at that step
    OUT/<name>.safetensors          the LoRA, written at the end

A checkpoint is written into step-N.partial and renamed when complete, so a Ctrl-C during the save never
leaves a half checkpoint that --resume would load.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loracap.dreambooth.lora import load_lora_state, lora_state
from loracap.dreambooth.settings import FIXED_ON_RESUME, DreamBoothConfig, setting_values
from loracap.files import atomic_write_text
from loracap.train.checkpoints import STATE_FILE, checkpoint_folders, resume_state

log = logging.getLogger(__name__)

__all__ = [
    "LORA_WEIGHTS",
    "RUN_FILE",
    "STATE_FILE",
    "checkpoint_folders",
    "check_out",
    "clear_run",
    "install_state_hooks",
    "resume_state",
    "save_checkpoint",
    "write_run",
]

RUN_FILE = "loracap-dreambooth.json"
LORA_WEIGHTS = "lora.safetensors"


def read_run(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out / RUN_FILE} cannot be read ({exc}); move it away to start over") from None


def check_out(out: Path, config: DreamBoothConfig) -> dict[str, Any] | None:
    """Refuse an OUT that holds a run unless --resume or --overwrite says what to do with it, and a resume
    with settings its checkpoints do not fit. Returns the saved run (None: there is none)."""
    saved = read_run(out)
    holds_run = saved is not None or bool(checkpoint_folders(out))
    if not holds_run:
        return None
    if not (config.resume or config.overwrite):
        where = f" (step {saved['state']['step']}, {saved.get('status', '?')})" if saved else ""
        raise ValueError(
            f"{out} already holds a DreamBooth run{where}: add --resume to continue it or --overwrite to "
            "start over, or pick another --out"
        )
    if config.resume and saved is not None:
        before = saved.get("settings", {})
        now = setting_values(config)
        changed = [name for name in FIXED_ON_RESUME if name in before and before[name] != now[name]]
        if changed:
            name = changed[0]
            raise ValueError(
                f"--{name.replace('_', '-')} was {before[name]!r} in the run in {out}, not {now[name]!r}: a "
                f"resumed run must keep {', '.join('--' + n.replace('_', '-') for n in changed)} (or use "
                "--overwrite to start over)"
            )
    return saved


def clear_run(out: Path, lora_file: Path) -> None:
    """--overwrite: remove what the old run wrote (class images stay: their manifest says when they fit)."""
    for name in ("checkpoints", "samples", "logs"):
        shutil.rmtree(out / name, ignore_errors=True)
    for path in (out / RUN_FILE, lora_file):
        path.unlink(missing_ok=True)


def write_run(out: Path, config: DreamBoothConfig, state: dict[str, Any], status: str, **extra: Any) -> None:
    doc = {"status": status, "state": state, "settings": setting_values(config), **extra}
    atomic_write_text(out / RUN_FILE, json.dumps(doc, indent=1, default=str) + "\n")


def install_state_hooks(accelerator: Any, modules: Callable[[], dict[str, torch.nn.Module]]) -> None:
    """Make accelerate's save_state / load_state write and read the LoRA weights only (`modules()` gives
    the adapted modules): the frozen base never changes, and a full SD UNet per checkpoint is gigabytes."""

    def save_hook(models: list[Any], weights: list[Any], folder: str) -> None:
        weights.clear()  # accelerate would save whole models from these
        if accelerator.is_main_process:
            state = {k: v.contiguous().cpu() for k, v in lora_state(modules()).items()}
            save_file(state, str(Path(folder) / LORA_WEIGHTS))

    def load_hook(models: list[Any], folder: str) -> None:
        models.clear()  # loaded here instead
        load_lora_state(modules(), load_file(str(Path(folder) / LORA_WEIGHTS)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any,
    out: Path,
    state: dict[str, Any],
    keep: int | None,
    write_lora: Callable[[Path], None] | None = None,
) -> Path:
    """OUT/checkpoints/step-N for the state's step (see the module docstring); beyond the newest `keep`,
    older ones are removed. `write_lora(folder)` adds the usable LoRA file."""
    folder = out / "checkpoints" / f"step-{state['step']}"
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=1) + "\n")
        if write_lora is not None:
            write_lora(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        old = checkpoint_folders(out)
        for stale in old[:-keep] if keep else []:
            shutil.rmtree(stale, ignore_errors=True)
        log.debug("checkpoint %s", folder)
    accelerator.wait_for_everyone()
    return folder
