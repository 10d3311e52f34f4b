"""`loracap train`: teach a prefix captioner your caption style, on accelerate.

    from loracap.train.loop import train
    from loracap.train.settings import TrainSettings

    settings = TrainSettings(data="my_dataset", out="my-captioner", max_steps=500)
    result = train(settings)        # -> my-captioner/ (a model folder `loracap caption --model` takes)

What trains: the projector and LoRA adapters on the LM (about 1% of the parameters), plus the top
`unfreeze_vision_layers` of the vision tower if asked; each group has its own learning rate. Warmup then
cosine decay, gradient accumulation, bf16/fp16 on a GPU, `accelerate launch` for several GPUs.

Checkpoints (`out/checkpoints/step-N`) hold the model, optimizer, scheduler and RNG states (accelerate's
`save_state`) plus the data position, so `--resume` continues exactly where a run stopped: the same
batches in the same order, the same dropout masks. Validation loss decides early stopping and which
weights are kept; the final folder is the best validation step's captioner with LoRA merged.

With `cache_features` (`--cache-features`) and a frozen vision tower, the tower runs once per image: its
float32 features go to a disk cache keyed by the encoder (id and a fingerprint of its weights and
preprocessing) and the image's content (see `loracap.train.features`), and training and validation read
them back instead of decoding and encoding the images every epoch; a later run on the same images and
tower computes nothing. Validation captions and the test-split scores still caption from the images.

This module holds the run itself; its parts live beside it: `settings` (TrainSettings), `data` (examples
and splits), `batches` (datasets, sampler, collate), `features` (the feature cache), `trainable` (the
model and its parameter groups), `checkpoints`, `validation` (loss and caption metrics), `alignment`
(the CLIP loss) and `metrics` (scores, `loracap eval`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from loracap.hub import resolve_model
from loracap.postprocess import looks_like_tags
from loracap.prefix.io import save_captioner
from loracap.prefix.modeling import PrefixCaptioner
from loracap.train.alignment import ClipAlignment
from loracap.train.batches import CaptionDataset, EpochSampler, make_collate
from loracap.train.checkpoints import (
    BEST_FILE,
    load_weights,
    resume_state,
    save_weights,
    trainable_state,
    write_state,
)
from loracap.train.checkpoints import save_checkpoint as _checkpoint  # the resume tests patch this name
from loracap.train.data import (
    Example,
    assign_splits,
    dataset_splits,
    extend_split,
    load_examples,
    read_split,
    write_split,
)
from loracap.train.features import FeatureDataset, fill_cache, find_entries, open_cache
from loracap.train.metrics import evaluate_examples
from loracap.train.settings import TrainSettings, check_settings, tracked_settings, uses_feature_cache
from loracap.train.trainable import count_parameters, load_parts, prepare_trainable
from loracap.train.validation import evaluate_loss, main_caption_metrics

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    out: Path
    steps: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    """Loading and training, up to saving the result (which, with the test-split scoring, comes after)."""
    train_seconds: float
    """The training loop alone (validation included), the time `samples_per_second` is measured over."""
    samples_per_second: float
    trainable_parameters: int
    total_parameters: int
    history: list[dict[str, float]]
    is_main_process: bool = True
    """False in the other processes of a multi-process run: only the main one saves and scores."""
    test_metrics: dict[str, Any] | None = None
    """`loracap eval` on the test split of the saved captioner (also in OUT/eval-test.json)."""


# --- the loop -------------------------------------------------------------------------------------------


def train(settings: TrainSettings) -> TrainResult:
    """Train, validate, checkpoint and save; see the module docstring."""
    # accelerate is the optional `train` extra: imported when a run starts, not with this module.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(settings.out)
    started = time.perf_counter()
    check_settings(settings)
    caching = uses_feature_cache(settings)
    mixed = settings.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # accelerate keeps one state per process: without this, a second train() in the same process (a
    # notebook, a sweep) with another mixed precision raises. The process group itself is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=settings.grad_accum,
        log_with="tensorboard" if _has_tensorboard() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(settings.seed)

    examples = load_examples(
        settings.data, image_column=settings.image_column, caption_column=settings.caption_column
    )
    if not examples:
        raise ValueError(f"{settings.data} has no captioned images to train on")
    init_dir = resolve_model(settings.init_from) if settings.init_from else None
    splits = _splits(settings, examples, out, init_dir, accelerator)
    by_key = {e.key: e for e in examples}
    train_set = [by_key[k] for k in splits["train"] if k in by_key]
    val_set = [by_key[k] for k in splits["val"] if k in by_key]
    if not train_set:
        raise ValueError("the train split is empty: add captioned images or lower --val-share/--test-share")

    caption_format = "tags" if looks_like_tags([e.caption for e in train_set]) else "prose"
    model, image_processor, tokenizer = load_parts(settings, init_dir, caption_format)
    if settings.init_from and settings.prompt != model.config.prompt and settings.prompt:
        raise ValueError(f"--prompt differs from the captioner's own ({model.config.prompt!r}); leave it out")
    prompt, max_tokens = model.config.prompt, model.config.max_caption_tokens
    groups = prepare_trainable(model, settings)
    alignment = None
    if settings.clip_loss_weight > 0:
        alignment = ClipAlignment(settings.clip_model, model.language_model.config.hidden_size)
        groups.append(
            {"params": list(alignment.parameters()), "lr": settings.lr_projector, "name": "clip-head"}
        )
    trainable, total = count_parameters(model)

    if caching:
        entries = _cached_features(settings, accelerator, model, image_processor, train_set + val_set)
        train_data = FeatureDataset(train_set, entries[: len(train_set)])
        val_data = FeatureDataset(val_set, entries[len(train_set) :])
    else:
        train_data, val_data = (
            CaptionDataset(train_set, image_processor),
            CaptionDataset(val_set, image_processor),
        )
    collate = make_collate(tokenizer, image_processor, prompt, max_tokens)
    sampler = EpochSampler(len(train_set), settings.seed)
    loader = DataLoader(
        train_data,
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=settings.workers,
        drop_last=False,
        # Its own generator: starting an iterator (each epoch, and after a resume) must not draw from the
        # global RNG that dropout uses, or a resumed run would see other dropout masks than the original.
        generator=torch.Generator().manual_seed(settings.seed),
    )
    val_loader = DataLoader(
        val_data,
        batch_size=settings.batch_size,
        collate_fn=collate,
        num_workers=settings.workers,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups], weight_decay=settings.weight_decay
    )
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    # Counted on the prepared loader: with several processes each one sees its share of the batches.
    steps_per_epoch = math.ceil(len(loader) / settings.grad_accum)
    total_steps = settings.max_steps or steps_per_epoch * settings.epochs
    # accelerate steps a prepared scheduler once per process at every optimizer step, so its horizon is
    # counted in process-steps: warmup and decay then span the run however many processes share it.
    processes = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, min(settings.warmup_steps, total_steps // 10 or 1) * processes, total_steps * processes
    )
    scheduler = accelerator.prepare(scheduler)
    if alignment is not None:
        alignment = accelerator.prepare(alignment)
    accelerator.init_trackers("loracap-train", config=tracked_settings(settings))

    state = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_val_loss": None,
        "best_step": None,
        "bad_evals": 0,
        "history": [],
    }
    if settings.resume:
        state = resume_state(accelerator, out, state)

    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        unit="step",
        desc="training",
        disable=not settings.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    samples, stopped_early = 0, False
    loop_started = time.perf_counter()
    try:
        while state["step"] < total_steps and not stopped_early:
            epoch_loader = (
                accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
            )
            # accelerate's loaders count their own passes and set the sampler's epoch from that count on
            # every pass; a resumed run's fresh loader would restart it at 0, so both are told the epoch.
            if hasattr(epoch_loader, "set_epoch"):
                epoch_loader.set_epoch(state["epoch"])
            sampler.set_epoch(state["epoch"])
            for batch in epoch_loader:
                if batch is None:  # every image of the batch was unreadable (each one reported)
                    state["batch"] += 1
                    continue
                captions = batch.pop("captions")
                model.train()
                with accelerator.accumulate(model):
                    out_lm = model(**batch)
                    loss = out_lm.loss
                    if alignment is not None:
                        loss = loss + settings.clip_loss_weight * alignment(out_lm.prefix, captions)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and settings.max_grad_norm:
                        accelerator.clip_grad_norm_(
                            [p for g in optimizer.param_groups for p in g["params"]], settings.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state["batch"] += 1
                samples += len(captions)
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                accelerator.log(
                    {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=state["step"]
                )
                if val_set and (state["step"] % settings.eval_every == 0 or state["step"] == total_steps):
                    val_loss = evaluate_loss(model, val_loader, accelerator)
                    record = {"step": state["step"], "val_loss": val_loss, "train_loss": loss.item()}
                    if settings.val_metrics:
                        scored = main_caption_metrics(accelerator, model, val_set, image_processor, tokenizer)
                        record.update(scored)
                    accelerator.log(
                        {f"val/{k}": v for k, v in record.items() if k != "step"}, step=state["step"]
                    )
                    state["history"].append(record)
                    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                        state.update(best_val_loss=val_loss, best_step=state["step"], bad_evals=0)
                        if accelerator.is_main_process:  # on disk, so a resumed run has it too
                            save_weights(out / BEST_FILE, trainable_state(accelerator.unwrap_model(model)))
                    else:
                        state["bad_evals"] += 1
                        stopped_early = bool(settings.patience) and state["bad_evals"] >= settings.patience
                if state["step"] % settings.checkpoint_every == 0:
                    _checkpoint(accelerator, out, state, settings.keep_checkpoints)
                if state["step"] >= total_steps or stopped_early:
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
    finally:
        bar.close()
    train_seconds = time.perf_counter() - loop_started
    # The DDP wrapper goes before the process group does: its Reducer, freed last, would destroy a Gloo
    # group while holding the GIL, and the group's worker threads can need the GIL to finish: a hang at
    # exit seen in two-process runs (pytorch/pytorch#56297).
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    accelerator.end_training()

    seconds = time.perf_counter() - started
    test_metrics = None
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if state["best_step"] is not None and (out / BEST_FILE).is_file():
            final.load_state_dict(load_weights(out / BEST_FILE), strict=False)
        # Saved in place, no copy: save_captioner merges the LoRA adapters into the LM and .float() casts,
        # which would matter only if the model were used again; it is not (the test split is captioned
        # from the saved folder).
        save_captioner(final.float(), image_processor, tokenizer, out)
        write_state(out, state)
        test_set = [by_key[k] for k in splits["test"] if k in by_key]
        if settings.test_metrics and test_set:
            # The examples already loaded (with this run's columns), captioned through the saved folder as
            # `loracap caption --model OUT` will load it.
            test_metrics = evaluate_examples(
                out, test_set, data=str(settings.data), split="test", progress=settings.progress
            )
    return TrainResult(
        out=out,
        steps=state["step"],
        best_step=state["best_step"],
        best_val_loss=state["best_val_loss"],
        stopped_early=stopped_early,
        seconds=seconds,
        train_seconds=train_seconds,
        # Every process trains as many batches; their samples add up.
        samples_per_second=samples * accelerator.num_processes / train_seconds if train_seconds else 0.0,
        is_main_process=accelerator.is_main_process,
        trainable_parameters=trainable,
        total_parameters=total,
        history=state["history"],
        test_metrics=test_metrics,
    )


def _cached_features(
    settings: TrainSettings,
    accelerator: Any,
    model: PrefixCaptioner,
    image_processor: Any,
    examples: list[Example],
) -> list[Path | None]:
    """Each example's feature-cache entry (None: unreadable image), computing the missing ones first.

    On each machine its main process fills the cache while the others wait, then they look the entries
    up: one writer per cache, and entries are written atomically under unique temporary names, so even
    machines sharing one cache folder cannot leave a torn entry. The others wait in a collective, which
    NCCL gives up on after its timeout (10 minutes by default): for a dataset whose first fill takes
    longer, fill the cache with a one-process run first."""
    # Fingerprinted here, on the CPU weights as loaded; the tower then computes on the training device
    # (where accelerate's prepare would move it anyway).
    cache = open_cache(model, image_processor, settings.feature_cache_dir)
    model.vision_tower.to(accelerator.device)
    if not accelerator.is_local_main_process:
        accelerator.wait_for_everyone()
        return find_entries(cache, examples)
    filled = fill_cache(
        cache,
        model,
        examples,
        image_processor,
        batch_size=settings.batch_size,
        workers=settings.workers,
        progress=settings.progress,
    )
    left_out = f", {filled.unreadable} unreadable left out" if filled.unreadable else ""
    log.info(
        "vision features: %d reused, %d computed%s (cache %s)",
        filled.reused,
        filled.computed,
        left_out,
        cache.folder,
    )
    accelerator.wait_for_everyone()
    return filled.entries


def _splits(
    settings: TrainSettings, examples: list[Example], out: Path, init_dir: Path | None, accelerator: Any
) -> dict[str, list[str]]:
    """A resumed run reuses its saved split. A run continuing from a captioner (`init_dir`) keeps that
    captioner's split, so its test images never reach training, and assigns only keys it never saw.
    Otherwise the dataset's own splits.json or a seeded draw."""
    saved = read_split(out) if settings.resume else None
    if saved is not None:
        return saved
    keys = [e.key for e in examples]
    previous = read_split(init_dir) if init_dir is not None else None
    splits = _new_split(settings, keys)
    if previous is not None:
        splits = extend_split(previous, splits)
    if accelerator.is_main_process:
        write_split(out, splits, seed=settings.seed, source=str(settings.data))
    return splits


def _new_split(settings: TrainSettings, keys: list[str]) -> dict[str, list[str]]:
    """The dataset's own splits.json, or a seeded draw over `keys`."""
    own = dataset_splits(settings.data) if Path(settings.data).is_dir() else None
    return own or assign_splits(
        keys, seed=settings.seed, val_share=settings.val_share, test_share=settings.test_share
    )


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401  (a probe: is the optional logger installed?)
    except ImportError:
        return False
    return True
