"""Caption reading (every layout loracap writes) and caption text checks, with a real CLIP tokenizer.

The tokenizer is the test kit's genuine `CLIPTokenizer` (CLIP's normalizer, pre-tokenizer, `</w>` end-of-word
BPE and BOS/EOS post-processor) with merges trained on its caption corpus, so token counts, truncation and
trigger fusion behave as with openai/clip-vit-large-patch14, only with a smaller vocabulary.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from conftest import write_images
from hypothesis import given, settings
from hypothesis import strategies as st

import loracap.quality.text as text_checks
from loracap.dataset import open_store, read_dataset
from loracap.postprocess import split_tags, tag_key
from loracap.quality.text import (
    DEFAULT_SENSITIVE_TERMS,
    analyze_text,
    audit_trigger,
    count_sensitive,
    find_duplicates,
    gini,
    jaccard,
    normalized_entropy,
    split_units,
    tag_stats,
    token_lengths,
    top_k_share,
)
from loracap.quality.unionfind import UnionFind
from loracap.testing.clip_models import build_clip_tokenizer


@pytest.fixture(scope="module")
def clip_tokenizer():
    return build_clip_tokenizer()


# --- reading datasets ---------------------------------------------------------------------------------


def test_sidecar_pairs_missing_and_orphans(tmp_path):
    a, b, c = write_images(tmp_path, ["a.jpg", "sub/b.png", "c.webp"])
    (tmp_path / "a.txt").write_text("ohwx, smiling\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("ohwx, outdoors", encoding="utf-8")
    (tmp_path / "deleted.txt").write_text("caption of an image that is gone", encoding="utf-8")
    (tmp_path / "sub" / "gone.txt").write_text("another", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("not a caption", encoding="utf-8")

    ds = read_dataset(tmp_path)

    assert ds.layout == "sidecar"
    assert dict(ds.pairs) == {a: "ohwx, smiling", b: "ohwx, outdoors"}
    assert ds.missing == [c]
    assert ds.orphans == ["deleted.txt", "sub/gone.txt"]
    assert ds.image_count == 3 and ds.images == [a, c, b]  # find_images order
    assert ds.problems == []


def test_sidecar_custom_ext_non_recursive_and_unreadable_file(tmp_path):
    a, b, _ = write_images(tmp_path, ["a.jpg", "b.jpg", "sub/c.jpg"])
    (tmp_path / "a.caption").write_text("a cat", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ignored: wrong extension", encoding="utf-8")
    (tmp_path / "b.caption").mkdir()  # a folder where the caption should be: unreadable, not a crash

    ds = read_dataset(tmp_path, ext="caption", recursive=False)

    assert ds.pairs == [(a, "a cat")]
    assert ds.missing == []
    assert [p.path for p in ds.problems] == ["b.caption"]
    assert ds.image_count == 2


def test_jsonl_layout_written_by_loracap(tmp_path):
    a, b, c = write_images(tmp_path, ["a.jpg", "sub/b.jpg", "c.jpg"])
    with open_store("jsonl", tmp_path) as store:
        store.write(a, "ohwx, red dress")
        store.write(b, "ohwx, blue dress")
    with open(tmp_path / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "./gone.png", "text": "orphan"}) + "\n")
        f.write('{"file_name": "broken\n')

    ds = read_dataset(tmp_path)

    assert ds.layout == "jsonl"
    assert ds.source == tmp_path / "metadata.jsonl"
    assert dict(ds.pairs) == {a: "ohwx, red dress", b: "ohwx, blue dress"}
    assert ds.missing == [c]
    assert ds.orphans == ["./gone.png"]
    assert [p.reason for p in ds.problems] == ["not a JSON object"]


def test_kohya_layout_with_caption_and_tags(tmp_path):
    a, b, c = write_images(tmp_path, ["a.jpg", "sub/b.png", "c.jpg"])
    with open_store("kohya-json", tmp_path) as store:
        store.write(a, "a photo of ohwx")
        store.write(b, "ohwx outdoors")
    with open_store("kohya-json", tmp_path, tags=True) as store:
        store.write(a, "1girl, smile")
    meta = json.loads((tmp_path / "meta_cap.json").read_text(encoding="utf-8"))
    meta["old/removed"] = {"caption": "no image"}
    (tmp_path / "meta_cap.json").write_text(json.dumps(meta), encoding="utf-8")

    ds = read_dataset(tmp_path)

    assert ds.layout == "kohya-json"
    assert dict(ds.pairs) == {a: "a photo of ohwx, 1girl, smile", b: "ohwx outdoors"}
    assert ds.missing == [c]
    assert ds.orphans == ["old/removed"]
    assert dict(read_dataset(tmp_path, layout="kohya-json", kohya_field="tags").pairs) == {a: "1girl, smile"}


def test_broken_kohya_file_is_a_problem_not_a_crash(tmp_path):
    (a,) = write_images(tmp_path, ["a.jpg"])
    (tmp_path / "meta_cap.json").write_text('{"a": {"caption": "x"', encoding="utf-8")

    ds = read_dataset(tmp_path)

    assert ds.layout == "kohya-json"
    assert ds.missing == [a]
    assert len(ds.problems) == 1 and "not valid JSON" in ds.problems[0].reason


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown caption layout"):
        read_dataset(tmp_path, layout="csv")


# --- token lengths ------------------------------------------------------------------------------------


def test_long_caption_is_truncated_and_empty_one_flagged(clip_tokenizer):
    long = ", ".join(["a woman with long black hair standing in a field of flowers"] * 12)
    captions = ["ohwx, a woman, smiling", long, "   ", "a cat"]

    report = token_lengths(captions, clip_tokenizer)

    assert report.max_length == 77 and report.content_limit == 75
    assert report.truncated == [1]
    assert report.counts[1] > 77
    assert report.empty == [2]
    assert report.counts[3] == 4  # <|startoftext|> a cat <|endoftext|>


def test_second_tokenizer_window_is_a_parameter(clip_tokenizer):
    captions = ["a cat " * 40, "a dog"]

    report = token_lengths(captions, clip_tokenizer, t5_tokenizer=clip_tokenizer, t5_max_length=50)

    assert report.t5_max_length == 50
    assert report.t5_truncated == [0]
    assert report.truncated == [0]  # 82 tokens: over CLIP's 77 as well
    assert (
        token_lengths(captions, clip_tokenizer, t5_tokenizer=clip_tokenizer, t5_max_length=512).t5_truncated
        == []
    )


# --- trigger ------------------------------------------------------------------------------------------


def test_fused_trigger_is_caught_and_clean_one_is_not(clip_tokenizer):
    captions = [
        "ohwx, 1girl, smile",  # clean, first tag
        "1girl, ohwxwoman, smile",  # glued to the next word: different tokens
        "1girl, smile, Ohwx",  # clean (CLIP lower-cases), last tag
        "1girl, smile, outdoors",  # no trigger
        "1girl, xohwx, smile",  # part of a longer word
        "1girl, smile, ohwxsmile",  # glued to the next word, at the end
    ]

    report = audit_trigger(captions, clip_tokenizer, "ohwx")

    assert report.with_trigger == 5
    assert report.without == [3]
    assert report.fused == [1, 5]
    assert report.glued == [1, 4, 5]
    by_caption = {hit.index: hit for hit in report.hits}
    assert by_caption[0].fused is False and by_caption[2].fused is False
    assert by_caption[1].tokens != report.trigger_tokens
    assert (by_caption[0].where, by_caption[1].where, by_caption[2].where) == ("first_tag", "middle", "end")
    assert (by_caption[1].position, by_caption[2].position) == (1, 2)
    assert report.case_mismatch == [2]


def test_trigger_position_in_prose(clip_tokenizer):
    captions = [
        "ohwx woman standing in a field.",
        "A photo of ohwx woman on the beach.",
        "A woman on the beach, ohwx woman.",
    ]

    report = audit_trigger(captions, clip_tokenizer, "ohwx woman")

    assert [(h.where, h.position) for h in report.hits] == [("start", 0), ("middle", 3), ("end", 5)]
    assert report.fused == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["ohwx", "x", " ", ",", "\n", "\u00a0", "_"]), max_size=12).map("".join),
)
def test_tag_trigger_position_is_last_only_before_nothing_but_separators(caption):
    report = audit_trigger([caption], None, "ohwx", tags=True)

    for hit in report.hits:  # by definition: end when no tag follows the one holding the trigger
        # In its own line: the lines of a caption are alternatives, each a caption of its own.
        start = caption.rfind("\n", 0, hit.start) + 1
        end = caption.find("\n", hit.end)
        before, after = caption[start : hit.start], caption[hit.end : len(caption) if end < 0 else end]
        cut = max(before.rfind(","), before.rfind("\n"))
        index = len(split_tags(before[: cut + 1])) if cut >= 0 else 0
        seps = [p for p in (after.find(","), after.find("\n")) if p >= 0]
        last = not seps or not split_tags(after[min(seps) :])
        assert (hit.position, hit.where) == (
            index,
            "first_tag" if index == 0 else "end" if last else "middle",
        )


# --- duplicates ---------------------------------------------------------------------------------------


def test_duplicates_exact_and_near():
    captions = [
        "ohwx, 1girl, red dress, smile, outdoors",
        "ohwx, 1boy, jacket, night",
        "ohwx, 1girl, red dress, smile, outdoors",  # exact copy of 0
        "ohwx, outdoors, smile, red dress, 1girl",  # same tags, other order
        "ohwx, 1girl, red dress, smile, outdoors, sky",  # 5 of 6 tags shared: Jaccard 0.83
        "ohwx, cat, indoors, window",
    ]

    report = find_duplicates(captions, threshold=0.8)

    assert [g.indices for g in report.exact] == [[0, 2]]
    assert [g.indices for g in report.near] == [[0, 2, 3, 4]]
    assert report.near[0].similarity == pytest.approx(5 / 6)
    assert find_duplicates(captions, threshold=0.9).near[0].indices == [0, 2, 3]


def test_near_duplicates_scale_to_a_few_thousand_captions():
    captions = [f"ohwx, tag{i}, tag{i + 1}, other{i % 7}, thing{i}" for i in range(3000)]
    captions.append(captions[10].replace("ohwx, ", "ohwx,  "))

    report = find_duplicates(captions, threshold=0.8)

    assert [g.indices for g in report.near] == [[10, 3000]]


def brute_force_duplicates(captions: list[str], threshold: float, tags: bool) -> tuple[list, list]:
    """find_duplicates by definition: every pair of distinct texts compared, then union-find. Returns
    (exact groups, [(near group, similarity)])."""
    by_text: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        if caption.strip():
            by_text.setdefault(caption.strip(), []).append(i)
    texts = list(by_text)
    sets = [frozenset(split_units(t, tags=tags)) for t in texts]

    def norm(t: str) -> str:
        if tags:
            return ", ".join(sorted(set(split_units(t, tags=True))))
        return " ".join(re.findall(r"\w+", t.casefold()))

    pairs = []
    for a, b in itertools.combinations(range(len(texts)), 2):
        if norm(texts[a]) == norm(texts[b]):
            pairs.append((a, b, 1.0))
        if sets[a] and sets[b] and jaccard(sets[a], sets[b]) >= threshold:
            pairs.append((a, b, jaccard(sets[a], sets[b])))
    uf = UnionFind(len(texts))
    for a, b, _ in pairs:
        uf.union(a, b)
    lowest: dict[int, float] = {}
    for a, _, score in pairs:
        lowest[uf.find(a)] = min(lowest.get(uf.find(a), 1.0), score)
    near = [
        (sorted(i for k in members for i in by_text[texts[k]]), lowest[root])
        for root, members in uf.groups().items()
        if len(members) > 1
    ]
    exact = [ix for ix in by_text.values() if len(ix) > 1]
    return exact, sorted(near)


# Few words, so random captions often overlap a lot; case, spacing, "_" and stopwords exercise the
# normalisation, and a prose caption can hold a comma list (and the reverse).
_WORDS = ["red", "Red", "dress", "smile", "sky", "cat", "the", "a", "long_hair", "long hair", "1girl", "ohwx"]
_captions = st.lists(
    st.lists(st.sampled_from(_WORDS), max_size=7).map(
        lambda words: random.Random(len(words)).choice([", ", " ", ",", "  "]).join(words)
    ),
    max_size=14,
)
_thresholds = st.sampled_from(
    [0.05, 0.2, 1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0]
) | st.floats(0.01, 1.0)


@settings(max_examples=400, deadline=None)
@given(captions=_captions, threshold=_thresholds, tags=st.booleans())
def test_near_duplicates_equal_comparing_every_pair(captions, threshold, tags):
    report = find_duplicates(captions, threshold=threshold, tags=tags)

    exact, near = brute_force_duplicates(captions, threshold, tags)
    assert [g.indices for g in report.exact] == exact
    assert sorted((g.indices, g.similarity) for g in report.near) == near


@settings(max_examples=300, deadline=None)
@given(
    sets=st.lists(st.frozensets(st.integers(0, 11).map(str), max_size=9), max_size=25),
    threshold=_thresholds,
    ell=st.integers(1, 4),
)
def test_similar_pairs_finds_every_pair_at_the_threshold(sets, threshold, ell):
    found = text_checks._similar_pairs(sets, threshold, ell=ell)

    # Equal sets are linked to their first copy only; compare pairs of distinct sets through those.
    first = {s: sets.index(s) for s in sets}
    got = {(first[sets[i]], first[sets[j]]) for i, j, _ in found if sets[i] != sets[j]}
    expected = {
        (first[a], first[b])
        for a, b in itertools.combinations(sets, 2)
        if a and b and a != b and jaccard(a, b) >= threshold
    }
    assert {tuple(sorted(p)) for p in got} == {tuple(sorted(p)) for p in expected}
    assert all(score == jaccard(sets[i], sets[j]) and i < j for i, j, score in found)
    assert {(first[s], k) for k, s in enumerate(sets) if s and first[s] != k} <= {(i, j) for i, j, _ in found}


def test_near_duplicate_search_compares_few_pairs(monkeypatch):
    # Captions from a narrow vocabulary (300 words, Zipf): every caption shares common words with every
    # other, so a plain prefix filter still compares a few percent of all pairs (6% before this change).
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    weights = [1 / (i + 1) for i in range(300)]
    captions = [" ".join(rng.choices(words, weights, k=rng.randint(15, 30))) for _ in range(3000)]
    for i in range(0, 3000, 100):
        captions[i + 1] = captions[i] + " extra"  # 30 planted near-duplicates
    compared = []
    monkeypatch.setattr(text_checks, "jaccard", lambda a, b: compared.append(1) or jaccard(a, b))

    report = find_duplicates(captions, threshold=0.8)

    assert len(report.near) == 30
    assert len(compared) < 0.005 * 3000 * 2999 / 2


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("ab_ ,\n\tAB\u00a0İ-"), max_size=30))
def test_tag_units_are_the_tag_keys_of_split_tags(caption):
    assert split_units(caption, tags=True) == [k for k in (tag_key(t) for t in split_tags(caption)) if k]


def _count_by_caption(captions, terms):
    """count_sensitive by definition: each term's regex over each caption."""
    per_term: dict[str, list[int]] = {}
    per_category = {c: [0, 0] for c in terms}
    for caption in captions:
        hit = set()
        for category, words in terms.items():
            for term in words:
                term = " ".join(term.split()).casefold()
                if not term:
                    continue
                body = r"\s+".join(re.escape(w) for w in term.split())
                n = len(re.findall(rf"(?<![\w-]){body}(?![\w-])", caption, re.IGNORECASE))
                if n:
                    count = per_term.setdefault(term, [0, 0])
                    count[0] += n
                    count[1] += 1
                    per_category[category][0] += n
                    hit.add(category)
        for category in hit:
            per_category[category][1] += 1
    return per_term, per_category


