"""Turn raw model text into the caption a trainer reads.

Shared by every backend. Two kinds of output exist: prose (a sentence or a paragraph) and tags (a
comma-separated list, as WD14-style taggers and Florence-2 fine-tunes emit). The rules differ, so
every function takes `tags=`; `looks_like_tags` tells which kind a set of captions is.

`postprocess` is idempotent: running it on its own output changes nothing. That matters because
captions are re-processed (a second run with `--overwrite`, a merge with an existing caption), and
a trigger word or prefix must never pile up.

A caption is one line: sd-scripts reads only the first line of a caption file (and OneTrainer picks one
line at random), so lines are joined, tags with ", " and prose with ", " or, after a line that ends in
punctuation, a space.

The trigger rule, the same for a new caption and for a merge with an old one (`merge_captions`):

- tags: the trigger is one tag, first; wherever else it appears (any case, "_" for " ") it is removed.
- prose: the trigger as its own comma-separated item ("ohwx, a man" or "a man, ohwx") is removed. If the
  text then names the trigger as a word ("a photo of ohwx in a park"), that is where it stays: adding it in
  front would say it twice and cutting it out would break the sentence; only its spelling is made exact.
  Otherwise it goes first, as its own item: "ohwx, a man in a park".

The prefix follows the trigger when the trigger goes first; the suffix ends the caption.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# Florence-2 (and other BART-style decoders) leave these in decoded text when special tokens are not
# skipped: sequence markers, padding, location bins and the task token that was the prompt. Task
# tokens are all upper case (<CAPTION>, <MORE_DETAILED_CAPTION>, <OD>), so lower-case angle-bracket
# text a model writes on purpose is left alone.
_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>|</?poly>|<sep>|<loc_\d+>|<[A-Z][A-Z0-9_]*>")

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")
_PUNCTUATION = (".", ",", ";", ":", "!", "?")

# Boilerplate openers, tried at the start of prose, case-insensitively, until none matches (so
# "This image is an image of a cat" goes all the way to "A cat"). Each one removes only framing words
# and leaves a noun phrase that reads as a caption on its own. A match is ignored when nothing with a
# letter or digit would remain.
BOILERPLATE_OPENERS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        # "The image shows a woman ..." -> "A woman ...": the verb only says that the picture has
        # content; its object is the description. "photo"/"photograph" are not in the list because
        # they name the medium, which is information for a style LoRA.
        r"^(?:the|this) (?:image|picture) (?:shows|depicts|features|showcases|displays|captures|portrays)"
        r"[:,]?\s+",
        # "The image is a close-up photograph of a cat" -> "A close-up photograph of a cat". Only before
        # an article: "The image is blurry" describes the image, not its subject, and stays.
        r"^(?:the|this) (?:image|picture) is (?=(?:a|an|the)\b)",
        # "This is an image of a cat" -> "A cat": "an image of" says nothing, the whole opener goes.
        r"^this is an image of\s+",
        # "This is a photo of a cat" -> "A photo of a cat": "this is" is empty, the noun phrase after
        # it may name the medium (photo, painting, 3d render) and is kept.
        r"^this is (?=(?:a|an|the)\b)",
        # "In this image, a woman ..." -> "A woman ...". The comma (or "we can see") is required, so
        # "In the image of a saint ..." is not cut.
        r"^in (?:this|the) (?:image|picture)(?:,\s*|,?\s+(?:we|i|you) (?:can )?see\s+)",
        # "An image of a cat" -> "A cat". "A picture of a cat" is kept on purpose: captioners say it
        # when a framed picture is the subject ("a picture of a cat hanging on a wall"), and there the
        # words carry meaning.
        r"^an image of\s+",
    )
)


@dataclass
class PostProcess:
    """What to do to every caption after the model wrote it."""

    trigger: str | None = None
    """Trigger phrase, e.g. "ohwx woman": first and never duplicated; prose that names it in a sentence
    keeps it there (module docstring)."""
    prefix: str = ""
    """Added verbatim after the trigger; the user controls separators ("photo of ", "masterpiece, ")."""
    suffix: str = ""
    """Added verbatim at the end (", 4k")."""
    strip_boilerplate: bool = True
    """Prose: remove "The image shows ...", "This image is a ...", "In this image, ..." and the like."""
    remove_tags: tuple[str, ...] = ()
    """Tags: drop these tags (case-insensitive)."""
    replace_tags: dict[str, str] = field(default_factory=dict)
    """Tags: a -> b (case-insensitive match); b may be "" to drop the tag. Chains resolve: a->b, b->c
    turns a into c, so a second pass changes nothing."""
    max_tags: int | None = None
    """Tags: keep the first N tags; the trigger, prefix and suffix do not count."""
    underscores_to_spaces: bool = False
    """Tags: "long_hair" -> "long hair"."""

    def __post_init__(self) -> None:
        self.remove_tags = tuple(self.remove_tags)
        if self.max_tags is not None and self.max_tags < 0:
            raise ValueError(f"max_tags must be 0 or more, got {self.max_tags}")
        self._replace = {tag_key(k): v for k, v in self.replace_tags.items() if tag_key(k)}
        # A cycle (a->b, b->a) has no fixed point, so no output would be stable.
        for start in self._replace:
            seen = {start}
            key = tag_key(self._replace[start])
            while key in self._replace and key != tag_key(self._replace[key]):
                if key in seen:
                    raise ValueError(f"replace_tags has a cycle through {start!r}")
                seen.add(key)
                key = tag_key(self._replace[key])


def parse_replace_tags(specs: Iterable[str]) -> dict[str, str]:
    """Parse command-line replacement specs: ["a=b", "c=d,e=f"] -> {"a": "b", "c": "d", "e": "f"}.

    "a=" drops tag a. The first "=" separates the pair, so a tag containing "=" can be a replacement
    but not a key. A later spec for the same tag wins, as with repeated command-line options.
    """
    result: dict[str, str] = {}
    for spec in specs:
        for item in spec.split(","):
            if not item.strip():
                continue  # "a=b," or "a=b,,c=d": a stray comma is not worth an error
            old, sep, new = item.partition("=")
            if not sep or not old.strip():
                raise ValueError(
                    f"bad tag replacement {item.strip()!r}: expected OLD=NEW (NEW may be empty to drop "
                    f"the tag), several separated by commas, e.g. 'long_hair=long hair,1girl=woman'"
                )
            result[old.strip()] = new.strip()
    return result


def split_tags(text: str) -> list[str]:
    """Split tag text on commas and newlines; strip each tag, collapse inner spaces, drop empties."""
    tags = (" ".join(part.split()) for part in re.split(r"[,\n]", text))
    return [tag for tag in tags if tag]


def looks_like_tags(captions: Iterable[str]) -> bool:
    """True when most captions are comma-separated tag lists rather than prose.

    Prose has commas too ("A woman, smiling, in a field."), so a caption counts as tags only with three
    or more items of at most three words on average and no closing full stop.
    """
    votes = 0
    total = 0
    for caption in captions:
        caption = caption.strip()
        if not caption:
            continue
        total += 1
        items = split_tags(caption)
        words = sum(len(item.split()) for item in items)
        if len(items) >= 3 and words / len(items) <= 3 and not caption.endswith("."):
            votes += 1
    return total > 0 and votes * 2 > total


def postprocess(text: str, options: PostProcess, *, tags: bool) -> str:
    """Clean raw model text and add the trigger, prefix and suffix (see the module docstring)."""
    if tags:
        return _postprocess_tags(text, options)
    return _postprocess_prose(text, options)


def merge_captions(new: str, old: str, policy: str, *, tags: bool, options: PostProcess | None = None) -> str:
    """The caption that replaces `old` (the one on disk) under `--existing prepend` or `append`.

    "prepend" puts the new caption first, "append" the old one. Both lose their trigger, prefix and
    suffix first, and the joined text gets them once, by the rule of the module docstring: merging never
    doubles a trigger, wherever the old caption had it. Tags are de-duplicated (case-insensitively, first
    spelling wins); prose is joined like lines, and a new caption the old one already says is not added
    again, so re-running a merge does not grow the file. The result is final: `postprocess` leaves it as is.
    """
    if policy not in ("prepend", "append"):
        raise ValueError(f"unknown merge policy {policy!r}: expected 'prepend' or 'append'")
    options = options or PostProcess()
    trigger = _clean_trigger(options.trigger)
    if tags:
        new_tags, old_tags = (_tag_body(text, options, trigger) for text in (new, old))
        first, second = (new_tags, old_tags) if policy == "prepend" else (old_tags, new_tags)
        return postprocess(", ".join(first + second), options, tags=True)
    new_body, old_body = (_prose_body(_prose_line(text), options, trigger) for text in (new, old))
    if not re.search(r"\w", old_body):
        body = new_body or old_body
    elif not _says_something(new_body) or re.search(_phrase(new_body), old_body, re.IGNORECASE):
        body = old_body  # nothing new: a second run of the same merge leaves the caption as it is
    else:
        body = _join_lines([new_body, old_body] if policy == "prepend" else [old_body, new_body])
    return postprocess(body, options, tags=False)


# --- tags ---------------------------------------------------------------------------------------------


def tag_key(tag: str) -> str:
    # Danbooru spells tags with underscores and most taggers with spaces; both mean the same tag.
    return " ".join(tag.replace("_", " ").split()).casefold()


def _underscores(tag: str, options: PostProcess) -> str:
    # len > 3 keeps kaomoji such as "^_^" and ">_<" intact, like sd-scripts' --remove_underscore.
    if options.underscores_to_spaces and len(tag) > 3:
        return " ".join(tag.replace("_", " ").split())
    return tag


def _dedupe(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def _replace_tag(tag: str, options: PostProcess) -> str:
    # Follow chains to their end (cycles were rejected in __post_init__).
    for _ in range(len(options._replace) + 1):
        new = options._replace.get(tag_key(tag))
        if new is None or tag_key(new) == tag_key(tag):
            break
        tag = new
    return _underscores(" ".join(tag.split()), options)


def _postprocess_tags(text: str, options: PostProcess) -> str:
    trigger = _clean_trigger(options.trigger)
    body = _tag_body(text, options, trigger)
    if options.max_tags is not None:
        body = body[: options.max_tags]
    rest = options.prefix + ", ".join(body) + options.suffix
    # strip(" ,"): an empty body must not leave the separator of a prefix dangling ("masterpiece,").
    return _join_trigger(trigger, " ".join(rest.split()).strip(" ,"))


def _tag_body(text: str, options: PostProcess, trigger: str) -> list[str]:
    """The cleaned tags of `text`, without the trigger, prefix and suffix and not yet cut to max_tags."""
    text = _SPECIAL_TOKENS.sub(" ", text)
    # Our own output first loses its trigger, prefix and suffix as text: a prefix without a trailing
    # comma ("photo of ") is glued to the first tag, and only this finds it again on a second pass.
    text = " ".join(re.sub(r"\s*\n\s*", ", ", text).split())
    if trigger:
        text = re.sub(rf"^{_phrase(trigger)}\s*(?:,|$)", "", text, flags=re.IGNORECASE).strip()
    text = _strip_affix(text, options.prefix, at_start=True)
    text = _strip_affix(text, options.suffix, at_start=False)
    # Tags that the trigger, prefix and suffix add are taken out of the body, so they appear once and a
    # second pass finds the same body. This happens before replacements so a replacement cannot turn a
    # prefix tag into something else on the second pass.
    decoration = {tag_key(t) for t in split_tags(f"{trigger},{options.prefix},{options.suffix}")}
    removed = {tag_key(t) for t in options.remove_tags}
    body = []
    for tag in split_tags(text):
        tag = _underscores(tag, options)
        if tag_key(tag) in decoration:
            continue
        tag = _replace_tag(tag, options)
        key = tag_key(tag)
        if key and key not in removed and key not in decoration:
            body.append(tag)
    return _dedupe(body)


# --- prose --------------------------------------------------------------------------------------------


def _normalize_prose(text: str) -> str:
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def _join_lines(lines: list[str]) -> str:
    # A space after a line that ends a sentence or a clause, else ", ": the lines of an old caption are
    # usually separate captions or a caption and its tags, and "a red car a blue door" would read as one.
    out = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if not out:
            out = line
        elif out.endswith(_PUNCTUATION) or line.startswith(_PUNCTUATION):
            out = f"{out} {line}"
        else:
            out = f"{out}, {line}"
    return out


def _prose_line(text: str) -> str:
    """Raw prose as one normalised line, Florence-2 special tokens removed."""
    return _normalize_prose(_join_lines(_SPECIAL_TOKENS.sub(" ", text).splitlines()))


def _clean_trigger(trigger: str | None) -> str:
    return " ".join((trigger or "").split())


def _join_trigger(trigger: str, rest: str) -> str:
    if not trigger:
        return rest
    return f"{trigger}, {rest}" if rest else trigger


def _phrase(text: str) -> str:
    """A regex for `text` as a whole phrase: an end that is a letter or digit is not glued to another."""
    start = r"(?<!\w)" if re.match(r"\w", text) else ""
    end = r"(?!\w)" if re.search(r"\w$", text) else ""
    return rf"{start}{re.escape(text)}{end}"


def _strip_boilerplate_once(text: str) -> str:
    for pattern in BOILERPLATE_OPENERS:
        match = pattern.match(text)
        if match:
            rest = text[match.end() :]
            if re.search(r"\w", rest):
                return rest[0].upper() + rest[1:]
    return text


def _says_something(body: str) -> bool:
    """Whether a prose body has words beyond a boilerplate opener: "In this image, ." has none. (Such a
    body is kept whole on its own, but joined before other text its opener would be stripped.)"""
    for pattern in BOILERPLATE_OPENERS:
        match = pattern.match(body)
        if match:
            body = body[match.end() :]
            break
    return bool(re.search(r"\w", body))


def _strip_affix(text: str, affix: str, *, at_start: bool) -> str:
    # The affix is compared without its separators (spaces, commas on the side that faces the body),
    # because output normalisation may drop them when the body is empty ("masterpiece, " alone becomes
    # "masterpiece"). If the user wrote a separator there, it marks a word boundary: prefix "photo of "
    # matches "photo of a cat" and "photo of, 4k" but not "photo offset".
    core = _normalize_prose(affix)
    key = core.rstrip(" ,") if at_start else core.lstrip(" ,")
    if not key:
        return text
    has_separator = key != core or (affix[-1] if at_start else affix[0]).isspace()
    if at_start and text.casefold().startswith(key.casefold()):
        rest = text[len(key) :]
        if not has_separator or not re.match(r"\w", rest):
            return rest.strip()
    if not at_start and text.casefold().endswith(key.casefold()):
        rest = text[: len(text) - len(key)]
        if not has_separator or not re.search(r"\w$", rest):
            return rest.strip()
    return text


def _prose_body(text: str, options: PostProcess, trigger: str) -> str:
    # Repeat every removal until nothing changes, so the body is a fixed point and a second pass over
    # our own output (trigger, prefix, body, suffix) peels the additions off and finds the same body.
    segment = re.compile(rf"(?:^|(?<=,))\s*{_phrase(trigger)}\s*(?:,|$)", re.IGNORECASE) if trigger else None
    while True:
        before = text
        if segment:
            # The trigger as its own comma-separated item, anywhere: "ohwx woman, a woman" or
            # "a woman, ohwx woman". Inside a sentence it is part of the grammar and stays.
            text = segment.sub(" ", text)
        text = _normalize_prose(text).strip(" ,")
        text = _strip_affix(text, options.prefix, at_start=True)
        text = _strip_affix(text, options.suffix, at_start=False)
        if options.strip_boilerplate:
            text = _strip_boilerplate_once(text)
        if text == before:
            return text


def _postprocess_prose(text: str, options: PostProcess) -> str:
    trigger = _clean_trigger(options.trigger)
    body = _prose_body(_prose_line(text), options, trigger)
    named = trigger and re.search(_phrase(trigger), body, re.IGNORECASE)
    if named:
        # The sentence names the trigger ("ohwx woman standing", "a photo of ohwx woman"): it stays there,
        # spelled exactly, and is not added again (module docstring).
        body = re.sub(_phrase(trigger), lambda _: trigger, body, flags=re.IGNORECASE)
    rest = _normalize_prose(options.prefix + body + options.suffix).strip(" ,")
    return rest if named else _join_trigger(trigger, rest)
