"""Caption styles: the shipped TOML files, user styles and prompts, lengths, extras and placeholders."""

from __future__ import annotations

import re

import pytest

from loracap.styles import (
    FLORENCE_TASKS,
    LENGTH_NAMES,
    extra_names,
    list_styles,
    load_style,
    parse_length,
    render_prompt,
    used_placeholders,
    user_prompt_style,
)

SHIPPED = {
    "descriptive",
    "straightforward",
    "sd-prompt",
    "mj-prompt",
    "booru-tags",
    "training-caption",
    *FLORENCE_TASKS,
}
ALL_LENGTHS = (*LENGTH_NAMES, "40-words")


def test_every_shipped_style_loads_and_renders_with_every_length():
    styles = list_styles()
    assert [s.name for s in styles] == sorted(SHIPPED)
    for style in styles:
        assert style.source is not None and style.source.stem == style.name
        assert style.description
        if style.prompt is None:
            continue
        assert style.default_length == "medium"
        rendered = {length: render_prompt(style, length=length) for length in ALL_LENGTHS}
        for length, text in rendered.items():
            assert "{" not in text and "}" not in text, (style.name, length, text)
        # Each length changes the instruction, and the default is "medium".
        assert len(set(rendered.values())) == len(ALL_LENGTHS), style.name
        assert render_prompt(style) == rendered["medium"]


def test_florence_modes_are_styles_mapping_to_themselves():
    for mode in FLORENCE_TASKS:
        assert load_style(mode).florence_task == mode
    assert load_style("booru-tags").florence_task == "tags"
    assert load_style("descriptive").florence_task == "more_detailed"
    assert load_style("training-caption").florence_task == "detailed"
    assert load_style("mj-prompt").florence_task is None


def test_florence_tasks_match_the_backend():
    from loracap.backends.florence2_tasks import MODE_TASK_TOKENS

    assert tuple(MODE_TASK_TOKENS) == FLORENCE_TASKS


def test_tag_styles():
    assert load_style("booru-tags").tags is True
    assert load_style("tags").tags is True
    assert {s.name for s in list_styles() if s.tags} == {"booru-tags", "tags"}


def test_names_accept_either_separator_and_unknown_names_list_the_shipped_ones():
    assert load_style("more-detailed").name == "more_detailed"
    assert load_style("BOORU_TAGS").name == "booru-tags"
    with pytest.raises(ValueError, match=r"unknown caption style 'poem'.*booru-tags.*training-caption"):
        load_style("poem")
    with pytest.raises(ValueError, match="does not exist"):
        load_style("nowhere/mine.toml")


def test_length_specs():
    assert parse_length("short") == "short"
    assert parse_length(" Long ") == "long"
    assert parse_length("40-words") == "about 40 words"
    assert parse_length("40 words") == "about 40 words"
    for bad in ("huge", "40", "0-words", "-5-words", "forty-words", ""):
        with pytest.raises(ValueError, match="40-words"):
            parse_length(bad)
    style = load_style("descriptive")
    assert render_prompt(style, length="40-words").endswith("It should be about 40 words.")
    assert "short (two or three sentences)" in render_prompt(style, length="short")
    with pytest.raises(ValueError, match=r"bad length 'huge'.*short, medium, long"):
        render_prompt(style, length="huge")


def test_extras_by_key_and_free_text_in_order():
    extras = extra_names()
    wanted = "lighting camera-angle no-text name no-resolution composition depth-of-field sfw no-ambiguity"
    assert set(wanted.split()) <= set(extras)
    style = load_style("straightforward")
    text = render_prompt(style, extras=["lighting", "no_text", "Mention the weather."])
    base = render_prompt(style)
    assert text == " ".join([base, extras["lighting"], extras["no-text"], "Mention the weather."])
    with pytest.raises(ValueError, match=r"unknown extra 'lightng'.*camera-angle"):
        render_prompt(style, extras=["lightng"])


def test_placeholders_are_substituted():
    style = user_prompt_style("Caption {name} for {trigger}. Folder: {folder}. Tags: {tags}. Be {length}.")
    text = render_prompt(
        style, length="short", name="Alice", trigger="ohwx woman", folder="10_ohwx", tags="red hair,\n smile"
    )
    assert text == (
        "Caption Alice for ohwx woman. Folder: 10_ohwx. Tags: red hair, smile. "
        "Be short (one or two sentences)."
    )
    assert used_placeholders(style) == {"name", "trigger", "folder", "tags", "length"}
    named = render_prompt(load_style("caption"), extras=["name", "existing-tags"], name="Alice", tags="cat")
    assert "refer to them as Alice." in named and "hints where they match the image: cat." in named