@settings(max_examples=300, deadline=None)
@given(
    captions=st.lists(
        st.lists(
            st.sampled_from(
                ["man", "MAN", "woman", "a", "old", "-", "_", " ", "  ", "\n", ",", "x", "İ", "\x00"]
            )
        ).map("".join),
        max_size=8,
    ),
    terms=st.sampled_from(
        [
            DEFAULT_SENSITIVE_TERMS,
            {"g": ["man", "old man", "a a", "man"], "h": ["old", "man-", "x"]},
            {"z": ["a\x00", "\x00"], "y": ["a  a a"], "every joiner": ["".join(map(chr, range(9)))]},
        ]
    ),
)
def test_sensitive_counts_equal_searching_each_caption(captions, terms):
    report = count_sensitive(captions, terms)

    per_term, per_category = _count_by_caption(captions, terms)
    assert {t: [c.occurrences, c.captions] for t, c in report.terms.items()} == per_term
    assert list(report.terms) == list(per_term)  # in the order they were first found
    assert {k: [c.occurrences, c.captions] for k, c in report.categories.items()} == per_category


def test_union_find_roots_are_the_smallest_member():
    uf = UnionFind(6)
    uf.union(4, 2)
    uf.union(5, 4)
    uf.union(3, 1)
    assert uf.groups() == {0: [0], 1: [1, 3], 2: [2, 4, 5]}
    assert uf.find(5) == 2


