"""Caption text checks: what a trainer's text encoder will see, and what the captions teach as a set.

Pure functions over a list of captions (index i is caption i) plus, where tokens matter, a Hugging Face
tokenizer. A caption of several lines is several alternatives of which a trainer draws one (see
`loracap.dataset.caption_lines`): token counts and the trigger are checked per line (a caption counts its
longest line, and lacks the trigger when any line lacks it); duplicates, tags and terms read the whole text.
Tokenizers: the CLIP one for SD 1.x/SDXL windows, optionally a T5 one for Flux/SD3. Nothing here reads files
or loads models; callers pass the tokenizers in, so the checks run with whatever tokenizer the user trains.
Without a tokenizer (None) the token counts and the trigger fusion check are skipped; the rest runs.

    token_lengths       tokens per caption, truncated / empty captions
    find_duplicates     exact and near-duplicate caption groups
    audit_trigger       how often and where the trigger appears, and where the tokenizer fuses it
    tag_stats           tag (or word) frequencies, tags every caption has, imbalance measures
    count_sensitive     gender / age / ethnicity / religion terms, per term and per category
    analyze_text        all of the above in one TextReport
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loracap.dataset.record import caption_lines
from loracap.postprocess import looks_like_tags, split_tags, tag_key
from loracap.quality.unionfind import UnionFind

__all__ = [
    "CLIP_MAX_LENGTH",
    "DEFAULT_SENSITIVE_TERMS",
    "DuplicateGroup",
    "DuplicateReport",
    "SensitiveReport",
    "TagStats",
    "TermCount",
    "TextReport",
    "TokenReport",
    "TriggerHit",
    "TriggerReport",
    "analyze_text",
    "audit_trigger",
    "count_sensitive",
    "find_duplicates",
    "gini",
    "jaccard",
    "normalized_entropy",
    "split_units",
    "tag_stats",
    "token_lengths",
    "top_k_share",
]

# CLIP's text encoder has 77 positions; BOS and EOS take two, so 75 content tokens fit and the rest is
# silently cut off (kohya's --max_token_length 150/225 concatenates several such windows).
CLIP_MAX_LENGTH = 77
# tokenizers without a real limit report a huge model_max_length (int(1e30)); those fall back to CLIP's.
_NO_LIMIT = 1_000_000

# Words that say nothing about the image; without dropping them every prose caption "contains" "a".
_STOPWORDS = frozenset(
    {
        "a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "with", "for", "from", "by", "is",
        "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "as", "into",
        "onto", "over", "under", "near", "while", "has", "have", "their", "his", "her", "there", "here",
    }
)  # fmt: skip

# Small on purpose: a starting point that the caller replaces or extends. "black" and "white" are left out
# because in captions they are almost always colours ("black hair", "white wall"), and counting them as
# ethnicity would drown the real signal.
DEFAULT_SENSITIVE_TERMS: dict[str, tuple[str, ...]] = {
    "gender": (
        "woman", "women", "man", "men", "girl", "girls", "boy", "boys", "female", "male", "lady",
        "ladies", "gentleman", "1girl", "1boy", "2girls", "2boys", "feminine", "masculine",
    ),
    "age": (
        "baby", "toddler", "child", "children", "kid", "kids", "teen", "teenager", "young", "adult",
        "middle-aged", "elderly", "old man", "old woman", "aged",
    ),
    "ethnicity": (
        "asian", "african", "african american", "caucasian", "hispanic", "latino", "latina", "indian",
        "arab", "middle eastern", "east asian", "european",
    ),
    "religion": (
        "christian", "muslim", "jewish", "hindu", "buddhist", "sikh", "hijab", "turban", "nun", "priest",
        "monk", "church", "mosque", "temple",
    ),
}  # fmt: skip


# --- token lengths ------------------------------------------------------------------------------------


@dataclass
class TokenReport:
    max_length: int
    """The window, special tokens included (77 for CLIP)."""
    counts: list[int]
    """Tokens per caption, special tokens included: what the window must hold (a caption of several lines:
    its longest line, since each line is trained on its own)."""
    truncated: list[int]
    """Indices of captions longer than the window (any line of them): their ends are never seen in
    training."""
    empty: list[int]
    """Indices of captions with no content tokens: the image trains unconditioned."""
    t5_max_length: int | None = None
    t5_counts: list[int] | None = None
    t5_truncated: list[int] = field(default_factory=list)

    special_tokens: int = 2
    """Tokens the tokenizer adds to every caption (BOS and EOS for CLIP)."""

    @property
    def content_limit(self) -> int:
        """Content tokens that fit: 75 for CLIP."""
        return self.max_length - self.special_tokens


def _window(tokenizer: Any, max_length: int | None, default: int) -> int:
    if max_length is not None:
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else default


def _encode(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> list[Any]:
    # verbose=False: the "sequence is longer than the maximum" warning is exactly what we are measuring.
    # Batches keep memory flat for large datasets while letting a fast tokenizer work in parallel.
    out: list[Any] = []
    for start in range(0, len(texts), 512):
        batch = list(texts[start : start + 512])
        enc = tokenizer(batch, truncation=False, verbose=False, **kwargs)
        out.extend({key: enc[key][i] for key in enc} for i in range(len(batch)))
    return out


def _count(tokenizer: Any, captions: Sequence[str]) -> list[int]:
    """Tokens per caption: of its longest line where it has several (alternatives, trained one at a time)."""
    lines = [caption_lines(c) if "\n" in c else [c] for c in captions]
    flat = [line for alternatives in lines for line in alternatives or [""]]
    # Only the ids are needed: no attention masks or type ids to convert to Python lists (a third of the
    # time for 100k captions).
    flags = {"return_attention_mask": False, "return_token_type_ids": False}
    counts = iter(len(e["input_ids"]) for e in _encode(tokenizer, flat, add_special_tokens=True, **flags))
    return [max(next(counts) for _ in alternatives or [""]) for alternatives in lines]


def token_lengths(
    captions: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    t5_tokenizer: Any | None = None,
    t5_max_length: int = 512,
) -> TokenReport:
    """Count tokens per caption with `tokenizer` (and `t5_tokenizer` when given).

    `max_length` defaults to the tokenizer's model_max_length (77 for CLIP), or 77 when it has none.
    Flux-dev uses a 512-token T5 window and Flux-schnell/SD3 256 by default: set `t5_max_length`.
    """
    limit = _window(tokenizer, max_length, CLIP_MAX_LENGTH)
    counts = _count(tokenizer, captions)
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    report = TokenReport(
        max_length=limit,
        counts=counts,
        truncated=[i for i, n in enumerate(counts) if n > limit],
        empty=[
            i for i, (c, n) in enumerate(zip(captions, counts, strict=True)) if not c.strip() or n <= specials
        ],
        special_tokens=specials,
    )
    if t5_tokenizer is not None:
        report.t5_max_length = t5_max_length
        report.t5_counts = _count(t5_tokenizer, captions)
        report.t5_truncated = [i for i, n in enumerate(report.t5_counts) if n > t5_max_length]
    return report


# --- tags and words -----------------------------------------------------------------------------------


# A dataset repeats the same few thousand tags: normalise each spelling once. tag_key collapses whitespace
# itself, so it can take split_tags' pieces before their own whitespace is collapsed (same keys, same
# empties dropped).
_cached_tag_key = functools.lru_cache(maxsize=1 << 16)(tag_key)
_TAG_SEPARATORS = re.compile(r"[,\n]")


def split_units(caption: str, *, tags: bool) -> list[str]:
    """A caption's tags (normalized as loracap compares tags: case and "_" vs " " ignored) or its words
    (lower case, stopwords dropped), in order, duplicates kept."""
    if tags:  # = [tag_key(t) for t in split_tags(caption)] without the empty keys
        return [key for key in map(_cached_tag_key, _TAG_SEPARATORS.split(caption)) if key]
    return [w for w in re.findall(r"[\w'-]+", caption.casefold()) if w.strip("'-") and w not in _STOPWORDS]


@dataclass
class TagStats:
    mode: str
    """"tags" or "words": what the counts are of."""
    captions: int
    counts: Counter[str]
    """In how many captions each tag appears (once per caption)."""
    singletons: list[str]
    """Tags in one caption only: too rare to learn, often typos or tagger noise."""
    common: list[tuple[str, float]]
    """(tag, share of captions) at or above `common_share`, most common first. A tag in (nearly) every
    caption is never contrasted with its absence, so the LoRA learns it into the trigger."""
    gini: float
    entropy: float
    top_k: int
    top_k_share: float


def gini(counts: Iterable[int]) -> float:
    """Gini coefficient of counts: 0 when all are equal, towards 1 when one dominates."""
    values = sorted(c for c in counts if c > 0)
    n, total = len(values), sum(values)
    if n < 2 or total == 0:
        return 0.0
    weighted = sum((2 * i - n + 1) * v for i, v in enumerate(values))  # i from 0: 2(i+1) - n - 1
    return weighted / (n * total)


def normalized_entropy(counts: Iterable[int]) -> float:
    """Shannon entropy of the count distribution over log(n): 1 for uniform, towards 0 when one dominates.
    1.0 for a single tag, since there is nothing to be unbalanced between."""
    values = [c for c in counts if c > 0]
    total = sum(values)
    if len(values) < 2:
        return 1.0
    entropy = -sum(v / total * math.log(v / total) for v in values)
    return entropy / math.log(len(values))


def top_k_share(counts: Iterable[int], k: int = 10) -> float:
    """Share of all occurrences that the k most frequent items account for."""
    values = sorted((c for c in counts if c > 0), reverse=True)
    total = sum(values)
    return sum(values[:k]) / total if total else 0.0


def tag_stats(
    captions: Sequence[str],
    *,
    tags: bool | None = None,
    common_share: float = 0.9,
    top_k: int = 10,
    ignore: Iterable[str] = (),
) -> TagStats:
    """Tag (or word) frequencies over `captions`; `tags=None` decides with `looks_like_tags`.

    `ignore` drops tags from every count, e.g. the trigger, which is meant to be in every caption.
    """
    if tags is None:
        tags = looks_like_tags(captions)
    ignored = {unit for t in ignore for unit in split_units(t, tags=tags)}
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(set(split_units(caption, tags=tags)) - ignored)
    n = len(captions)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties in name order: stable reports
    common = [(t, c / n) for t, c in ranked if n and c / n >= common_share]
    return TagStats(
        mode="tags" if tags else "words",
        captions=n,
        counts=counts,
        singletons=sorted(t for t, c in counts.items() if c == 1),
        common=common,
        gini=gini(counts.values()),
        entropy=normalized_entropy(counts.values()),
        top_k=top_k,
        top_k_share=top_k_share(counts.values(), top_k),
    )


# --- duplicates ---------------------------------------------------------------------------------------

# Slack for bounds computed in floats (t * n may land just above a whole number): always towards keeping
# a candidate pair.
_EPS = 1e-9


@dataclass
class DuplicateGroup:
    indices: list[int]
    """Caption indices in the group, ascending."""
    similarity: float
    """1.0 for exact groups; for near groups the lowest Jaccard of the pairs that joined it."""


@dataclass
class DuplicateReport:
    exact: list[DuplicateGroup]
    """Identical captions (after stripping): the images will be hard to tell apart for the model."""
    near: list[DuplicateGroup]
    """Captions equal after normalisation (case, punctuation, tag order) or with word/tag-set Jaccard at
    or above the threshold; groups made only of identical captions are in `exact` only."""
    threshold: float


def jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _prefix(size: int, share: float, extra: int) -> int:
    """size - ceil(share * size) + extra, at most size: the prefix length that must hold `extra` of the
    items a set shares with any set it shares at least share * size items with."""
    return min(size, size - math.ceil(share * size - _EPS) + extra)


def _similar_pairs(
    sets: Sequence[frozenset[str]], threshold: float, *, stats: dict[str, int] | None = None, ell: int = 3
) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard), i < j, linking non-empty sets with Jaccard >= threshold: every pair comparing all
    pairs finds, without comparing all pairs. Equal sets are linked to their first copy only (1.0).

    Prefix filtering (PPJoin, Xiao et al. 2008, with the l-prefix count of Wang et al. 2012): items are
    ranked rarest first and each set sorted that way. Sets x, y with J >= t share o >= t * max(|x|, |y|)
    and o >= t / (1 + t) * (|x| + |y|) items; sorted sets sharing o >= a items share at least `ell` of
    them within their first |set| - a + ell items. Distinct sets are visited smallest first, so for each
    earlier y: |y| <= |x|, o >= 2t / (1 + t) * |y| (the index keeps that prefix of y), o >= t * |x| (x
    probes that prefix of its own) and |y| >= t * |x| (the size filter). Only pairs counting `ell` shared
    prefix items (or o's lower bound, when smaller) get the exact Jaccard. Every bound is rounded
    towards keeping a pair, so rounding can only cost a comparison, never miss one.

    Rare items are what make it fast: on real captions the work grows about linearly; captions all drawn
    from a few hundred words still cost about n**2 / vocabulary. `ell` = 3 rather than 1 or 2 reads a few
    more index entries (counted in C) to compute far fewer Jaccards (in Python): 100k such captions took
    43 s instead of 104 s with 2 (benchmarks/RESULTS.md). `stats` receives "entries" (index entries
    read) and "verified" (pairs whose Jaccard was computed).
    """
    found: list[tuple[int, int, float]] = []
    first_of: dict[frozenset[str], int] = {}
    for k, s in enumerate(sets):
        if s:
            first = first_of.setdefault(s, k)
            if first != k:
                found.append((first, k, 1.0))
    freq: Counter[str] = Counter(item for s in first_of for item in s)
    rank = {item: r for r, (item, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    order = sorted(first_of.values(), key=lambda k: (len(sets[k]), k))  # smallest first, then by index
    sizes = [len(sets[k]) for k in order]
    index: dict[int, list[int]] = {}  # item rank -> places in `order` of the sets indexed under it
    two_t = 2 * threshold / (1 + threshold)
    entries = verified = 0
    for place, k in enumerate(order):
        x = sorted(rank[item] for item in sets[k])
        n = len(x)
        low = bisect_left(sizes, threshold * n - _EPS)  # the first set of at least t * n items
        shared: Counter[int] = Counter()
        for item in x[: _prefix(n, threshold, ell)]:
            places = index.get(item)
            if places:
                start = bisect_left(places, low)
                entries += len(places) - start
                shared.update(places[start:])  # counted in C: this is the loop that grows with n
        required = min(ell, math.ceil(threshold * n - _EPS))
        for other, count in shared.items():
            if count >= required:
                verified += 1
                score = jaccard(sets[order[other]], sets[k])
                if score >= threshold:
                    found.append((min(order[other], k), max(order[other], k), score))
        for item in x[: _prefix(n, two_t, ell)]:
            index.setdefault(item, []).append(place)
    if stats is not None:
        stats.update(entries=entries, verified=verified)
    return found


def _near_pairs(texts: list[str], threshold: float, tags: bool) -> list[tuple[int, int, float]]:
    """(i, j, similarity) linking distinct texts: equal after normalisation (1.0), or Jaccard >= threshold.
    Normalised, a tag caption is its sorted tag set, a prose caption its words (stopwords kept)."""
    units = [split_units(text, tags=tags) for text in texts]
    pairs: list[tuple[int, int, float]] = []
    first_by_norm: dict[str, int] = {}
    for k, text in enumerate(texts):
        norm = ", ".join(sorted(set(units[k]))) if tags else " ".join(re.findall(r"\w+", text.casefold()))
        first = first_by_norm.setdefault(norm, k)
        if first != k:
            pairs.append((first, k, 1.0))
    return pairs + _similar_pairs([frozenset(u) for u in units], threshold)


def find_duplicates(
    captions: Sequence[str], *, threshold: float = 0.8, tags: bool | None = None
) -> DuplicateReport:
    """Exact duplicate groups and near-duplicate groups (see DuplicateReport). Empty captions are left
    out: `token_lengths` reports those."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if tags is None:
        tags = looks_like_tags(captions)
    by_text: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        if caption.strip():
            by_text.setdefault(caption.strip(), []).append(i)
    exact = [DuplicateGroup(ix, 1.0) for ix in by_text.values() if len(ix) > 1]

    # Near duplicates work on distinct texts (exact copies are one node), joined by union-find.
    texts = list(by_text)
    pairs = _near_pairs(texts, threshold, tags)
    uf = UnionFind(len(texts))
    for a, b, _ in pairs:
        uf.union(a, b)
    # A group's similarity is its weakest link: the lowest score of the pairs that joined it.
    lowest: dict[int, float] = {}
    for a, _, score in pairs:
        root = uf.find(a)
        lowest[root] = min(lowest.get(root, 1.0), score)
    near = [
        DuplicateGroup(sorted(i for k in members for i in by_text[texts[k]]), lowest[root])
        for root, members in uf.groups().items()
        if len(members) > 1
    ]
    near.sort(key=lambda g: g.indices[0])
    return DuplicateReport(exact=exact, near=near, threshold=threshold)


# --- trigger ------------------------------------------------------------------------------------------


@dataclass
class TriggerHit:
    index: int
    """Caption index."""
    start: int
    end: int
    """Character span of the match in the caption."""
    position: int
    """Tag index (tag captions) or word index (prose) where the trigger is."""
    where: str
    """"first_tag" / "start", "middle" or "end"."""
    text: str
    """The trigger as spelled in the caption."""
    tokens: list[str]
    """Tokens covering the span in the caption's tokenization (empty without a fast tokenizer)."""
    fused: bool | None
    """True when those tokens differ from the trigger's own: glued to a neighbour ("ohwxwoman") or split
    differently. None when the tokenizer gives no offsets to check with."""
    glued: bool = False
    """A letter or digit touches the match ("xohwx", "ohwxwoman"): part of a longer word, whatever the
    tokenizer makes of it."""


@dataclass
class TriggerReport:
    trigger: str
    trigger_tokens: list[str] | None
    """The trigger tokenized on its own: what the user will type in a prompt. None without a tokenizer."""
    with_trigger: int
    """Captions that mention the trigger (in every line, where a caption has several)."""
    without: list[int]
    """Indices of captions that never mention the trigger, or have a line (an alternative trained on its
    own) that does not."""
    hits: list[TriggerHit]
    fused: list[int]
    """Indices of captions where at least one occurrence is fused."""
    glued: list[int]
    """Indices of captions where at least one occurrence is part of a longer word."""
    case_mismatch: list[int]
    """Indices where the trigger is spelled in another letter case: the same to CLIP (which lower-cases)
    but different tokens to case-sensitive encoders such as T5."""
    positions: Counter[str]
    """How many captions have their first occurrence at each `where`."""


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    # Plain substring, case-insensitive, any whitespace between words: "ohwxwoman" must be found to be
    # reported as fused, so no word boundaries here.
    return re.compile(r"\s+".join(re.escape(w) for w in trigger.split()), re.IGNORECASE)


def _position(caption: str, start: int, end: int, tags: bool) -> tuple[int, str]:
    before, after = caption[:start], caption[end:]
    if tags:
        cut = max(before.rfind(","), before.rfind("\n"))
        index = len(split_tags(before[: cut + 1])) if cut >= 0 else 0
        seps = [p for p in (after.find(","), after.find("\n")) if p >= 0]
        # Last when only separators and whitespace follow (split_tags would find no tag there).
        last = not seps or not after[min(seps) :].replace(",", "").strip()
        first_label = "first_tag"
    else:
        index = len(before.split())
        if before and not before[-1].isspace():
            index -= 1  # the match starts inside a word ("xohwx"): that word's index
        # Last when nothing follows but the rest of the word it sits in ("ohwx." or "xohwxy").
        last = not after.split() or (not after[0].isspace() and len(after.split()) == 1)
        first_label = "start"
    if index == 0:
        return index, first_label
    return index, "end" if last else "middle"


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def audit_trigger(
    captions: Sequence[str], tokenizer: Any, trigger: str, *, tags: bool | None = None
) -> TriggerReport:
    """Where `trigger` appears in each caption and whether `tokenizer` keeps it as its own tokens there.

    A trigger glued to a neighbour ("ohwxwoman", or "ohwx," with a tokenizer that merges punctuation)
    becomes other tokens in training than in the prompt, so the LoRA binds the concept to the wrong ones.
    The check compares the token ids covering the match (found through the offset mapping) with the
    trigger's ids on its own, with and without a leading space (byte-level BPEs spell a word after a space
    differently from one at the start), and requires the covering tokens to end at the match, give or
    take whitespace.

    `tokenizer=None` (none at hand) still finds presence, position, case and glued matches; `fused` stays
    None, as with a tokenizer that gives no offsets.
    """
    trigger = " ".join(trigger.split())
    if not trigger:
        raise ValueError("the trigger is empty")
    if tags is None:
        tags = looks_like_tags(captions)
    pattern = _trigger_pattern(trigger)
    can_check = bool(getattr(tokenizer, "is_fast", False))
    own = None if tokenizer is None else tokenizer.convert_ids_to_tokens(_token_ids(tokenizer, trigger))
    report = TriggerReport(
        trigger=trigger,
        trigger_tokens=own,
        with_trigger=0,
        without=[],
        hits=[],
        fused=[],
        glued=[],
        case_mismatch=[],
        positions=Counter(),
    )
    matching = [i for i, c in enumerate(captions) if pattern.search(c)]
    report.without = [i for i, c in enumerate(captions) if not _in_every_line(pattern, c)]
    report.with_trigger = len(captions) - len(report.without)
    encodings = (
        _encode(
            tokenizer,
            [captions[i] for i in matching],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,  # not looked at: converting them costs as much as the offsets
            return_token_type_ids=False,
        )
        if can_check
        else [None] * len(matching)
    )
    references: dict[str, set[tuple[int, ...]]] = {}
    for i, enc in zip(matching, encodings, strict=True):
        caption = captions[i]
        any_fused = False
        for number, match in enumerate(pattern.finditer(caption)):
            spelled = match.group(0)
            # Where it is in its own line: each line is a caption of its own to the trainer.
            line = caption.rfind("\n", 0, match.start()) + 1
            end = caption.find("\n", match.end())
            text = caption[line : len(caption) if end < 0 else end]
            position, where = _position(text, match.start() - line, match.end() - line, tags)
            tokens: list[str] = []
            fused: bool | None = None
            if enc is not None:
                if spelled not in references:
                    # The trigger as spelled here, so a case difference is reported as such, not as fusion.
                    references[spelled] = {
                        tuple(_token_ids(tokenizer, spelled)),
                        tuple(_token_ids(tokenizer, " " + spelled)),
                    }
                tokens, fused = _span_tokens(
                    tokenizer, caption, enc, match.start(), match.end(), references[spelled]
                )
            a, b = match.start(), match.end()
            glued = (a > 0 and caption[a - 1].isalnum()) or (b < len(caption) and caption[b].isalnum())
            report.hits.append(TriggerHit(i, a, b, position, where, spelled, tokens, fused, glued))
            any_fused = any_fused or bool(fused)
            if glued and i not in report.glued:
                report.glued.append(i)
            if number == 0:
                report.positions[where] += 1
            if spelled != trigger and " ".join(spelled.split()) != trigger and i not in report.case_mismatch:
                report.case_mismatch.append(i)
        if any_fused:
            report.fused.append(i)
    return report


def _in_every_line(pattern: re.Pattern[str], caption: str) -> bool:
    if "\n" not in caption:
        return pattern.search(caption) is not None
    lines = caption_lines(caption)
    return bool(lines) and all(pattern.search(line) for line in lines)


def _span_tokens(
    tokenizer: Any, caption: str, enc: Mapping[str, Any], start: int, end: int, refs: set[tuple[int, ...]]
) -> tuple[list[str], bool]:
    # The tokens overlapping the match (zero-width tokens are specials).
    covering = [
        (token_id, s, e)
        for token_id, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        if e > s and s < end and e > start
    ]
    if not covering:
        return [], True
    ids = [token_id for token_id, _, _ in covering]
    first, last = covering[0][1], covering[-1][2]
    glued = caption[first:start].strip() != "" or caption[end:last].strip() != ""
    return tokenizer.convert_ids_to_tokens(ids), glued or tuple(ids) not in refs


# --- sensitive terms ----------------------------------------------------------------------------------


@dataclass
class TermCount:
    occurrences: int = 0
    captions: int = 0
    """Captions with at least one occurrence."""


@dataclass
class SensitiveReport:
    terms: dict[str, TermCount]
    """Per term (lower case), for terms found at least once."""
    categories: dict[str, TermCount]
    """Per category, every category listed (zero counts included, so an absent category is visible)."""
    category_of: dict[str, str]


def _term_pattern(term: str, *, bounded: bool = True) -> re.Pattern[str]:
    # Whole words: no letter, digit, "_" or "-" either side. Any whitespace between a term's words.
    body = r"\s+".join(re.escape(w) for w in term.split())
    return re.compile(rf"(?<![\w-]){body}(?![\w-])" if bounded else rf"{body}(?![\w-])", re.IGNORECASE)


# Joins captions into one text to search each term once over all of them. None of these can be part of a
# match (a term's words are literals joined by whitespace, and these are neither), and each is a word
# boundary, like the start and end of a caption.
_JOINERS = "\x00\x01\x02\x03\x04\x05\x06\x07\x08"


def _find_all(captions: Sequence[str], joined: tuple[str, list[int]] | None, term: str) -> dict[int, int]:
    """{caption index: len(_term_pattern(term).findall(caption))} for captions with at least one match.

    `joined` is (the captions joined by a character no term holds, where each caption starts): one search
    over all captions instead of one call per caption, and without the leading lookbehind, since a
    pattern starting with one is tried at every position while a plain start lets the regex engine skip
    ahead. Each match is then checked with the full pattern at its start; a rejected one resumes one
    character later, so the matches are exactly finditer's. None: caption by caption.
    """
    pattern = _term_pattern(term)
    if joined is None:
        return {i: n for i, c in enumerate(captions) if (n := len(pattern.findall(c)))}
    text, starts = joined
    fast = _term_pattern(term, bounded=False)
    found: Counter[int] = Counter()
    pos = 0
    while match := fast.search(text, pos):
        if pattern.match(text, match.start()):  # the character before it allows a whole word
            found[bisect_right(starts, match.start()) - 1] += 1
            pos = match.end()
        else:
            pos = match.start() + 1
    return dict(found)


def _join(captions: Sequence[str], terms: Iterable[str]) -> tuple[str, list[int]] | None:
    """The captions joined for _find_all by a _JOINERS character no term holds, with each caption's
    start; None if every joiner is in some term."""
    terms = list(terms)
    joiner = next((c for c in _JOINERS if not any(c in t for t in terms)), None)
    if joiner is None:
        return None
    starts = list(itertools.accumulate((len(c) + 1 for c in captions[:-1]), initial=0))
    return joiner.join(captions), starts


def count_sensitive(
    captions: Sequence[str], terms: Mapping[str, Iterable[str]] | None = None
) -> SensitiveReport:
    """Count `terms` ({category: [term, ...]}, default DEFAULT_SENSITIVE_TERMS) in `captions`.

    Whole words only ("man" is not found in "woman" or "mankind"), any letter case, any whitespace inside
    multi-word terms. A term listed in two categories counts in both.
    """
    terms = DEFAULT_SENSITIVE_TERMS if terms is None else terms
    listed: list[tuple[str, str]] = []  # (category, term), a term listed twice counting twice
    category_of: dict[str, str] = {}
    for category, words in terms.items():
        for term in words:
            term = " ".join(term.split()).casefold()
            if term:
                listed.append((category, term))
                category_of.setdefault(term, category)
    # Hits per caption, in listing order: {caption: [(listing, occurrences), ...]}.
    hits: dict[int, list[tuple[int, int]]] = {}
    joined = _join(captions, (term for _, term in listed))
    for listing, (_, term) in enumerate(listed):
        for i, n in _find_all(captions, joined, term).items():
            hits.setdefault(i, []).append((listing, n))
    per_term: dict[str, TermCount] = {}
    per_category = {category: TermCount() for category in terms}
    for i in sorted(hits):  # caption by caption, as if each caption were searched term by term
        hit_categories: set[str] = set()
        for listing, n in hits[i]:
            category, term = listed[listing]
            count = per_term.setdefault(term, TermCount())
            count.occurrences += n
            count.captions += 1
            per_category[category].occurrences += n
            hit_categories.add(category)
        for category in hit_categories:
            per_category[category].captions += 1
    return SensitiveReport(terms=per_term, categories=per_category, category_of=category_of)


# --- everything ---------------------------------------------------------------------------------------


@dataclass
class TextReport:
    tags_mode: bool
    tokens: TokenReport | None
    """None when there was no tokenizer: the token checks were skipped (not "nothing truncated")."""
    duplicates: DuplicateReport
    tags: TagStats
    sensitive: SensitiveReport
    trigger: TriggerReport | None = None
    timing: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    """Seconds per check ("tokens_s", "duplicates_s", "tags_s", "sensitive_s", "trigger_s")."""


def analyze_text(
    captions: Sequence[str],
    tokenizer: Any | None,
    *,
    trigger: str | None = None,
    t5_tokenizer: Any | None = None,
    t5_max_length: int = 512,
    max_length: int | None = None,
    near_threshold: float = 0.8,
    common_share: float = 0.9,
    top_k: int = 10,
    sensitive_terms: Mapping[str, Iterable[str]] | None = None,
    tags: bool | None = None,
) -> TextReport:
    """Run every check once with one tags/words decision, so all sections count the same units. The
    trigger is left out of the tag statistics: it is meant to be in every caption.

    `tokenizer=None` skips the token counts (`tokens` is None) and the trigger fusion check."""
    if tokenizer is None and t5_tokenizer is not None:
        # The T5 counts live in the same TokenReport as the main window's; refuse rather than drop them.
        raise ValueError("t5_tokenizer counts T5 tokens next to tokenizer's window: pass a tokenizer too")
    if tags is None:
        tags = looks_like_tags(captions)
    timing: dict[str, float] = {}

    def timed(name: str, check: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = check()
        timing[name] = time.perf_counter() - started
        return result

    tokens = timed(
        "tokens_s",
        lambda: (
            token_lengths(
                captions,
                tokenizer,
                max_length=max_length,
                t5_tokenizer=t5_tokenizer,
                t5_max_length=t5_max_length,
            )
            if tokenizer is not None
            else None
        ),
    )
    duplicates = timed("duplicates_s", lambda: find_duplicates(captions, threshold=near_threshold, tags=tags))
    ignore = [trigger] if trigger else ()
    tag_counts = timed(
        "tags_s",
        lambda: tag_stats(captions, tags=tags, common_share=common_share, top_k=top_k, ignore=ignore),
    )
    sensitive = timed("sensitive_s", lambda: count_sensitive(captions, sensitive_terms))
    audit = timed(
        "trigger_s", lambda: audit_trigger(captions, tokenizer, trigger, tags=tags) if trigger else None
    )
    return TextReport(tags, tokens, duplicates, tag_counts, sensitive, audit, timing)
