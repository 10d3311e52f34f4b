"""Turn raw model text into the caption a trainer reads.

Shared by every backend. Two kinds of output exist: prose (a sentence or a paragraph) and tags (a
comma-separated list, as WD14-style taggers and Florence-2 fine-tunes emit). The rules differ, so
every function takes `tags=`.

`postprocess` is idempotent: running it on its own output changes nothing. That matters because
captions are re-processed (a second run with `--overwrite`, a merge with an existing caption), and
a trigger word or prefix must never pile up.
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
    """Trigger phrase, e.g. "ohwx woman": always first, never duplicated."""
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


def postprocess(text: str, options: PostProcess, *, tags: bool) -> str:
    """Clean raw model text and add the trigger, prefix and suffix: trigger, prefix, body, suffix."""
    text = _SPECIAL_TOKENS.sub(" ", text)
    if tags:
        return _postprocess_tags(text, options)
    return _postprocess_prose(text, options)


def merge_captions(new: str, old: str, policy: str, *, tags: bool) -> str:
    """Combine a new caption with the one already on disk.

    policy "prepend" puts the new caption first, "append" the old one. Tags are de-duplicated
    (case-insensitively, first spelling wins); prose is joined with a space, and a new caption equal
    to the old one is not added again, so re-running a merge does not grow the file. Run the result
    through `postprocess` to move the trigger back to the front.
    """
    if policy not in ("prepend", "append"):
        raise ValueError(f"unknown merge policy {policy!r}: expected 'prepend' or 'append'")
    first, second = (new, old) if policy == "prepend" else (old, new)
    if tags:
        return ", ".join(_dedupe(split_tags(first) + split_tags(second)))
    first, second = _normalize_prose(first), _normalize_prose(second)
    if not first or not second:
        return first or second
    if first.casefold() == second.casefold():
        return _normalize_prose(old)
    return f"{first} {second}"


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
    body = _dedupe(body)
    if options.max_tags is not None:
        body = body[: options.max_tags]
    rest = options.prefix + ", ".join(body) + options.suffix
    # strip(" ,"): an empty body must not leave the separator of a prefix dangling ("masterpiece,").
    return _join_trigger(trigger, " ".join(rest.split()).strip(" ,"))


# --- prose --------------------------------------------------------------------------------------------


def _normalize_prose(text: str) -> str:
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def _clean_trigger(trigger: str | None) -> str:
    return " ".join((trigger or "").split())


def _join_trigger(trigger: str, rest: str) -> str:
    if not trigger:
        return rest
    return f"{trigger}, {rest}" if rest else trigger


def _phrase(text: str) -> str:
    """A regex for `text` as a whole phrase: not glued to letters or digits on either side."""
    return rf"(?<!\w){re.escape(text)}(?!\w)"


def _strip_boilerplate_once(text: str) -> str:
    for pattern in BOILERPLATE_OPENERS:
        match = pattern.match(text)
        if match:
            rest = text[match.end() :]
            if re.search(r"\w", rest):
                return rest[0].upper() + rest[1:]
    return text


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
    body = _prose_body(_normalize_prose(text), options, trigger)
    starts_with_trigger = trigger and re.match(_phrase(trigger), body, re.IGNORECASE)
    if starts_with_trigger and not options.prefix:
        # "ohwx woman standing in a field" already leads with the trigger as the subject of the
        # sentence; kohya's keep_tokens counts the whole first comma item, so it stays as written
        # (only the spelling is made exact). Forcing "ohwx woman, standing" would break the sentence.
        return _normalize_prose(trigger + body[len(trigger) :] + options.suffix)
    # With a prefix the trigger must come before it, so the sentence is kept whole after the prefix.
    return _join_trigger(trigger, _normalize_prose(options.prefix + body + options.suffix).strip(" ,"))
