"""Caption text checks: what a trainer's text encoder will see, and what the captions teach as a set.

Pure functions over a list of captions (index i is caption i) plus, where tokens matter, a Hugging Face
tokenizer: the CLIP one for SD 1.x/SDXL windows, optionally a T5 one for Flux/SD3. Nothing here reads files
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

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    """Tokens per caption, special tokens included: what the window must hold."""
    truncated: list[int]
    """Indices of captions longer than the window: their ends are never seen in training."""
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
    return [len(e["input_ids"]) for e in _encode(tokenizer, captions, add_special_tokens=True)]


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


def split_units(caption: str, *, tags: bool) -> list[str]:
    """A caption's tags (normalized as loracap compares tags: case and "_" vs " " ignored) or its words
    (lower case, stopwords dropped), in order, duplicates kept."""
    if tags:
        return [key for key in (tag_key(t) for t in split_tags(caption)) if key]
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


def _similar_pairs(sets: list[frozenset[str]], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs of sets with Jaccard >= threshold, without comparing every pair.

    Prefix filtering (as in PPJoin): order each set's items rarest first; two sets reaching the threshold
    must share an item among the first |x| - ceil(t*|x|) + 1 of either, so only pairs that do are compared.
    Exact for any threshold > 0, and a few thousand captions take well under a second.
    """
    freq: Counter[str] = Counter(item for s in sets for item in s)
    index: dict[str, list[int]] = {}
    found: list[tuple[int, int, float]] = []
    for j, s in enumerate(sets):
        if not s:
            continue
        ordered = sorted(s, key=lambda item: (freq[item], item))
        prefix = ordered[: len(s) - math.ceil(threshold * len(s) - 1e-9) + 1]
        candidates: set[int] = set()
        for item in prefix:
            candidates.update(index.get(item, ()))
            index.setdefault(item, []).append(j)
        for i in sorted(candidates):
            score = jaccard(sets[i], s)
            if score >= threshold:
                found.append((i, j, score))
    return found


def _normalize(caption: str, tags: bool) -> str:
    if tags:
        return ", ".join(sorted(set(split_units(caption, tags=True))))
    return " ".join(re.findall(r"\w+", caption.casefold()))


def _near_pairs(texts: list[str], threshold: float, tags: bool) -> list[tuple[int, int, float]]:
    """(i, j, similarity) linking distinct texts: equal after normalisation (1.0), or Jaccard >= threshold."""
    pairs: list[tuple[int, int, float]] = []
    first_by_norm: dict[str, int] = {}
    for k, text in enumerate(texts):
        first = first_by_norm.setdefault(_normalize(text, tags), k)
        if first != k:
            pairs.append((first, k, 1.0))
    sets = [frozenset(split_units(text, tags=tags)) for text in texts]
    return pairs + _similar_pairs(sets, threshold)


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
    without: list[int]
    """Indices of captions that never mention the trigger."""
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
        last = not seps or not split_tags(after[min(seps) :])
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
    report.without = sorted(set(range(len(captions))) - set(matching))
    report.with_trigger = len(matching)
    encodings = (
        _encode(
            tokenizer, [captions[i] for i in matching], add_special_tokens=False, return_offsets_mapping=True
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
            position, where = _position(caption, match.start(), match.end(), tags)
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


def _span_tokens(
    tokenizer: Any, caption: str, enc: Mapping[str, Any], start: int, end: int, refs: set[tuple[int, ...]]
) -> tuple[list[str], bool]:
    ids: list[int] = []
    first = last = None
    for token_id, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if e > s and s < end and e > start:  # overlaps the match (zero-width tokens are specials)
            ids.append(token_id)
            first = s if first is None else first
            last = e
    if first is None or last is None:
        return [], True
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


def count_sensitive(
    captions: Sequence[str], terms: Mapping[str, Iterable[str]] | None = None
) -> SensitiveReport:
    """Count `terms` ({category: [term, ...]}, default DEFAULT_SENSITIVE_TERMS) in `captions`.

    Whole words only ("man" is not found in "woman" or "mankind"), any letter case, any whitespace inside
    multi-word terms. A term listed in two categories counts in both.
    """
    terms = DEFAULT_SENSITIVE_TERMS if terms is None else terms
    compiled: list[tuple[str, str, re.Pattern[str]]] = []
    category_of: dict[str, str] = {}
    for category, words in terms.items():
        for term in words:
            term = " ".join(term.split()).casefold()
            if term:
                body = r"\s+".join(re.escape(w) for w in term.split())
                compiled.append((category, term, re.compile(rf"(?<![\w-]){body}(?![\w-])", re.IGNORECASE)))
                category_of.setdefault(term, category)
    per_term: dict[str, TermCount] = {}
    per_category = {category: TermCount() for category in terms}
    for caption in captions:
        hit_categories: set[str] = set()
        for category, term, pattern in compiled:
            n = len(pattern.findall(caption))
            if n:
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
    tokens = (
        token_lengths(
            captions, tokenizer, max_length=max_length, t5_tokenizer=t5_tokenizer, t5_max_length=t5_max_length
        )
        if tokenizer is not None
        else None
    )
    return TextReport(
        tags_mode=tags,
        tokens=tokens,
        duplicates=find_duplicates(captions, threshold=near_threshold, tags=tags),
        tags=tag_stats(
            captions, tags=tags, common_share=common_share, top_k=top_k, ignore=[trigger] if trigger else ()
        ),
        sensitive=count_sensitive(captions, sensitive_terms),
        trigger=audit_trigger(captions, tokenizer, trigger, tags=tags) if trigger else None,
    )
