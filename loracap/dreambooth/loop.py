"""`loracap dreambooth`: DreamBooth-LoRA with class-prior preservation on a captioned dataset, on accelerate.

    from loracap.dreambooth.loop import dreambooth
    from loracap.dreambooth.settings import DreamBoothConfig

    result = dreambooth(DreamBoothConfig(data="ohwx", base="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                         out="ohwx-lora", trigger="ohwx", class_prompt="photo of a woman"))
    result.lora   # ohwx-lora/ohwx-lora.safetensors: ComfyUI, A1111/Forge, diffusers, `loracap generate`

The run, in order (everything that can be refused is refused before the weights load):
  1. settings checked; the base's family read from its model_index.json (a non-SD base is refused here);
     OUT checked (a run there needs --resume or --overwrite)
  2. the dataset read (`captions`): trigger rule, instance-prompt fallback, unreadable images listed and
     left out, the pre-training checks as warnings (errors with --strict)
  3. the base pipeline loaded once; class images found, reused or generated with it (`prior`)
  4. LoRA adapters added (`lora`), optimizer and schedule (`optim`), batches (`data`), all through
     accelerate (devices, mixed precision, gradient accumulation, several processes)
  5. the loop: loss from the family (`families`), instance MSE + prior weight x class MSE; checkpoints
     (`checkpoints`), validation grids (`validation`), TensorBoard scalars and images
  6. the LoRA file through `lora_files.save_lora` (kohya layout by default)

Exactness on --resume: item draws come from the sampler's per-item seeds, noise and timesteps from a
generator seeded per batch position, and RNG states, optimizer, scheduler and the data position from the
checkpoint; a resumed run ends with the weights of an uninterrupted one (a test checks).

Ctrl-C: the first one lets the current batch finish, then a checkpoint is saved and the run stops
(KeyboardInterrupt); a second one stops at once.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loracap.dataset.buckets import cover_size
from loracap.dreambooth.base import base_family, load_base, resolve_base
from loracap.dreambooth.cache import (
    CacheItem,
    LatentCache,
    fill_latent_cache,
    text_cache_plan,
    vae_fingerprint,
)
from loracap.dreambooth.captions import Instances, dataset_warnings, read_instances
from loracap.dreambooth.checkpoints import (
    check_out,
    checkpoint_folders,
    clear_run,
    install_state_hooks,
    resume_state,
    save_checkpoint,
    write_run,
)
from loracap.dreambooth.data import (
    BucketBatchSampler,
    DreamBoothDataset,
    LatentLookup,
    Placement,
    bucket_settings,
    collate,
    place_images,
)
from loracap.dreambooth.families import (
    DEFAULT_GUIDANCE,
    FAMILIES,
    Family,
    flux_sequence_length,
    make_family,
    native_side,
    size_multiple,
)
from loracap.dreambooth.lora import add_lora, lora_modules
from loracap.dreambooth.lora_files import TrainingInfo, save_lora, tag_frequency
from loracap.dreambooth.memory import (
    check_quantization,
    compile_denoiser,
    move_off_accelerator,
    nf4_quantization,
    peak_memory,
    quantize_fp8,
)
from loracap.dreambooth.optim import check_optimizer, make_optimizer, make_scheduler
from loracap.dreambooth.prior import ClassImages, ClassRecipe, base_fingerprint, prepare_class_images
from loracap.dreambooth.settings import (
    DEFAULT_STEPS,
    DreamBoothConfig,
    check_config,
    tracked_settings,
    uses_prior,
)
from loracap.dreambooth.validation import grid_path, render_prompts, sample_grid
from loracap.inputs import ImageDecodeError, read_size

log = logging.getLogger(__name__)

__all__ = ["DreamBoothResult", "dreambooth"]

_MIX = 1_000_003


@dataclass
class DreamBoothResult:
    out: Path
    lora: Path | None
    """The LoRA file (None in the other processes of a multi-process run: the main one saves)."""
    family: str
    steps: int
    resumed_from: int
    seconds: float
    train_seconds: float
    steps_per_second: float
    """Optimizer steps over the loop's time, validation and checkpoints included."""
    instances: int
    without_caption: int
    unreadable: list[str]
    class_images: ClassImages | None
    grids: list[Path] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    """Per optimizer step: step, loss, instance_loss, prior_loss (when on), lr."""
    warnings: list[str] = field(default_factory=list)
    is_main_process: bool = True


