import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracap.postprocess import PostProcess, merge_captions, parse_replace_tags, postprocess, split_tags

P = PostProcess

PROSE_CASES = [
    # boilerplate openers
    ("The image shows a woman standing in a field.", P(), "A woman standing in a field."),
    ("the image depicts a red car", P(), "A red car"),
    ("This image is a close-up photograph of a cat", P(), "A close-up photograph of a cat"),
    ("This is a photo of a cat", P(), "A photo of a cat"),
    ("This is an image of a cat", P(), "A cat"),
    ("This image is an image of a cat", P(), "A cat"),
    ("In this image, a woman is standing.", P(), "A woman is standing."),
    ("In the image we can see a dog.", P(), "A dog."),
    ("The picture shows a bridge at night", P(), "A bridge at night"),
    ("An image of a cat", P(), "A cat"),
    # kept on purpose
    ("A picture of a cat hanging on a wall", P(), "A picture of a cat hanging on a wall"),
    ("The image is blurry", P(), "The image is blurry"),
    ("The photo shows a cat", P(), "The photo shows a cat"),
    ("The image shows", P(), "The image shows"),
    ("The image shows.", P(), "The image shows."),
    ("The image shows a woman.", P(strip_boilerplate=False), "The image shows a woman."),
    ("a woman in a field", P(), "a woman in a field"),
    # Florence-2 residue and whitespace
    ("<s>a cat sitting on a couch</s><pad><pad>", P(), "a cat sitting on a couch"),
    ("<MORE_DETAILED_CAPTION>A cat <loc_12><loc_400> sits .", P(), "A cat sits."),
    ("  a  cat ,\n sitting ;  happily :  yes  ", P(), "a cat, sitting; happily: yes"),
    ("", P(), ""),
    # trigger
    ("a woman standing", P(trigger="ohwx woman"), "ohwx woman, a woman standing"),
    ("ohwx woman, a woman standing", P(trigger="ohwx woman"), "ohwx woman, a woman standing"),
    ("a woman standing, ohwx woman", P(trigger="ohwx woman"), "ohwx woman, a woman standing"),
    ("a woman, OHWX WOMAN, in a field", P(trigger="ohwx woman"), "ohwx woman, a woman, in a field"),
    ("ohwx woman standing in a field", P(trigger="ohwx woman"), "ohwx woman standing in a field"),
    ("Ohwx woman standing, ohwx woman", P(trigger="ohwx woman"), "ohwx woman standing"),
    ("The image shows ohwx woman smiling.", P(trigger="ohwx woman"), "ohwx woman smiling."),
    ("ohwx womanly figure", P(trigger="ohwx woman"), "ohwx woman, ohwx womanly figure"),
    # inside a sentence the trigger is grammar: it stays there and is not added again
    ("a photo of ohwx woman smiling", P(trigger="ohwx woman"), "a photo of ohwx woman smiling"),
    ("a photo of OHWX in a park", P(trigger="ohwx"), "a photo of ohwx in a park"),
    ("ohwx, a photo of ohwx in a park", P(trigger="ohwx"), "a photo of ohwx in a park"),
    ("a photo of ohwx in a park, ohwx", P(trigger="ohwx", suffix=", 4k"), "a photo of ohwx in a park, 4k"),
    # one line: sd-scripts reads only the first line of a caption file
    ("old line one\nold line two", P(trigger="ohwx"), "ohwx, old line one, old line two"),
    ("A cat.\n\nA dog\n, sleeping", P(), "A cat. A dog, sleeping"),
    ("", P(trigger="ohwx woman"), "ohwx woman"),
    ("a cat", P(trigger="  ohwx   woman "), "ohwx woman, a cat"),
    ("a cat", P(trigger=""), "a cat"),
    # prefix and suffix, verbatim, never doubled
    ("a cat", P(trigger="ohwx", prefix="photo of ", suffix=", 4k"), "ohwx, photo of a cat, 4k"),
    ("Photo of a cat, 4k", P(trigger="ohwx", prefix="photo of ", suffix=", 4k"), "ohwx, photo of a cat, 4k"),
    ("photo offset print", P(prefix="photo of "), "photo of photo offset print"),
    ("ohwx woman standing", P(trigger="ohwx woman", prefix="photo, "), "photo, ohwx woman standing"),
    ("The image shows a cat", P(prefix="style: "), "style: A cat"),
]


@pytest.mark.parametrize(("raw", "options", "expected"), PROSE_CASES)
def test_prose(raw, options, expected):
    assert postprocess(raw, options, tags=False) == expected
    assert postprocess(expected, options, tags=False) == expected


