"""What to ask a loaded model for: a caption style, resolved against what that model can do.

One surface for every backend (`--style`, `--mode` being its old name):

* a chat model (`backend.instructions`: JoyCaption, Qwen2-VL, SmolVLM, a remote server) gets the style's
  prompt rendered into an instruction, with `--length`, `--extra` and the placeholders filled in; a
  prompt that uses `{tags}` or `{folder}` is rendered for each image;
* a model with fixed modes (Florence-2, BLIP, ViT-GPT2, PaliGemma) gets the style's `florence_task` as
  its mode, and a style it cannot write is a clear error naming the styles it can.

`--prompt` / `--prompt-file` is the user's own instruction for a chat model, and the raw task prompt for
the others (a Florence-2 task token, a BLIP prefix), as it was before styles existed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .backends.base import ANY_MODE, Backend, BackendError, accepts
from .files import read_regular_bytes
from .styles import (
    PER_IMAGE_PLACEHOLDERS,
    Style,
    list_styles,
    load_style,
    render_prompt,
    used_placeholders,
    user_prompt_style,
)

log = logging.getLogger(__name__)

__all__ = ["CaptionRequest", "StyleChoice", "resolve_request"]


@dataclass(frozen=True)
class StyleChoice:
    """What the user asked for, before any model is loaded. `check()` validates it without a model."""

    style: str | Path | Style = "caption"
    length: str | None = None
    extras: Sequence[str] = ()
    """Stored as a tuple; one extra may be given as a bare string."""
    name: str | None = None
    """Fills {name}, e.g. the person a LoRA is trained on ("refer to the person as {name}")."""
    prompt: str | None = None
    prompt_file: str | Path | None = None
    tags_ext: str | None = None
    """Read {tags} from the image's `<stem><tags_ext>` file (default: its existing caption)."""
    tagger: str | None = None
    """Fill {tags} with what this WD tagger (a folder, hub id or short name) finds in each image, tagged in a
    pass before the chat model's; a prompt without {tags} gets the `existing-tags` extra."""

    def __post_init__(self) -> None:
        # A bare string is one extra, not a sequence of one-letter extras; a tuple keeps the choice hashable.
        extras = (self.extras,) if isinstance(self.extras, str) else tuple(self.extras)
        object.__setattr__(self, "extras", extras)  # frozen: the dataclass way to set a field once

    def load(self) -> Style:
        return self.style if isinstance(self.style, Style) else load_style(self.style)

    def user_style(self, tags: bool) -> Style | None:
        """The user's own --prompt / --prompt-file as a style, or None when there is none."""
        if self.prompt is None and self.prompt_file is None:
            return None
        return user_prompt_style(self.prompt, self.prompt_file, tags=tags)

    def check(self) -> Style:
        """Fail early (ValueError) on an unknown style, a bad length or extra, an unreadable prompt file."""
        return self._checked.style

    @property
    def own_prompt(self) -> Style | None:
        """The user's --prompt / --prompt-file as a checked style (tag-ness from the style), or None."""
        return self._checked.own_prompt

    @functools.cached_property
    def _checked(self) -> _Checked:
        # Once per choice: callers check before loading a model and resolve after, and each time would
        # parse the style's TOML and read the prompt file again. (cached_property writes the instance's
        # __dict__ directly, so it works on a frozen dataclass; a failure is not cached.)
        style = self.load()
        if self.tagger and self.tags_ext:
            raise ValueError("--tagger and --tags-from both fill {tags}: give one of them")
        own_prompt = self.user_style(style.tags)
        chat_style = own_prompt or style
        if chat_style.prompt is not None:
            # Render once with sample values: every length, extra and placeholder problem shows now,
            # not after minutes of model loading.
            render_prompt(chat_style, length=self.length, extras=self.extras, name="x", tags="x", folder="x")
        return _Checked(style, own_prompt)


@dataclass(frozen=True)
class _Checked:
    style: Style
    own_prompt: Style | None


