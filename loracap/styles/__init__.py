"""Caption styles: what to write, as data.

A style is one TOML file (the shipped ones sit next to this module; users copy one, edit it and pass
its path). It says, for every kind of backend, how to ask for that kind of caption:

* `florence_task`: the Florence-2 mode (task token) that writes it, or none when Florence cannot;
* `prompt`: an instruction for chat vision-language models (JoyCaption, Qwen2-VL, SmolVLM), with a
  `{length}` slot that `--length` fills from the style's `[lengths]` table or with "about N words";
* `tags`: whether the output is a comma-separated tag list, so the caller picks tag post-processing.

Extras (`--extra`) are sentences appended to the instruction, JoyCaption style: a key from the shipped
table (`extra_names()`) or free text. Prompts and extras may use the placeholders in `PLACEHOLDERS`.

Nothing here imports torch or reads a model: the CLI validates a style before it loads anything.
"""

from __future__ import annotations

import functools
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FLORENCE_TASKS",
    "LENGTH_NAMES",
    "PLACEHOLDERS",
    "Style",
    "extra_names",
    "list_styles",
    "load_style",
    "parse_length",
    "render_prompt",
    "used_placeholders",
    "user_prompt_style",
]

STYLES_DIR = Path(__file__).parent
# Files starting with "_" hold shared data (the extras), not styles.
EXTRAS_FILE = STYLES_DIR / "_extras.toml"

# The Florence-2 modes (keys of backends.florence2_tasks.MODE_TASK_TOKENS, repeated here because styles sit
# below the backends; a test keeps the two in step).
FLORENCE_TASKS = ("tags", "caption", "detailed", "more_detailed", "mixed", "mixed_plus", "analyze")

PLACEHOLDERS = ("trigger", "name", "tags", "folder", "length")
# Placeholders whose value belongs to one image rather than the whole run: a prompt that uses one has to
# be rendered per image.
PER_IMAGE_PLACEHOLDERS = frozenset({"tags", "folder"})

LENGTH_NAMES = ("short", "medium", "long")
DEFAULT_LENGTH = "medium"
# Every style understands short / medium / long: a style file may leave out [lengths] or some of its
# keys and gets these. The phrase completes "It should be {length}.", so it has to read well both as an
# adjective ("short (...)") and in the form word counts take ("about 40 words").
DEFAULT_PROSE_LENGTHS = {
    "short": "short (one or two sentences)",
    "medium": "medium-length (one paragraph)",
    "long": "long (two or three paragraphs)",
}
DEFAULT_TAG_LENGTHS = {
    "short": "short (about 10 tags)",
    "medium": "medium-length (about 25 tags)",
    "long": "long (about 50 tags)",
}

_WORD_COUNT = re.compile(r"(\d+)[-_ ]?words?")
_MAX_WORDS = 1000  # beyond this no captioner's context (or a trainer's text encoder) is of any use
_EXTRA_KEY = re.compile(r"[a-z0-9_-]+")
_STYLE_KEYS = {"name", "description", "tags", "florence_task", "prompt", "lengths", "default_length"}


@dataclass(frozen=True)
class Style:
    """One caption style. Build it with `load_style` / `user_prompt_style`, which validate it."""

    name: str
    description: str
    tags: bool
    """The output is a comma-separated tag list (tag post-processing applies)."""
    florence_task: str | None
    """The Florence-2 mode that writes this style; None when Florence-2 cannot."""
    prompt: str | None
    """Instruction template for instruction-following models; None for a Florence-only style."""
    lengths: dict[str, str]
    """Length name -> the phrase that fills {length}; always has short, medium and long."""
    default_length: str | None
    """The length used without --length; None when the prompt has no {length} slot."""
    source: Path | None
    """The TOML file or prompt file it came from; None for a prompt given as text (--prompt)."""


# --- loading ------------------------------------------------------------------------------------------


def list_styles() -> list[Style]:
    """The shipped styles, sorted by name."""
    return sorted((_load_file(path) for path in _shipped_files().values()), key=lambda s: s.name)


def load_style(name_or_path: str | Path) -> Style:
    """A shipped style by name ("booru-tags"; "_" and "-" are interchangeable), or a user's TOML file."""
    shipped = _shipped_files()
    key = _name_key(str(name_or_path))
    if key in shipped:
        return _load_file(shipped[key])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.suffix == ".toml" or len(path.parts) > 1:
        # It was clearly meant as a path: say that the file is missing, not that the name is unknown.
        raise ValueError(f"style file {str(path)!r} does not exist")
    raise ValueError(
        f"unknown caption style {str(name_or_path)!r}; shipped styles: {', '.join(sorted(shipped))} "
        f"(or pass the path of a .toml style file)"
    )