TAG_CASES = [
    ("1girl, solo,  long hair ,\nsmile,, ", P(), "1girl, solo, long hair, smile"),
    ("1girl, Solo, solo, SOLO", P(), "1girl, Solo"),
    ("long_hair, long hair, ^_^, >_<", P(underscores_to_spaces=True), "long hair, ^_^, >_<"),
    ("long_hair, blue_eyes", P(), "long_hair, blue_eyes"),
    ("1girl, solo, watermark", P(remove_tags=("Watermark", "SOLO")), "1girl"),
    ("long_hair, smile", P(remove_tags=("long hair",)), "smile"),
    ("1girl, smile, text", P(replace_tags={"1GIRL": "woman", "text": ""}), "woman, smile"),
    ("1girl, woman", P(replace_tags={"1girl": "woman"}), "woman"),
    ("a, b", P(replace_tags={"a": "b", "b": "c"}), "c"),
    ("a, b", P(replace_tags={"a": "long_hair"}, underscores_to_spaces=True), "long hair, b"),
    ("watermark, cat", P(replace_tags={"logo": "watermark"}, remove_tags=("watermark",)), "cat"),
    ("a, b, c, d", P(max_tags=2), "a, b"),
    ("ohwx, a, b, c", P(trigger="ohwx", max_tags=2), "ohwx, a, b"),
    ("a, b", P(max_tags=0, trigger="ohwx"), "ohwx"),
    ("1girl, OHWX, solo", P(trigger="ohwx"), "ohwx, 1girl, solo"),
    ("1girl\nohwx, solo\nsmile", P(trigger="ohwx"), "ohwx, 1girl, solo, smile"),
    (
        "1girl, solo",
        P(trigger="ohwx", prefix="masterpiece, ", suffix=", best quality"),
        "ohwx, masterpiece, 1girl, solo, best quality",
    ),
    (
        "masterpiece, 1girl, best quality",
        P(prefix="masterpiece, ", suffix=", best quality"),
        "masterpiece, 1girl, best quality",
    ),
    ("", P(trigger="ohwx", prefix="masterpiece, "), "ohwx, masterpiece"),
    ("<s>1girl, solo</s>", P(), "1girl, solo"),
    # no space-before-colon rule inside tags: kaomoji survive
    ("smile, :d, ;)", P(), "smile, :d, ;)"),
    # boilerplate stripping is for prose only
    ("The image shows a cat", P(), "The image shows a cat"),
]


@pytest.mark.parametrize(("raw", "options", "expected"), TAG_CASES)
def test_tags(raw, options, expected):
    assert postprocess(raw, options, tags=True) == expected
    assert postprocess(expected, options, tags=True) == expected


def test_split_tags():
    assert split_tags(" a ,b\nc,,  d  e ,\n") == ["a", "b", "c", "d e"]
    assert split_tags("") == []


def test_parse_replace_tags():
    assert parse_replace_tags(["a=b", "c=d, e = f", "g=", "x=1,"]) == {
        "a": "b",
        "c": "d",
        "e": "f",
        "g": "",
        "x": "1",
    }
    assert parse_replace_tags(["a=b", "a=c"]) == {"a": "c"}
    assert parse_replace_tags([]) == {}


@pytest.mark.parametrize("spec", ["long_hair", "a=b,c", "=b", " = b"])
def test_parse_replace_tags_errors(spec):
    with pytest.raises(ValueError, match="expected OLD=NEW"):
        parse_replace_tags([spec])


def test_replace_cycle_rejected():
    with pytest.raises(ValueError, match="cycle"):
        PostProcess(replace_tags={"a": "b", "B": "a"})
    PostProcess(replace_tags={"a": "A"})  # a self-map is harmless


def test_merge_captions():
    assert merge_captions("a, b", "B, c", "prepend", tags=True) == "a, b, c"
    assert merge_captions("a, b", "B, c", "append", tags=True) == "B, c, a"
    assert merge_captions("A dog.", "A cat.", "prepend", tags=False) == "A dog. A cat."
    assert merge_captions("A dog.", "A cat.", "append", tags=False) == "A cat. A dog."
    assert merge_captions("A dog.", "  ", "append", tags=False) == "A dog."
    assert merge_captions("a dog", "a cat", "append", tags=False) == "a cat, a dog"
    # re-running a merge does not grow the caption
    assert merge_captions("A cat.", "a  cat.\n", "append", tags=False) == "a cat."
    assert merge_captions("a dog", "a cat, a dog", "append", tags=False) == "a cat, a dog"
    with pytest.raises(ValueError, match="merge policy"):
        merge_captions("a", "b", "replace", tags=False)


OHWX = P(trigger="ohwx")
DECORATED = P(trigger="ohwx", prefix="photo of ", suffix=", 4k")