# --- tags ---------------------------------------------------------------------------------------------


def test_tag_in_every_caption_and_singletons_are_flagged():
    captions = [
        "ohwx, white background, smile",
        "ohwx, white_background, outdoors",  # underscore spelling is the same tag
        "ohwx, White Background, smile",
        "ohwx, white background, hat",
    ]

    stats = tag_stats(captions)

    assert stats.mode == "tags"
    assert stats.common == [("ohwx", 1.0), ("white background", 1.0)]
    assert stats.singletons == ["hat", "outdoors"]
    assert stats.counts["smile"] == 2
    assert tag_stats(captions, ignore=["ohwx"]).common == [("white background", 1.0)]


def test_prose_captions_count_words_without_stopwords():
    stats = tag_stats(["A woman in a red dress.", "A woman on the beach."])

    assert stats.mode == "words"
    assert stats.common == [("woman", 1.0)]
    assert "a" not in stats.counts


def test_imbalance_measures():
    assert gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert gini([1, 1, 1, 1, 1, 1, 1, 1, 1, 200]) > 0.8
    assert normalized_entropy([3, 3, 3]) == pytest.approx(1.0)
    assert normalized_entropy([1, 1, 1000]) < 0.1
    assert top_k_share([10, 5, 3, 2], k=1) == pytest.approx(0.5)

    skewed = tag_stats(["ohwx, smile"] * 20 + ["ohwx, hat"])
    assert skewed.gini > tag_stats(["ohwx, smile", "ohwx, hat"]).gini


