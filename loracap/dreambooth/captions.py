"""The dataset's captions as DreamBooth trains on them: read, trigger applied, checked, varied per step.

    read_instances      every readable image with its caption (any layout `loracap report` reads),
                        images without one taking --instance-prompt, the trigger rule applied
    dataset_warnings    the `loracap report` checks that matter before training: missing captions,
                        captions longer than the base's text window, a trigger fused with its neighbours
    training_caption    what one step sees: one of the caption's lines, caption dropout, tag shuffling
                        after --keep-tokens

A caption of several lines holds alternatives (`loracap caption --captions-per-image`): each step draws one
line, as OneTrainer draws one per epoch and sd-scripts with --enable_wildcard one per step; the trigger
rule and the checks apply to each line on its own.

The trigger rule is ai-toolkit's as loracap's captioner already writes it (`loracap.postprocess`):
"[trigger]" becomes the trigger, and a caption that does not name it gets it first ("ohwx, a woman ..."),
a tag caption as its first tag. Captions `loracap caption --trigger` wrote pass through unchanged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracap.dataset import caption_lines, read_dataset
from loracap.inputs import ImageDecodeError, load_image, read_size
from loracap.postprocess import PostProcess, looks_like_tags, postprocess, split_tags
from loracap.quality.text import audit_trigger, token_lengths

log = logging.getLogger(__name__)

__all__ = [
    "TRIGGER_PLACEHOLDER",
    "Instance",
    "Instances",
    "alternatives",
    "apply_trigger",
    "dataset_warnings",
    "read_instances",
    "training_caption",
]

TRIGGER_PLACEHOLDER = "[trigger]"
_EXAMPLES = 3  # file names quoted in a warning


@dataclass(frozen=True)
class Instance:
    """One training image of the subject and the caption it trains with (trigger applied)."""

    image: Path
    caption: str
    """Its caption, trigger applied; alternatives a line each (a step trains with one of them)."""
    name: str
    """How messages name it: the path relative to the dataset folder."""
    size: tuple[int, int] = (0, 0)
    """(width, height) as displayed (EXIF rotation applied): what its bucket is chosen from."""


@dataclass
class Instances:
    items: list[Instance]
    tags: bool
    """The captions are tag lists (shuffling applies to them only)."""
    without_caption: list[str] = field(default_factory=list)
    """Images that had no caption and train with the instance prompt."""
    unreadable: list[str] = field(default_factory=list)
    """Images that could not be decoded: listed and left out."""
    caption_problems: list[str] = field(default_factory=list)
    """Caption files or entries that could not be read (their images are left out)."""


def apply_trigger(caption: str, trigger: str | None, *, tags: bool) -> str:
    """The caption with "[trigger]" replaced by `trigger`, which goes first where the caption does not name
    it (see the module docstring). Without a trigger the caption is returned as it is."""
    if not trigger:
        return caption
    # Only the trigger rule of loracap's clean-up: boilerplate stripping would rewrite the user's prose.
    rule = PostProcess(trigger=trigger, strip_boilerplate=False)
    # Each line of several is a caption of its own (clean-up would join lines into one).
    lines = alternatives(caption)
    return "\n".join(
        postprocess(line.replace(TRIGGER_PLACEHOLDER, trigger), rule, tags=tags) for line in lines
    )


def read_instances(
    data: str | Path,
    *,
    trigger: str | None,
    instance_prompt: str | None,
    layout: str = "auto",
    caption_ext: str = ".txt",
    metadata_file: str | None = None,
    check_side: int | None = 64,
    progress: bool = False,
) -> Instances:
    """The dataset under `data` as training instances. Raises ValueError when nothing is left to train on,
    when images lack captions and there is neither an instance prompt nor a trigger to train them with,
    and when captions say "[trigger]" but no trigger is given.

    `check_side`: every image is decoded (shrunk to about this side, which is quick for JPEG) so an
    unreadable one is listed now and left out, instead of failing a batch mid-run; None reads the headers
    only (each image's size is read either way)."""
    dataset = read_dataset(data, layout=layout, ext=caption_ext, metadata_file=metadata_file)
    root = dataset.root
    placeholder = [r for r in dataset.records if TRIGGER_PLACEHOLDER in r.text]
    if placeholder and not trigger:
        raise ValueError(
            f"{len(placeholder)} captions say {TRIGGER_PLACEHOLDER} (e.g. {placeholder[0].key}) but no "
            "--trigger was given to put in its place"
        )
    if dataset.missing and instance_prompt is None and not trigger:
        raise ValueError(
            f"{len(dataset.missing)} of {dataset.image_count} images have no caption (e.g. "
            f"{_name(dataset.missing[0], root)}): give --instance-prompt (or --trigger) to train them with"
        )
    tags = looks_like_tags(line for r in dataset.records for line in r.lines)
    pairs = [(r.image, r.text) for r in dataset.records]
    pairs += [(image, instance_prompt or "") for image in dataset.missing]
    pairs.sort(key=lambda pair: str(pair[0]))  # find_images order, whatever had a caption
    unreadable: list[str] = []
    items: list[Instance] = []
    for image, text in _bar(pairs, progress):
        name = _name(image, root)
        try:
            size = read_size(image)
            if check_side is not None:
                load_image(image, max_side=check_side)
        except ImageDecodeError as exc:
            unreadable.append(f"{name} ({exc.reason})")
            continue
        items.append(Instance(image, apply_trigger(text, trigger, tags=tags), name, size))
    result = Instances(
        items=items,
        tags=tags,
        without_caption=[_name(p, root) for p in dataset.missing],
        unreadable=unreadable,
        caption_problems=[f"{p.path} ({p.reason})" for p in dataset.problems],
    )
    if not items:
        raise ValueError(f"{data} has no readable images to train on ({dataset.image_count} found)")
    return result


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _bar(pairs: list[Any], progress: bool) -> Any:
    if not progress or len(pairs) < 200:  # a few dozen images check in a blink
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="checking images", unit="img")


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _examples(names: Sequence[str]) -> str:
    more = f", and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else ""
    return ", ".join(names[:_EXAMPLES]) + more