def user_prompt_style(
    prompt: str | None = None, prompt_file: str | Path | None = None, *, tags: bool = False
) -> Style:
    """A style from the user's own instruction (--prompt TEXT or --prompt-file FILE).

    The text may use the placeholders (e.g. "Describe {name}'s outfit. It should be {length}.");
    `tags=True` says the model is asked for a tag list, so tag post-processing applies.
    """
    if (prompt is None) == (prompt_file is None):
        raise ValueError("give either a prompt or a prompt file, not both or neither")
    source = None
    if prompt_file is not None:
        source = Path(prompt_file).expanduser()
        if source.suffix == ".toml":
            # A TOML style file read as a prompt would send its field names to the model.
            raise ValueError(f"{source} is a style file: pass it as the style, not as a prompt file")
        try:
            prompt = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read prompt file {source}: {exc.strerror or exc}") from exc
    text = (prompt or "").strip()
    where = str(source) if source else "--prompt"
    if not text:
        raise ValueError(f"the prompt from {where} is empty")
    _check_template(text, where)
    lengths = dict(DEFAULT_TAG_LENGTHS if tags else DEFAULT_PROSE_LENGTHS)
    return Style(
        name=source.stem if source else "custom",
        description=f"your own prompt from {where}",
        tags=tags,
        florence_task=None,
        prompt=text,
        lengths=lengths,
        default_length=DEFAULT_LENGTH if "length" in _fields(text) else None,
        source=source,
    )


def extra_names() -> dict[str, str]:
    """The named extras (--extra KEY) and the sentence each adds to the instruction."""
    return dict(_shipped_extras())


@functools.cache
def _shipped_extras() -> dict[str, str]:
    # Cached: render_prompt runs once per image when a prompt uses {tags} or {folder}.
    data = _read_toml(EXTRAS_FILE)
    extras = data.get("extras")
    if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
        raise ValueError(f'{EXTRAS_FILE}: expected an [extras] table of key = "sentence"')
    for key, text in extras.items():
        _check_template(text, f"{EXTRAS_FILE} extra {key!r}")
    return extras


def _shipped_files() -> dict[str, Path]:
    return {_name_key(path.stem): path for path in STYLES_DIR.glob("*.toml") if not path.name.startswith("_")}


def _name_key(name: str) -> str:
    # Florence modes are spelled with "_" (more_detailed), the other styles with "-" (sd-prompt); users
    # should not have to remember which.
    return name.strip().lower().replace("_", "-")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"style file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read style file {path}: {exc.strerror or exc}") from exc


def _load_file(path: Path) -> Style:
    data = _read_toml(path)
    where = str(path)
    unknown = sorted(set(data) - _STYLE_KEYS)
    if unknown:
        # Most likely a typo (florence-task, length = ...): silently ignoring it would hide the mistake.
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_STYLE_KEYS))}"
        )

    def text(key: str, default: str = "") -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be a string, got {value!r}")
        return value.strip()

    tags = data.get("tags", False)
    if not isinstance(tags, bool):
        raise ValueError(f"{where}: tags must be true or false, got {tags!r}")

    florence_task = text("florence_task") or None
    if florence_task is not None and florence_task not in FLORENCE_TASKS:
        raise ValueError(
            f"{where}: florence_task {florence_task!r} is not a Florence-2 mode; use one of "
            f'{", ".join(FLORENCE_TASKS)}, or "" when Florence-2 cannot write this style'
        )

    # TOML has no null: a Florence-only style leaves prompt out or sets it to "".
    prompt = text("prompt") or None
    if prompt is not None:
        _check_template(prompt, where)
    if prompt is None and florence_task is None:
        raise ValueError(f"{where}: a style needs a prompt, a florence_task, or both")

    lengths = dict(DEFAULT_TAG_LENGTHS if tags else DEFAULT_PROSE_LENGTHS)
    table = data.get("lengths", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) and v.strip() for v in table.values()):
        raise ValueError(f"{where}: [lengths] must map length names to non-empty text, e.g. short = 'short'")
    lengths.update({_name_key(k): v.strip() for k, v in table.items()})

    default_length: str | None = None
    if prompt is not None and "length" in _fields(prompt):
        default_length = _name_key(text("default_length", DEFAULT_LENGTH))
        if default_length not in lengths:
            _length_phrase(default_length, lengths, f"{where}: default_length")  # raises unless "N-words"

    return Style(
        name=text("name") or path.stem,
        description=text("description"),
        tags=tags,
        florence_task=florence_task,
        prompt=prompt,
        lengths=lengths,
        default_length=default_length,
        source=path,
    )


# --- rendering ----------------------------------------------------------------------------------------


def parse_length(spec: str) -> str:
    """Check a --length value: a length name stays as it is ("short"), a word count becomes the phrase
    that fills {length} ("40-words" -> "about 40 words"). Anything else is a ValueError with examples."""
    key = _name_key(spec)
    if key in LENGTH_NAMES:
        return key
    match = _WORD_COUNT.fullmatch(key)
    if match:
        words = int(match.group(1))
        if 1 <= words <= _MAX_WORDS:
            return f"about {words} word{'' if words == 1 else 's'}"
    raise ValueError(
        f"bad length {spec!r}: expected {', '.join(LENGTH_NAMES)} or a word count such as 40-words "
        f"(1 to {_MAX_WORDS} words)"
    )