# --- sensitive terms ----------------------------------------------------------------------------------


def test_sensitive_terms_whole_words_any_case():
    captions = [
        "A young Woman wearing a hijab",
        "an old man and a woman, smiling",
        "a snowman next to a mankind poster",  # neither "man" counts
        "a cat",
    ]

    report = count_sensitive(captions)

    assert report.terms["woman"].occurrences == 2 and report.terms["woman"].captions == 2
    assert report.terms["man"].occurrences == 1
    assert report.terms["old man"].captions == 1
    assert report.categories["gender"].captions == 2
    assert report.categories["age"].captions == 2  # "young", "old man"
    assert report.categories["religion"].occurrences == 1
    assert report.categories["ethnicity"].occurrences == 0

    custom = count_sensitive(captions, {"headwear": ["hijab", "hat"]})
    assert set(custom.categories) == {"headwear"} and custom.categories["headwear"].captions == 1


def test_analyze_text_puts_it_together(clip_tokenizer):
    captions = ["ohwx, 1girl, smile", "ohwx, 1girl, smile", "ohwx, 1girl, hat", "ohwxgirl, 1girl, outdoors"]

    report = analyze_text(captions, clip_tokenizer, trigger="ohwx")

    assert report.tags_mode
    assert report.trigger is not None and report.trigger.fused == [3]
    assert [g.indices for g in report.duplicates.exact] == [[0, 1]]
    assert ("ohwx", 0.75) not in report.tags.common and report.tags.common == [("1girl", 1.0)]
    assert report.sensitive.terms["1girl"].captions == 4