# (new caption as written by postprocess, old caption on disk, options, tags, append, prepend)
MERGE_CASES = [
    # the case: an old two-line caption, once ran into "ohwx, old line one old line two ohwx, ..."
    (
        "ohwx, a man on a bench",
        "old line one\nold line two",
        OHWX,
        False,
        "ohwx, old line one, old line two, a man on a bench",
        "ohwx, a man on a bench, old line one, old line two",
    ),
    # the old caption already has the trigger as an item, in any case
    (
        "ohwx, a man on a bench",
        "OHWX, a photo in a park",
        OHWX,
        False,
        "ohwx, a photo in a park, a man on a bench",
        "ohwx, a man on a bench, a photo in a park",
    ),
    # ... or in a sentence: there it stays, and nothing is added
    (
        "ohwx, a man on a bench",
        "a photo of ohwx in a park",
        OHWX,
        False,
        "a photo of ohwx in a park, a man on a bench",
        "a man on a bench, a photo of ohwx in a park",
    ),
    ("ohwx standing", "A park.", OHWX, False, "A park. ohwx standing", "ohwx standing, A park."),
    # prefix and suffix once, around both
    (
        "ohwx, photo of a man, 4k",
        "ohwx, photo of a dog, 4k",
        DECORATED,
        False,
        "ohwx, photo of a dog, a man, 4k",
        "ohwx, photo of a man, a dog, 4k",
    ),
    # tags: one trigger tag, first; a prefix glued to the first tag is not glued to another one
    ("ohwx, a, b", "c\nOHWX, d", OHWX, True, "ohwx, c, d, a, b", "ohwx, a, b, c, d"),
    ("ohwx, a, b", "ohwx, b", OHWX, True, "ohwx, b, a", "ohwx, a, b"),
    (
        "ohwx, photo of a, b, 4k",
        "ohwx, photo of c, 4k",
        DECORATED,
        True,
        "ohwx, photo of c, a, b, 4k",
        "ohwx, photo of a, b, c, 4k",
    ),
]


@pytest.mark.parametrize(("new", "old", "options", "tags", "append", "prepend"), MERGE_CASES)
def test_merge_keeps_the_trigger_rule(new, old, options, tags, append, prepend):
    assert postprocess(new, options, tags=tags) == new  # the new caption is as the pipeline has it
    for policy, expected in (("append", append), ("prepend", prepend)):
        merged = merge_captions(new, old, policy, tags=tags, options=options)
        assert merged == expected
        assert postprocess(merged, options, tags=tags) == merged
        # the next run with the same new caption changes nothing
        assert merge_captions(new, merged, policy, tags=tags, options=options) == merged


# --- idempotence over generated input ---------------------------------------------------------------

FRAGMENTS = [
    "The image shows",
    "This image is",
    "This is",
    "an image of",
    "In this image,",
    "a",
    "an",
    "cat",
    "woman",
    "ohwx",
    "ohwx woman",
    "OHWX WOMAN",
    "photo of",
    "4k",
    "masterpiece",
    "long_hair",
    "^_^",
    ",",
    ".",
    ";",
    ":",
    " ",
    "\n",
    "<s>",
    "</s>",
    "<pad>",
    "<loc_3>",
    "<CAPTION>",
    "1girl",
    "solo",
    "Solo",
    "smile",
    "standing",
    "in a field",
    "the",
    "is",
    "picture",
]
OPTIONS = [
    P(),
    P(strip_boilerplate=False),
    P(trigger="ohwx woman"),
    P(trigger="ohwx", prefix="photo of ", suffix=", 4k"),
    P(trigger="ohwx woman", prefix="masterpiece, ", suffix=", best quality"),
    P(prefix="a ", suffix="."),
    P(
        trigger="ohwx",
        underscores_to_spaces=True,
        remove_tags=("solo",),
        replace_tags={"cat": "feline"},
        max_tags=3,
    ),
    P(replace_tags={"a": "cat", "cat": "woman", "smile": ""}, prefix="masterpiece,"),
]

texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map(" ".join),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(alphabet=st.sampled_from("abo hwx,.;:_\n<>/sA"), max_size=40),
)


@settings(max_examples=300, deadline=None, database=None)
@given(text=texts, options=st.sampled_from(OPTIONS), tags=st.booleans())
def test_idempotent(text, options, tags):
    once = postprocess(text, options, tags=tags)
    assert postprocess(once, options, tags=tags) == once


@settings(max_examples=200, deadline=None, database=None)
@given(text=texts, tags=st.booleans())
def test_trigger_first_and_once_as_an_item(text, tags):
    out = postprocess(text, P(trigger="ohwx woman"), tags=tags)
    items = [item.strip().casefold() for item in out.split(",")]
    assert items.count("ohwx woman") <= 1 and "\n" not in out
    # First, unless prose names it in a sentence, which then keeps it (spelled exactly) instead.
    assert out.startswith("ohwx woman") or (not tags and "ohwx woman" in out)


@settings(max_examples=200, deadline=None, database=None)
@given(new=texts, old=texts, options=st.sampled_from(OPTIONS), tags=st.booleans())
def test_merge_is_final_and_stable(new, old, options, tags):
    new = postprocess(new, options, tags=tags)
    for policy in ("append", "prepend"):
        merged = merge_captions(new, old, policy, tags=tags, options=options)
        assert postprocess(merged, options, tags=tags) == merged
        assert "\n" not in merged
        if not tags:  # tags de-duplicate; prose finds the new caption in the merged one
            assert merge_captions(new, merged, policy, tags=tags, options=options) == merged