def render_prompt(
    style: Style,
    *,
    length: str | None = None,
    extras: Sequence[str] = (),
    trigger: str | None = None,
    name: str | None = None,
    tags: str | None = None,
    folder: str | None = None,
) -> str:
    """The instruction an instruction-following model gets for one image.

    `length`: a name from the style's [lengths] or "N-words" (default: the style's default length).
    `extras`: keys of `extra_names()` or free-text sentences, appended in order.
    `tags`: the image's existing caption or tag file; `folder`: the name of the image's folder.
    A placeholder with no value renders as empty text; an extra that needs a value the image does not
    have is left out entirely, because "Use these tags as hints: ." only confuses a model.
    ValueError for a style without a prompt, a bad length, or an unknown extra or placeholder.
    """
    if style.prompt is None:
        task = f" (Florence-2 mode {style.florence_task!r})" if style.florence_task else ""
        raise ValueError(
            f"caption style {style.name!r} has no prompt for instruction-following models; only Florence-2 "
            f"can write it{task}. Pick another style or give your own prompt."
        )
    values = {
        "trigger": _clean(trigger),
        "name": _clean(name),
        "tags": _clean(tags),
        "folder": _clean(folder),
    }
    extra_texts = _resolve_extras(extras)
    # Length is resolved even when only an extra uses it, and refused when nothing does: a --length that
    # silently changes nothing would look like a model that ignores it.
    uses_length = any("length" in _fields(t) for t in (style.prompt, *extra_texts))
    if length is not None and not uses_length:
        raise ValueError(
            f"caption style {style.name!r} has no {{length}} slot in its prompt, so a length cannot be "
            f"applied; add {{length}} to the prompt (e.g. 'It should be {{length}}.') or leave out --length"
        )
    if uses_length:
        spec = length if length is not None else (style.default_length or DEFAULT_LENGTH)
        values["length"] = _length_phrase(spec, style.lengths, f"caption style {style.name!r}")
    else:
        values["length"] = ""

    parts = [style.prompt.format_map(values).strip()]
    for text in extra_texts:
        if any(not values[field] for field in _fields(text) if field != "length"):
            continue
        parts.append(text.format_map(values).strip())
    return " ".join(part for part in parts if part)


def used_placeholders(style: Style, extras: Sequence[str] = ()) -> frozenset[str]:
    """The placeholders the style's prompt and these extras use, so a caller can tell whether one
    prompt serves the whole run or each image needs its own (see PER_IMAGE_PLACEHOLDERS), and warn
    when e.g. {name} is used but no name was given."""
    texts = _resolve_extras(extras)
    if style.prompt is not None:
        texts.append(style.prompt)
    return frozenset(field for text in texts for field in _fields(text))


def _length_phrase(spec: str, lengths: Mapping[str, str], where: str) -> str:
    key = _name_key(spec)
    if key in lengths:
        return lengths[key]
    try:
        return parse_length(spec)
    except ValueError:
        named = ", ".join(lengths)
        raise ValueError(
            f"{where}: bad length {spec!r}: expected one of {named}, or a word count such as 40-words"
        ) from None


def _resolve_extras(extras: Iterable[str]) -> list[str]:
    if isinstance(extras, str):  # a bare string would otherwise be read letter by letter
        extras = [extras]
    named: dict[str, str] | None = None
    texts = []
    for extra in extras:
        extra = extra.strip()
        if not extra:
            continue
        key = _name_key(extra)
        if _EXTRA_KEY.fullmatch(key):
            # One word is read as a key: a typo ("lightng") must fail, not end up in the prompt as text.
            named = named if named is not None else {_name_key(k): v for k, v in extra_names().items()}
            if key not in named:
                raise ValueError(
                    f"unknown extra {extra!r}; named extras: {', '.join(sorted(named))} "
                    f"(or write a whole sentence as free text)"
                )
            texts.append(named[key])
        else:
            _check_template(extra, f"extra {extra!r}")
            texts.append(extra)
    return texts


def _clean(value: str | None) -> str:
    # Captions on disk may span lines; inside a one-paragraph instruction a newline reads as a break.
    return " ".join((value or "").split())


def _fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _check_template(template: str, where: str) -> None:
    """Every {placeholder} must be one we fill; literal braces are written {{ and }}."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string" and the like
        raise ValueError(f"{where}: {exc}; write {{{{ and }}}} for literal braces") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            shown += "}"
            raise ValueError(
                f"{where}: unknown placeholder {shown}; known: "
                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ and }}}} for literal braces)"
            )