def test_without_a_tokenizer_the_trigger_audit_keeps_presence_position_and_glued():
    captions = [
        "ohwx, 1girl, smile",
        "1girl, ohwxwoman, smile",
        "1girl, smile, outdoors",
        "1girl, smile, Ohwx",
    ]

    report = audit_trigger(captions, None, "ohwx")

    assert report.trigger_tokens is None
    assert report.with_trigger == 3 and report.without == [2]
    assert [h.where for h in report.hits] == ["first_tag", "middle", "end"]
    assert report.glued == [1] and report.case_mismatch == [3]
    # Fusion needs the tokenizer: unknown (None), not "not fused".
    assert report.fused == [] and all(h.fused is None and h.tokens == [] for h in report.hits)


def test_analyze_text_without_a_tokenizer_skips_only_the_token_checks(clip_tokenizer):
    captions = ["ohwx, 1girl, smile", "ohwx, 1girl, smile", "ohwx, 1girl, hat", "ohwxgirl, 1girl, outdoors"]

    report = analyze_text(captions, None, trigger="ohwx")

    assert report.tokens is None
    assert [g.indices for g in report.duplicates.exact] == [[0, 1]]
    assert report.tags.common == [("1girl", 1.0)] and report.sensitive.terms["1girl"].captions == 4
    assert report.trigger is not None and report.trigger.glued == [3]
    with pytest.raises(ValueError, match="pass a tokenizer"):  # T5 counts are not silently dropped
        analyze_text(captions, None, t5_tokenizer=clip_tokenizer)
