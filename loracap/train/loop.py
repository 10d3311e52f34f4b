"""`loracap train`: teach a prefix captioner your caption style, on accelerate.

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
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from loracap.backends.hub import resolve_model
from loracap.prefix.batching import encode_captions
from loracap.prefix.io import save_captioner
from loracap.prefix.modeling import PrefixCaptioner, build_captioner
from loracap.quality.text import looks_like_tags
from loracap.train.data import (
    Example,
    assign_splits,
    dataset_splits,
    extend_split,
    load_examples,
    read_split,
    write_split,
)
from loracap.writers import atomic_write_text

__all__ = ["TrainResult", "TrainSettings", "train"]

STATE_FILE = "trainer_state.json"
BEST_FILE = "best-trainable.safetensors"  # the best validation step's trainable weights, during training


@dataclass
class TrainSettings:
    data: str
    out: str
    vision: str = "google/siglip-base-patch16-224"
    lm: str = "HuggingFaceTB/SmolLM2-135M"
    init_from: str | None = None
    """A captioner folder to continue from (`--from`): its towers, projector and tokenizer."""
    prompt: str = ""
    projector: str = "mlp"
    pixel_shuffle: int = 1
    max_caption_tokens: int = 64
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    """Module names for LoRA; None: peft's default for the LM's architecture (q_proj/v_proj for Llama)."""
    unfreeze_vision_layers: int = 0
    lr_projector: float = 1e-3
    lr_lora: float = 2e-4
    lr_vision: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 50
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"
    """"no", "bf16" or "fp16" (accelerate's names); "auto" picks bf16 on a GPU that has it."""
    max_grad_norm: float = 1.0
    seed: int = 0
    val_share: float = 0.1
    test_share: float = 0.1
    eval_every: int = 100
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    patience: int = 5
    """Stop after this many evaluations without a better validation loss (0: never stop early)."""
    test_metrics: bool = True
    """After training, caption the test split with the saved captioner and score it."""
    val_metrics: bool = True
    """Caption the validation images at each evaluation and log BLEU-4 / ROUGE-L / CIDEr."""
    clip_loss_weight: float = 0.0
    clip_model: str = "openai/clip-vit-base-patch32"
    resume: bool = False
    cache_features: bool = False
    """Compute the frozen vision tower's features once and read them back (needs unfreeze_vision_layers=0)."""
    feature_cache_dir: str | None = None
    """Where the feature cache lives (default: loracap_cache_dir()/vision-features); setting it turns the
    cache on."""
    workers: int = 2
    progress: bool = True
    image_column: str = "image"
    caption_column: str = "text"


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


# --- data ----------------------------------------------------------------------------------------------


class CaptionDataset(Dataset):
    """Decoded images with their captions (the image processor runs once per batch, in `make_collate`).
    An image that cannot be decoded is reported with its name and left out of its batch; training goes on.

    Files are decoded as `loracap caption` decodes them, shrunk to the processor's input side while
    decoding, so the captioner trains on the pixels it will later caption from."""

    def __init__(self, examples: list[Example], image_processor: Any) -> None:
        from loracap.backends.prefix_captioner import input_side

        self.examples = examples
        self.min_side = input_side(image_processor) or None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from loracap.inputs import ImageDecodeError

        example = self.examples[index]
        try:
            image = example.image(min_side=self.min_side)
        except ImageDecodeError as exc:
            print(f"loracap: skipping {example.key}: {exc.reason}", file=sys.stderr)
            return None
        return {"image": image, "caption": example.caption}


class FeatureDataset(Dataset):
    """Cached vision features with their captions (`cache_features`): what the tower would make of
    CaptionDataset's images, read from the cache. An example without an entry (its image was unreadable,
    reported while the cache was filled) is None and left out of its batch, as CaptionDataset leaves it
    out, so batches hold the same examples with the cache as without it."""

    def __init__(self, examples: list[Example], entries: list[Path | None]) -> None:
        self.examples, self.entries = examples, entries

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from loracap.train.features import read_entry

        example, entry = self.examples[index], self.entries[index]
        if entry is None:
            return None
        features = read_entry(entry)
        if features is None:  # checked when the cache was filled: something changed it since
            print(
                f"loracap: skipping {example.key}: its cached features {entry} are unreadable",
                file=sys.stderr,
            )
            return None
        return {"features": features, "caption": example.caption}


class EpochSampler(Sampler[int]):
    """A fresh seeded order every epoch: epoch e always visits the same order, so a resumed run sees
    the batches the interrupted one would have seen."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def make_collate(tokenizer: Any, image_processor: Any, prompt: str, max_caption_tokens: int) -> Collate:
    return Collate(tokenizer, image_processor, prompt, max_caption_tokens)


@dataclass
class Collate:
    """Dataset items -> a training batch; None when every image of the batch was unreadable.

    A class, not a closure: DataLoader workers started with "spawn" (macOS, Windows) receive it pickled."""

    tokenizer: Any
    image_processor: Any
    prompt: str
    max_caption_tokens: int

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [item for item in items if item is not None]
        if not items:
            return None
        captions = [item["caption"] for item in items]
        batch = encode_captions(
            self.tokenizer, captions, prompt=self.prompt, max_caption_tokens=self.max_caption_tokens
        )
        if "features" in items[0]:  # FeatureDataset: the tower already ran on these images
            batch["vision_features"] = torch.stack([item["features"] for item in items])
        else:
            # One processor call per batch (in the loader's worker) rather than one per image.
            images = [item["image"] for item in items]
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        batch["captions"] = captions
        return batch


# --- model ---------------------------------------------------------------------------------------------


def _load_parts(
    settings: TrainSettings, init_dir: Path | None, caption_format: str
) -> tuple[PrefixCaptioner, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer

    if init_dir is not None:
        from loracap.prefix.io import load_captioner

        loaded = load_captioner(init_dir)
        return loaded.model, loaded.image_processor, loaded.tokenizer
    vision_dir, lm_dir = resolve_model(settings.vision), resolve_model(settings.lm)
    model = build_captioner(
        vision_dir,
        lm_dir,
        projector=settings.projector,
        pixel_shuffle=settings.pixel_shuffle,
        prompt=settings.prompt,
        max_caption_tokens=settings.max_caption_tokens,
        caption_format=caption_format,
        vision_id=settings.vision,  # the names asked for (hub ids), not the cache folders they resolved to
        lm_id=settings.lm,
    )
    return model, AutoImageProcessor.from_pretrained(vision_dir), AutoTokenizer.from_pretrained(lm_dir)


def prepare_trainable(model: PrefixCaptioner, settings: TrainSettings) -> list[dict[str, Any]]:
    """Freeze the towers, wrap the LM in LoRA, open the top vision layers; the optimizer's param groups."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, lora)
    groups = [
        {"params": list(model.projector.parameters()), "lr": settings.lr_projector, "name": "projector"},
        {
            "params": [p for p in model.language_model.parameters() if p.requires_grad],
            "lr": settings.lr_lora,
            "name": "lora",
        },
    ]
    layers = _vision_layers(model)
    if settings.unfreeze_vision_layers:
        opened = layers[-settings.unfreeze_vision_layers :]
        for layer in opened:
            layer.requires_grad_(True)
        groups.append(
            {
                "params": [p for layer in opened for p in layer.parameters()],
                "lr": settings.lr_vision,
                "name": "vision",
            }
        )
    return groups


def _vision_layers(model: PrefixCaptioner) -> list[torch.nn.Module]:
    encoder = getattr(model.vision_tower, "encoder", None)
    return list(getattr(encoder, "layers", []) or getattr(encoder, "layer", []))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- the loop ------------------------------------------------------------------------------------------


def train(settings: TrainSettings) -> TrainResult:
    """Train, validate, checkpoint and save; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(settings.out)
    started = time.perf_counter()
    caching = settings.cache_features or settings.feature_cache_dir is not None
    if caching and settings.unfreeze_vision_layers:
        raise ValueError(
            f"--cache-features needs a frozen vision tower, but --unfreeze-vision-layers "
            f"{settings.unfreeze_vision_layers} trains its top layers: their features change at every step, "
            "so cached ones would be stale. Leave out one of the two options."
        )
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
    model, image_processor, tokenizer = _load_parts(settings, init_dir, caption_format)
    if settings.init_from and settings.prompt != model.config.prompt and settings.prompt:
        raise ValueError(f"--prompt differs from the captioner's own ({model.config.prompt!r}); leave it out")
    prompt, max_tokens = model.config.prompt, model.config.max_caption_tokens
    groups = prepare_trainable(model, settings)
    alignment = None
    if settings.clip_loss_weight > 0:
        from loracap.train.alignment import ClipAlignment

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
    accelerator.init_trackers("loracap-train", config=_flat(settings))

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
        state = _resume(accelerator, out, state)

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
                        scored = _main_caption_metrics(
                            accelerator, model, val_set, image_processor, tokenizer
                        )
                        record.update(scored)
                    accelerator.log(
                        {f"val/{k}": v for k, v in record.items() if k != "step"}, step=state["step"]
                    )
                    state["history"].append(record)
                    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                        state.update(best_val_loss=val_loss, best_step=state["step"], bad_evals=0)
                        if accelerator.is_main_process:  # on disk, so a resumed run has it too
                            _save_weights(out / BEST_FILE, _trainable_state(accelerator.unwrap_model(model)))
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
            final.load_state_dict(_load_weights(out / BEST_FILE), strict=False)
        # Saved in place, no copy: save_captioner merges the LoRA adapters into the LM and .float() casts,
        # which would matter only if the model were used again; it is not (the test split is captioned
        # from the saved folder).
        save_captioner(final.float(), image_processor, tokenizer, out)
        _write_state(out, state)
        test_set = [by_key[k] for k in splits["test"] if k in by_key]
        if settings.test_metrics and test_set:
            from loracap.train.metrics import evaluate_examples

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
    from loracap.train.features import fill_cache, find_entries, open_cache

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
    print(
        f"loracap: vision features: {filled.reused} reused, {filled.computed} computed{left_out} "
        f"(cache {cache.folder})",
        file=sys.stderr,
    )
    accelerator.wait_for_everyone()
    return filled.entries


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: Iterable[dict[str, Any] | None], accelerator: Any) -> float:
    """Mean token loss over the validation set (weighted by predicted tokens).

    With several processes each one scores its share of the set; the sums are added up across them, so
    every process gets the same number and takes the same early-stopping and best-step decisions."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        if batch is None:
            continue
        batch = dict(batch)
        batch.pop("captions")
        n = int((batch["labels"] != -100).sum())
        total += model(**batch).loss.item() * n
        tokens += n
    # Alone, a process keeps its sums as they are (and needs no float64 tensor, which MPS lacks).
    if accelerator.num_processes > 1:
        sums = torch.tensor([total, tokens], dtype=torch.float64, device=accelerator.device)
        total, tokens = accelerator.reduce(sums, "sum").tolist()
    return total / max(tokens, 1)


def _main_caption_metrics(
    accelerator: Any, model: torch.nn.Module, examples: list[Example], image_processor: Any, tokenizer: Any
) -> dict[str, float]:
    """`val_caption_metrics` on the main process alone (the whole validation set), for the log: no decision
    depends on them, only on the loss, which every process shares. The others get {}."""
    metrics = {}
    if accelerator.is_main_process:
        metrics = val_caption_metrics(accelerator.unwrap_model(model), examples, image_processor, tokenizer)
    # The others wait here instead of running ahead into the next step's collectives, or into the end of
    # training, while the main process captions (a process group torn down out of step can hang).
    accelerator.wait_for_everyone()
    return metrics


def val_caption_metrics(
    model: PrefixCaptioner,
    examples: list[Example],
    image_processor: Any,
    tokenizer: Any,
    batch_size: int = 32,
) -> dict[str, float]:
    """BLEU-4 / ROUGE-L / CIDEr of greedy captions of `examples`, made by the backend `loracap caption`
    uses, around the model in training as it is (its device, its dtype)."""
    from loracap.backends.device import Placement
    from loracap.backends.prefix_captioner import PrefixCaptionerBackend
    from loracap.train.metrics import caption_metrics, generate_for

    model.eval()
    weight = next(model.projector.parameters())
    placement = Placement(weight.device, weight.dtype)
    backend = PrefixCaptionerBackend.from_parts(model, image_processor, tokenizer, placement)
    generated = generate_for(backend, examples, batch_size=batch_size)
    decoded = [e for e in examples if e.key in generated.captions]  # the others were reported while training
    if not decoded:
        return {}
    return caption_metrics(generated.captions, {e.key: [e.caption] for e in decoded})


def _save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(path)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # No clone: the tensors are written to disk at once.
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items() if k in names}


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


def _checkpoint(accelerator: Any, out: Path, state: dict[str, Any], keep: int) -> None:
    folder = out / "checkpoints" / f"step-{state['step']}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        _write_state(folder, state)
        old = _checkpoints(out)
        for stale in old[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)


def _checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step-N folders, lowest N first (by number: as text step-1000 sorts before step-200)."""
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _resume(accelerator: Any, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    checkpoints = _checkpoints(out)
    if not checkpoints:
        print(f"loracap: no checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
        return state
    latest = checkpoints[-1]
    accelerator.load_state(str(latest))
    saved = json.loads((latest / STATE_FILE).read_text(encoding="utf-8"))
    print(f"loracap: resuming from {latest} (step {saved['step']})", file=sys.stderr)
    return {**state, **saved}


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def _flat(settings: TrainSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if isinstance(v, int | float | str | bool)}


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