def dreambooth(
    config: DreamBoothConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None
) -> DreamBoothResult:
    """Train, checkpoint, validate and save; see the module docstring. `on_step(state)` is called after
    every optimizer step (its checkpoint and grid written) with the step, epoch and data position."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    started = time.perf_counter()
    check_config(config)
    out = Path(config.out)
    base_dir = resolve_base(config.base)
    family_name = base_family(base_dir)  # reads model_index.json only: another pipeline stops here
    if family_name not in FAMILIES:
        raise ValueError(
            f"{config.base} is a {family_name} pipeline; DreamBooth trains {', '.join(FAMILIES)}"
        )
    if family_name == "flux" and config.train_text_encoder:
        raise ValueError(
            "--train-text-encoder is for SD 1.x/2.x and SDXL: a Flux LoRA trains the transformer (T5 and "
            "CLIP stay frozen, as in the Flux trainers users know)"
        )
    side = config.resolution or native_side(base_dir)
    _check_sizes(config, side, size_multiple(base_dir, family_name), family_name)
    check_out(out, config)
    mixed = _mixed_precision(config.mixed_precision)
    # accelerate keeps one state per process; a second run in the same process (tests, a notebook) with
    # other settings would raise without this. The process group itself is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if _has_tensorboard() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    main = accelerator.is_main_process
    if main and not _has_tensorboard():
        log.info("TensorBoard is not installed: no logs in %s (pip install tensorboard)", out / "logs")
    check_optimizer(config, accelerator.device)
    check_quantization(config, accelerator.device)
    name = config.output_name or out.resolve().name
    lora_path = out / f"{name}.safetensors"

    instances, warnings = _instances(config, base_dir, main, family_name)
    settings = bucket_settings(config, side) if config.bucket else None
    placements = place_images([(i.image, *i.size) for i in instances.items], settings, side)
    if main:
        _say_buckets(placements, settings)
    weight_dtype = {"fp16": "fp16", "bf16": "bf16"}.get(mixed, "fp32")
    denoiser_name = "transformer" if family_name == "flux" else "unet"
    pipeline = load_base(
        base_dir,
        device=str(accelerator.device),
        dtype=weight_dtype,
        progress=config.progress,
        quantization=nf4_quantization(config, denoiser_name),
    )
    if family_name == "sdxl" and weight_dtype == "fp16":
        pipeline.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (diffusers' trainers keep it fp32 too)
    guidance = DEFAULT_GUIDANCE[family_name]
    class_set = None
    if uses_prior(config):
        class_set = _class_images(config, accelerator, pipeline, base_dir, side, guidance)
    class_images = class_set.images if class_set else []

    set_seed(config.seed)  # the adapters' initial weights (and any LoRA dropout) follow the seed
    family = make_family(family_name, pipeline, config)
    if config.quantize_base == "fp8":
        quantize_fp8(family.denoiser, pipeline.dtype)
    groups = add_lora(family, config)
    adapted = lora_modules(family, config)  # the pipeline's own modules, unwrapped: saved and validated
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, config)
    if config.compile:
        compile_denoiser(family.denoiser)
    latents = _latent_cache(config, accelerator, family, instances, placements, class_images)
    texts, plan = text_cache_plan(config, [i.caption for i in instances.items])
    if main:
        log.info("%s", plan)
    if texts is not None:
        family.text_cache = _encode_texts(family, texts, accelerator)
    cached_parts = ([family.vae] if latents else []) + (family.text_encoders if texts is not None else [])
    move_off_accelerator(cached_parts, accelerator.device)
    dataset = DreamBoothDataset(
        instances.items,
        placements,
        class_images,
        config.class_prompt,
        random_crop=config.crop == "random",
        random_flip=config.random_flip,
        tags=instances.tags,
        caption_dropout=config.caption_dropout,
        shuffle_tags=config.shuffle_tags,
        keep_tokens=config.keep_tokens,
        latents=latents,
    )
    sampler = BucketBatchSampler(
        [p.bucket for p in placements], len(class_images), config.batch_size, config.seed
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=0 if latents else config.workers,  # reading a cached latent is quicker than a process hop
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=bool(config.workers and not latents),
        # Its own generator: starting an iterator must not draw from the global RNG (LoRA dropout's).
        generator=torch.Generator().manual_seed(config.seed),
    )
    trained = list(adapted.values())
    prepared = accelerator.prepare(*trained, optimizer, loader)
    wrapped = dict(zip(adapted, prepared[: len(trained)], strict=True))
    optimizer, loader = prepared[-2], prepared[-1]
    family.denoiser = wrapped["denoiser"]
    if config.train_text_encoder:
        family.text_encoders = [wrapped[k] for k in adapted if k != "denoiser"]
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps or (config.epochs * steps_per_epoch if config.epochs else DEFAULT_STEPS)
    scheduler = accelerator.prepare(make_scheduler(optimizer, config, total, accelerator.num_processes))
    install_state_hooks(accelerator, lambda: adapted)
    if config.overwrite and main:  # only now: a run refused above (bad data, --strict) leaves the old one
        clear_run(out, lora_path)
    accelerator.init_trackers("loracap-dreambooth", config=tracked_settings(config))

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0}
    if config.resume:
        state = resume_state(accelerator, out, state)
    resumed_from = state["step"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_run(out, config, state, "training", family=family_name, total_steps=total)
        log.info(
            "training a %s LoRA (rank %d) on %d images%s for %d steps (%d per epoch), %s px, on %s",
            family_name,
            config.rank,
            len(instances.items),
            f" + {len(class_images)} class images" if class_images else "",
            total,
            steps_per_epoch,
            side,
            accelerator.device,
        )

    def write_lora(path: Path, steps: int) -> Path:
        info = TrainingInfo(
            base_model=str(config.base),
            trigger=config.trigger or "",
            steps=steps,
            resolution=side,
            tag_frequency=tag_frequency(
                Path(config.data).resolve().name, [i.caption for i in instances.items]
            ),
            output_name=name,
            extra={"ss_learning_rate": str(config.lr), "ss_num_train_images": str(len(instances.items))},
        )
        encoders = [m for k, m in adapted.items() if k != "denoiser"]  # pipeline order; none when not trained
        return save_lora(
            path,
            adapted["denoiser"],
            encoders,
            family=family_name,
            rank=config.rank,
            alpha=config.alpha if config.alpha is not None else config.rank,
            fmt=config.lora_format,
            metadata=info,
        )

    def checkpoint() -> None:
        save_checkpoint(
            accelerator,
            out,
            dict(state),
            config.checkpoints_total_limit,
            lambda folder: write_lora(folder / f"{name}.safetensors", state["step"]),
        )

    validation = _Validation(config, accelerator, pipeline, list(adapted.values()), out, side, guidance)
    validation.offloaded = cached_parts
    if resumed_from == 0:
        validation.run(0)

    bar = tqdm(
        total=total,
        initial=state["step"],
        unit="step",
        desc="dreambooth",
        disable=not (config.progress and main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    at_sync = accelerator.step  # accelerate's micro-batch counter as of the last optimizer step
    losses_log = _LossLog(accelerator, bar, scheduler)
    loop_started = time.perf_counter()
    try:
        with _deferred_interrupt() as interrupted:
            while state["step"] < total:
                epoch_loader = (
                    accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
                )
                # accelerate's loaders count their own passes and set the sampler's epoch from that count;
                # a resumed run's fresh loader would restart at 0, so both are told the epoch.
                if hasattr(epoch_loader, "set_epoch"):
                    epoch_loader.set_epoch(state["epoch"])
                sampler.set_epoch(state["epoch"])
                position = state["batch"]
                for batch in epoch_loader:
                    with accelerator.accumulate(*trained):
                        if batch is not None:  # None: every instance image of the batch was unreadable
                            generator = _batch_generator(config.seed, accelerator, state["epoch"], position)
                            losses = family.loss(batch, generator)
                            loss = _combine(
                                losses, batch.instance_count, config.prior_loss_weight, losses_log
                            )
                            accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    position += 1
                    if accelerator.sync_gradients:
                        at_sync = accelerator.step
                        state["step"] += 1
                        state["batch"] = position
                        losses_log.close_step(state["step"])
                        if state["step"] % config.log_every == 0 or state["step"] == total:
                            losses_log.flush()
                        if state["step"] % config.checkpoint_every == 0 or state["step"] == total:
                            checkpoint()
                        if validation.due(state["step"], total):
                            validation.run(state["step"])
                        if on_step is not None:
                            on_step(dict(state))
                    if _stop_requested(interrupted, accelerator):
                        raise KeyboardInterrupt
                    if state["step"] >= total:
                        break
                else:
                    state["epoch"] += 1
                    state["batch"] = 0
    except KeyboardInterrupt:
        # The state is that of the last optimizer step: micro-batches since then are dropped, with their
        # gradients, and accelerate's micro-batch counter goes back so a resume accumulates the same way.
        accelerator.step = at_sync
        optimizer.zero_grad(set_to_none=True)
        losses_log.flush()
        saved = {int(p.name.split("-")[1]) for p in checkpoint_folders(out)}
        if state["step"] and state["step"] not in saved:
            log.warning("interrupted: saving a checkpoint at step %d before stopping", state["step"])
            checkpoint()
        if main:
            write_run(out, config, state, "interrupted", family=family_name, total_steps=total)
        accelerator.end_training()  # flushes TensorBoard
        raise
    finally:
        bar.close()
    losses_log.flush()
    history = losses_log.history
    train_seconds = time.perf_counter() - loop_started
    peak, measured = peak_memory(accelerator.device)
    if main:
        log.info("peak %s: %.2f GB", measured, peak / 1e9)

    lora = None
    if main:
        lora = write_lora(lora_path, state["step"])
        write_run(out, config, state, "done", family=family_name, total_steps=total, lora=lora.name)
        log.info("LoRA written to %s", lora)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained_steps = state["step"] - resumed_from
    return DreamBoothResult(
        out=out,
        lora=lora,
        family=family_name,
        steps=state["step"],
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        steps_per_second=trained_steps / train_seconds if train_seconds and trained_steps else 0.0,
        instances=len(instances.items),
        without_caption=len(instances.without_caption),
        unreadable=instances.unreadable,
        class_images=class_set,
        grids=validation.written,
        history=history,
        warnings=warnings,
        is_main_process=main,
    )


# --- before training ---------------------------------------------------------------------------------------


def _mixed_precision(asked: str) -> str:
    if asked == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if asked == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    return asked


def _instances(
    config: DreamBoothConfig, base_dir: Path, main: bool, family: str
) -> tuple[Instances, list[str]]:
    """The dataset's instances and the pre-training warnings, logged (by the main process); with --strict
    any warning is a ValueError instead. Caption lengths are counted against the window that cuts them: the
    CLIP tokenizer's 77 tokens (SD), T5's --max-sequence-length (Flux)."""
    from transformers import AutoTokenizer

    instances = read_instances(
        config.data,
        trigger=config.trigger,
        instance_prompt=config.instance_prompt,
        layout=config.layout,
        caption_ext=config.caption_ext,
        metadata_file=config.metadata_file,
        progress=config.progress and main,
    )
    if family == "flux":
        tokenizer = AutoTokenizer.from_pretrained(base_dir / "tokenizer_2")
        transformer = json.loads((base_dir / "transformer" / "config.json").read_text(encoding="utf-8"))
        tokenizer.model_max_length = config.max_sequence_length or flux_sequence_length(transformer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base_dir / "tokenizer")
    warnings = dataset_warnings(instances, tokenizer, trigger=config.trigger, prompt=config.instance_prompt)
    if config.strict and warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise ValueError(f"--strict: {warnings[0]}{more}")
    if main:
        for line in warnings:
            log.warning("%s", line)
        if instances.unreadable:
            log.warning(
                "left out %d unreadable images: %s",
                len(instances.unreadable),
                ", ".join(instances.unreadable),
            )
        for problem in instances.caption_problems:
            log.warning("caption not read, image left out: %s", problem)
    return instances, warnings


def _class_images(
    config: DreamBoothConfig, accelerator: Any, pipeline: Any, base_dir: Path, side: int, guidance: float
) -> ClassImages:
    """The class images, generated by the main process where missing while the others wait."""
    folder = Path(config.class_data_dir) if config.class_data_dir else Path(config.out) / "class-images"
    recipe = ClassRecipe(
        base=base_fingerprint(base_dir),
        prompt=config.class_prompt or "",
        size=side,
        steps=config.class_inference_steps,
        guidance=config.class_guidance if config.class_guidance is not None else guidance,
    )

    def generate(seeds: list[int]) -> list[Any]:
        # CPU generators, one per image, as `loracap generate` seeds: the same image on any device.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            return pipeline(
                prompt=[recipe.prompt] * len(seeds),
                generator=generators,
                num_inference_steps=recipe.steps,
                guidance_scale=recipe.guidance,
                height=side,
                width=side,
            ).images

    def refuse(seeds: list[int]) -> list[Any]:
        raise RuntimeError("class images missing after the main process generated them")

    kwargs = {"seed": config.class_seed, "batch_size": config.class_batch_size}
    if accelerator.is_main_process:
        found = prepare_class_images(
            folder, config.num_class_images, recipe, generate=generate, progress=config.progress, **kwargs
        )
        log.info(
            "class images in %s: %d of your own, %d reused, %d generated",
            folder,
            found.own,
            found.reused,
            found.generated,
        )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        found = prepare_class_images(
            folder, config.num_class_images, recipe, generate=refuse, progress=False, **kwargs
        )
    return found


def _check_sizes(config: DreamBoothConfig, side: int, multiple: int, family: str) -> None:
    """The training side and the bucket steps must be whole latent patches: multiples of the VAE's factor
    (x2 for Flux's 2x2 packing)."""
    for flag, value in (("--resolution", side), ("--bucket-reso-steps", config.bucket_reso_steps)):
        if value % multiple:
            raise ValueError(f"{flag} must be a multiple of {multiple} for this {family} base, not {value}")
    if config.bucket and side % config.bucket_reso_steps:
        raise ValueError(
            f"--resolution {side} is not a multiple of --bucket-reso-steps {config.bucket_reso_steps}: give "
            "a smaller --bucket-reso-steps, or --no-bucket"
        )
    if config.bucket:
        try:
            bucket_settings(config, side)
        except ValueError as exc:
            raise ValueError(f"bucket settings: {exc} (--min-bucket-reso, --max-bucket-reso)") from None


def _say_buckets(placements: list[Placement], settings: Any) -> None:
    """The bucket assignment, before training (the same as `loracap report`'s preview for these settings)."""
    counts: dict[tuple[int, int], int] = {}
    for p in placements:
        counts[p.bucket] = counts.get(p.bucket, 0) + 1
    listed = ", ".join(
        f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    if settings is None:
        log.info("no buckets: every image cropped to %s", listed)
        return
    log.info(
        "%d aspect-ratio bucket(s) (resolution %d, %d-%d px in steps of %d%s): %s",
        len(counts),
        settings.resolution,
        settings.min_bucket_reso,
        settings.max_bucket_reso,
        settings.bucket_reso_steps,
        ", no upscaling" if settings.no_upscale else "",
        listed,
    )


def _latent_cache(
    config: DreamBoothConfig,
    accelerator: Any,
    family: Family,
    instances: Instances,
    placements: list[Placement],
    class_images: list[Path],
) -> LatentLookup | None:
    """With --cache-latents: every (image, bucket, flip) the run trains with encoded once, by the main
    process while the others wait; then the lookup the dataset reads them by."""
    if not config.cache_latents:
        return None
    flips = (False, True) if config.random_flip else (False,)
    items = [
        CacheItem(i.image, p.bucket, p.resized, flip)
        for i, p in zip(instances.items, placements, strict=True)
        for flip in flips
    ]
    for bucket in sorted({p.bucket for p in placements}):  # a class image takes its partner's bucket
        for path in class_images:
            try:
                width, height = read_size(path)
            except ImageDecodeError:
                continue  # the dataset skips it with a warning, as without the cache
            items += [CacheItem(path, bucket, cover_size(width, height, bucket), flip) for flip in flips]
    cache = LatentCache(Path(config.cache_dir or Path(config.out) / "cache") / "latents")
    vae_id = vae_fingerprint(family.vae)

    def fill(progress: bool) -> Any:
        return fill_latent_cache(
            cache,
            items,
            vae_id,
            family.latent_parameters,
            batch_size=max(4, config.batch_size),
            progress=progress,
        )

    if accelerator.is_main_process:
        keys, unreadable = fill(config.progress)
        for line in unreadable:
            log.warning("latent cache: cannot read %s; it is left out", line)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        keys, _ = fill(False)
    return LatentLookup(cache, keys)


def _encode_texts(family: Family, texts: list[str], accelerator: Any, batch: int = 8) -> dict[str, dict]:
    """Each text's conditioning, encoded once with the frozen text encoders; kept on the CPU, since a batch
    moves only its own."""
    cache: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            encoded = family.encode_text(chunk, accelerator.device)
            for j, text in enumerate(chunk):
                cache[text] = {k: v[j].detach().to("cpu") for k, v in encoded.items()}
    return cache


# --- the loop's parts ---------------------------------------------------------------------------------------


class _LossLog:
    """The losses of each optimizer step, kept on the device until `flush` reads them all at once: reading
    a loss waits for the GPU to finish the step, so it is done every --log-every steps, not every step.
    The progress bar counts every step; its loss, TensorBoard and `history` are filled at each flush."""

    def __init__(self, accelerator: Any, bar: Any, scheduler: Any) -> None:
        self.accelerator, self.bar, self.scheduler = accelerator, bar, scheduler
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.pending: list[tuple[int, dict[str, torch.Tensor], list[float]]] = []
        self.history: list[dict[str, float]] = []

    def add(self, **values: torch.Tensor) -> None:
        """One micro-batch's losses."""
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def close_step(self, step: int) -> None:
        """The optimizer step `step` is done: its mean losses wait for the next flush."""
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.pending.append((step, means, list(self.scheduler.get_last_lr())))
        self.sums, self.count = {}, 0
        self.bar.update()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = [t for _, means, _ in self.pending for t in means.values()]
        values = iter(torch.stack(tensors).tolist() if tensors else [])  # one wait for the device
        for step, means, lrs in self.pending:
            record = {"step": step, **{k: next(values) for k in means}, "lr": lrs[0]}
            self.history.append(record)
            scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
            if len(lrs) > 1:
                scalars["train/lr_text_encoder"] = lrs[1]
            self.accelerator.log(scalars, step=step)
        if "loss" in self.history[-1]:
            self.bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}", lr=f"{self.history[-1]['lr']:.2e}")
        self.pending = []


def _combine(
    losses: torch.Tensor, instance_count: int, prior_weight: float, losses_log: _LossLog
) -> torch.Tensor:
    """Instance MSE + prior weight x class MSE, as in the DreamBooth paper (each the mean over its items)."""
    instance = losses[:instance_count].mean()
    if losses.shape[0] == instance_count:
        losses_log.add(loss=instance, instance_loss=instance)
        return instance
    prior = losses[instance_count:].mean()
    loss = instance + prior_weight * prior
    losses_log.add(loss=loss, instance_loss=instance, prior_loss=prior)
    return loss


def _batch_generator(seed: int, accelerator: Any, epoch: int, position: int) -> torch.Generator:
    """The noise, timesteps and VAE samples of one batch: seeded by its place in the run (and the process),
    so a resumed run draws them again whatever happened to the global RNG in between."""
    mixed = ((seed * _MIX + accelerator.process_index) * _MIX + epoch) * _MIX + position
    return torch.Generator(accelerator.device).manual_seed(mixed % (2**63))


class _Validation:
    """Grids at --validation-every steps (and at step 0, the base), by the main process."""

    def __init__(
        self,
        config: DreamBoothConfig,
        accelerator: Any,
        pipeline: Any,
        modules: list[torch.nn.Module],
        out: Path,
        side: int,
        guidance: float,
    ) -> None:
        self.config, self.accelerator, self.pipeline, self.modules = config, accelerator, pipeline, modules
        self.out, self.side = out, side
        self.guidance = config.validation_guidance if config.validation_guidance is not None else guidance
        self.prompts = render_prompts(config.validation_prompt, config.trigger)
        self.written: list[Path] = []
        self.offloaded: list[torch.nn.Module] = []
        """Parts moved off the GPU after caching: brought back for the grid."""

    def due(self, step: int, total: int) -> bool:
        return bool(self.prompts) and (step % self.config.validation_every == 0 or step == total)

    def run(self, step: int) -> None:
        if not self.prompts:
            return
        if self.accelerator.is_main_process:
            config = self.config
            device = self.accelerator.device
            for module in self.offloaded if device.type != "cpu" else []:
                module.to(device)
            image = sample_grid(
                self.pipeline,
                self.modules,
                self.prompts,
                seeds=[config.validation_seed + j for j in range(config.validation_images)],
                size=self.side,
                steps=config.validation_inference_steps,
                guidance=self.guidance,
                device=device,
                autocast=self.accelerator.autocast(),
            )
            move_off_accelerator(self.offloaded, device)
            path = grid_path(self.out, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            self.written.append(path)
            _log_image(self.accelerator, image, step)
        self.accelerator.wait_for_everyone()


def _log_image(accelerator: Any, image: Any, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(image)[None]}, step=step, dataformats="NHWC")


def _stop_requested(interrupted: Callable[[], bool], accelerator: Any) -> bool:
    """Whether a Ctrl-C asks the run to stop. With several processes they decide together, after the same
    batch: one that stopped alone would leave the others waiting in the next gradient all-reduce."""
    stop = interrupted()
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
        stop = accelerator.reduce(flag, reduction="sum").item() > 0
    return stop


@contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a request the loop acts on between batches (so a checkpoint is never of
    a half-applied optimizer step); a second Ctrl-C interrupts at once. Only in the main thread, where
    Python delivers signals; elsewhere Ctrl-C behaves as usual."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        log.warning("stopping after this batch to save a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401  (a probe: is the optional logger installed?)
    except ImportError:
        return False
    return True