@dataclass(frozen=True)
class CaptionRequest:
    """A style resolved for one backend: the mode and prompt(s) its `prepare` gets."""

    style: Style
    mode: str
    tags: bool
    """The output is a tag list (tag clean-up applies)."""
    prompt: str | None
    """The prompt for every image; None with per_image (or for a fixed-mode model's default task)."""
    per_image: bool = False
    choice: StyleChoice = StyleChoice()
    trigger: str | None = None
    hints: Mapping[Path, str] | None = None
    """{tags} by image, from the `--tagger` pass; an image missing here gets none."""

    def prompt_for(self, image: Path | None = None, existing: str | None = None) -> str | None:
        """The prompt for one image; `existing` is its current caption (the default source of {tags})."""
        if not self.per_image:
            return self.prompt
        tags = existing
        if self.hints is not None:
            tags = self.hints.get(image) if image is not None else None
        elif self.choice.tags_ext and image is not None:
            tags = _read_text(image.with_suffix(self.choice.tags_ext))
        return render_prompt(
            self.style,
            length=self.choice.length,
            extras=self.choice.extras,
            trigger=self.trigger,
            name=self.choice.name,
            tags=tags,
            folder=image.parent.name if image is not None else None,
        )


def resolve_request(choice: StyleChoice, backend: Backend, *, trigger: str | None = None) -> CaptionRequest:
    """Turn the user's choice into what `backend` is asked. BackendError where it cannot write the style,
    ValueError for options that do not apply to it."""
    style = choice.check()  # checked once per choice; callers may have checked it already
    if getattr(backend, "instructions", False):
        return _instruction_request(choice, style, backend, trigger)
    return _mode_request(choice, style, backend, trigger)


def _instruction_request(
    choice: StyleChoice, style: Style, backend: Backend, trigger: str | None
) -> CaptionRequest:
    chat_style = choice.own_prompt or style
    if chat_style.prompt is None:
        raise BackendError(
            f"{backend.name} follows instructions, but caption style {style.name!r} has no prompt: only "
            f"Florence-2 writes it (mode {style.florence_task!r}). Pick another style or give --prompt."
        )
    fields = used_placeholders(chat_style, choice.extras)
    if choice.tagger and "tags" not in fields:
        # The tagger's tags are what the user asked for: without a {tags} slot they would go nowhere.
        log.info("--tagger: the prompt has no {tags}, so the existing-tags extra adds the tags as hints")
        choice = replace(choice, extras=(*choice.extras, "existing-tags"))
        fields = used_placeholders(chat_style, choice.extras)
    for field, value, flag in (("name", choice.name, "--name"), ("trigger", trigger, "--trigger")):
        if field in fields and not value:
            log.warning("warning: the prompt uses {%s} but no %s was given", field, flag)
    per_image = bool(fields & PER_IMAGE_PLACEHOLDERS)
    prompt = None
    if not per_image:  # one instruction serves the whole run: render it once
        prompt = render_prompt(
            chat_style, length=choice.length, extras=choice.extras, trigger=trigger, name=choice.name
        )
    mode = ANY_MODE if ANY_MODE in backend.modes else backend.modes[0]
    return CaptionRequest(chat_style, mode, chat_style.tags, prompt, per_image, choice, trigger)


def _mode_request(choice: StyleChoice, style: Style, backend: Backend, trigger: str | None) -> CaptionRequest:
    given = [
        flag
        for flag, value in (
            ("--length", choice.length),
            ("--extra", choice.extras),
            ("--name", choice.name),
            ("--tagger", choice.tagger),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"{backend.name} writes fixed caption modes and does not follow instructions, so "
            f"{', '.join(given)} cannot apply; use a chat model (see `loracap models`) or leave them out"
        )
    mode = style.florence_task
    if tuple(backend.modes) == ("tags",) and choice.style == "caption" and mode != "tags":
        # A tagger writes tags only: the default style means "what it writes", not prose it cannot write.
        style, mode = load_style("tags"), "tags"
    if mode is None or not accepts(backend, mode):
        able = [s.name for s in list_styles() if s.florence_task in backend.modes]
        raise BackendError(
            f"{backend.name} cannot write caption style {style.name!r}; it can write: "
            f"{', '.join(able) or 'none of the shipped styles'} (chat models write any style)"
        )
    raw_prompt = choice.prompt
    if choice.prompt_file is not None and choice.own_prompt is not None:  # the file's text, as checked
        raw_prompt = choice.own_prompt.prompt
    return CaptionRequest(style, mode, mode in backend.tag_modes, raw_prompt, False, choice, trigger)


def _read_text(path: Path) -> str | None:
    # Only hints for the prompt, never written back: bad bytes may become U+FFFD. A FIFO is not read.
    try:
        return read_regular_bytes(path).decode("utf-8", errors="replace").strip() or None
    except OSError:
        return None