def test_missing_values_render_empty_and_extras_needing_them_are_left_out():
    style = user_prompt_style("Describe the image. Existing tags: {tags}")
    assert render_prompt(style) == "Describe the image. Existing tags:"
    base = render_prompt(load_style("caption"))
    assert render_prompt(load_style("caption"), extras=["existing-tags", "name", "folder"]) == base


def test_unknown_placeholders_are_named():
    with pytest.raises(ValueError, match=r"unknown placeholder \{subject\}"):
        user_prompt_style("Describe {subject}.")
    with pytest.raises(ValueError, match=r"unknown placeholder \{name:>10\}"):
        user_prompt_style("Describe {name:>10}.")
    with pytest.raises(ValueError, match=r"literal braces"):
        user_prompt_style("Answer as JSON { like this")
    with pytest.raises(ValueError, match=r"unknown placeholder \{color\}"):
        render_prompt(load_style("caption"), extras=["Use the color {color}."])
    # Doubled braces are literal text.
    assert render_prompt(user_prompt_style('Reply as {{"caption": ...}}')) == 'Reply as {"caption": ...}'


def test_user_toml_copied_from_a_shipped_style_loads_by_path(tmp_path):
    shipped = load_style("descriptive").source
    assert shipped is not None
    edited = shipped.read_text().replace('name = "descriptive"', 'name = "moody"')
    edited = edited.replace("in a formal tone", "in a moody, poetic tone about {name}")
    edited = edited.replace('long = "long (two or three paragraphs)"', 'long = "long (four paragraphs)"')
    path = tmp_path / "moody.toml"
    path.write_text(edited)
    style = load_style(str(path))
    assert (style.name, style.source, style.florence_task) == ("moody", path, "more_detailed")
    text = render_prompt(style, length="long", name="Alice")
    assert "moody, poetic tone about Alice" in text and text.endswith("It should be long (four paragraphs).")

    bad = tmp_path / "typo.toml"
    bad.write_text(edited.replace("florence_task =", "florence-task ="))
    with pytest.raises(ValueError, match="unknown field.*florence-task"):
        load_style(bad)
    bad.write_text(edited.replace("{name}", "{nmae}"))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: unknown placeholder {{nmae}}")):
        load_style(bad)


def test_a_style_without_a_prompt_refuses_to_render():
    style = load_style("analyze")
    assert style.prompt is None and style.florence_task == "analyze"
    with pytest.raises(ValueError, match="'analyze' has no prompt.*only Florence-2"):
        render_prompt(style)


def test_user_prompts():
    style = user_prompt_style("List tags. Give {length}.", tags=True)
    assert style.tags and style.florence_task is None and style.source is None
    assert render_prompt(style, length="short") == "List tags. Give short (about 10 tags)."
    no_slot = user_prompt_style("Describe the image.")
    assert no_slot.default_length is None
    with pytest.raises(ValueError, match=r"no \{length\} slot"):
        render_prompt(no_slot, length="short")


def test_prompt_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Describe {folder}'s image.\n")
    style = user_prompt_style(prompt_file=path)
    assert (style.name, style.source) == ("mine", path)
    assert render_prompt(style, folder="cats") == "Describe cats's image."
    for kwargs in ({}, {"prompt": "x", "prompt_file": path}):
        with pytest.raises(ValueError, match="either a prompt or a prompt file"):
            user_prompt_style(**kwargs)
    with pytest.raises(ValueError, match="cannot read prompt file"):
        user_prompt_style(prompt_file=tmp_path / "missing.txt")


def test_a_style_choice_takes_one_extra_as_a_string():
    from loracap.request import StyleChoice

    # A bare string is one extra, not one per letter; every entry point builds its choice this way.
    assert StyleChoice("descriptive", extras="lighting").extras == ("lighting",)
    assert StyleChoice("descriptive", extras=["lighting", "no-text"]).extras == ("lighting", "no-text")
    assert StyleChoice("descriptive", extras="lighting").check().name == "descriptive"