def dataset_warnings(
    instances: Instances, tokenizer: Any, *, trigger: str | None, prompt: str | None
) -> list[str]:
    """The checks of `loracap report` that matter before training, one line each (empty: all clear).

    `tokenizer`: the base's (first) CLIP tokenizer, whose window (77 tokens) decides what is cut off."""
    warnings: list[str] = []
    if instances.without_caption:
        fallback = repr(apply_trigger(prompt or "", trigger, tags=instances.tags))
        warnings.append(
            f"no caption for {_count(len(instances.without_caption), 'image', 'images')}, trained with the "
            f"instance prompt {fallback}: {_examples(instances.without_caption)}"
        )
    captions = [item.caption for item in instances.items]
    lengths = token_lengths(captions, tokenizer)
    if lengths.truncated:
        names = [f"{instances.items[i].name} ({lengths.counts[i]})" for i in lengths.truncated]
        warnings.append(
            f"{_count(len(names), 'caption is', 'captions are')} longer than the text encoder's "
            f"{lengths.max_length} tokens and lose their ends in training: {_examples(names)}"
        )
    if trigger:
        audit = audit_trigger(captions, tokenizer, trigger, tags=instances.tags)
        fused = sorted(set(audit.fused) | set(audit.glued))
        if fused:
            names = [instances.items[i].name for i in fused]
            warnings.append(
                f"{_count(len(names), 'caption has', 'captions have')} the trigger {trigger!r} glued to "
                f"other text, so it trains as other tokens than a prompt's: {_examples(names)}"
            )
    return warnings


def alternatives(caption: str) -> list[str]:
    """The captions a step may train with: the non-blank lines of a caption of several, else the caption
    as it is (a one-line caption is not touched, so it stays the text the text cache holds)."""
    return caption_lines(caption) if "\n" in caption else [caption]


def training_caption(
    caption: str, rng: random.Random, *, tags: bool, dropout: float, shuffle: bool, keep_tokens: int
) -> str:
    """The caption one step trains with: "" with probability `dropout` (the image trains unconditioned,
    which keeps the LoRA usable without its exact caption), else one of its lines drawn at random when it
    has several (alternatives), and for tag captions with `shuffle` its tags after the first `keep_tokens`
    in a random order (kohya's --shuffle_caption / --keep_tokens), so no tag position is learnt as part of
    the subject. `rng` is the item's own, so a resumed run draws the same."""
    # Both draws are always made: how many numbers an item takes must not depend on its caption. The line
    # and the tag order come from the second, so a one-line caption shuffles as it always did.
    drop = rng.random() < dropout
    order = random.Random(rng.getrandbits(32))
    if drop:
        return ""
    if "\n" in caption:
        lines = alternatives(caption)
        caption = lines[order.randrange(len(lines))] if lines else ""
    if not (tags and shuffle):
        return caption
    parts = split_tags(caption)
    head, tail = parts[:keep_tokens], parts[keep_tokens:]
    order.shuffle(tail)
    return ", ".join(head + tail)
