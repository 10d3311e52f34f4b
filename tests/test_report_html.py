"""report.html escapes what comes from the dataset: file names, captions, tags and the folder name are
text on the page, never markup, in every place the page shows them."""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from jinja2 import UndefinedError
from test_report import texture

from loracap.cli import main
from loracap.quality.html import page_environment
from loracap.quality.plots import row_chart

EVIL = "<script>alert(1)</script>"
QUOTES = "\"double\" 'single' & more"
# A folder for a name: the "/" of EVIL makes "x<script>alert(1)<" a folder holding "script>.jpg".
IMAGE = f"x{EVIL}.jpg"


def hostile_dataset(root: Path) -> Path:
    """Every place the page names a file or quotes a caption gets a hostile one."""
    (root / IMAGE).parent.mkdir(parents=True)
    texture(0, (96, 80)).save(root / IMAGE)
    (root / IMAGE).with_suffix(".txt").write_text(f"ohwxwoman, {EVIL}, {QUOTES}", encoding="utf-8")
    # A byte copy with the same caption: a duplicate image group and a duplicate caption group.
    shutil.copyfile(root / IMAGE, root / f"copy {QUOTES}.jpg")
    shutil.copyfile((root / IMAGE).with_suffix(".txt"), root / f"copy {QUOTES}.txt")
    texture(1, (96, 80)).save(root / f"y{QUOTES}.png")
    (root / f"y{QUOTES}.txt").write_text(f"{EVIL}, no trigger here", encoding="utf-8")
    (root / f"z{EVIL}.png").parent.mkdir()
    texture(2, (64, 64)).save(root / f"z{EVIL}.png")  # no caption
    (root / f"o{EVIL}.txt").parent.mkdir()
    (root / f"o{EVIL}.txt").write_text(f"ohwx, {QUOTES}", encoding="utf-8")  # no image
    return root


class Page(HTMLParser):
    """What a browser would show: each text and attribute value, decoded, under the id of its section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.section = "head"
        self.svg = 0  # inside a chart: its texts are also filed under "<section> svg"
        self.texts: dict[str, list[str]] = defaultdict(list)
        self.attrs: dict[str, list[str]] = defaultdict(list)
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag in ("header", "section"):
            self.section = values.get("id") or tag
        self.svg += tag == "svg"
        self.attrs[self.section] += [v for v in values.values() if v]

    def handle_endtag(self, tag: str) -> None:
        self.svg -= tag == "svg"

    def handle_data(self, data: str) -> None:
        self.texts[self.section].append(data)
        if self.svg:
            self.texts[f"{self.section} svg"].append(data)


@pytest.fixture(scope="module")
def page(tiny_model, tmp_path_factory) -> tuple[str, Page]:
    base = tmp_path_factory.mktemp("hostile")
    root = hostile_dataset(base / f"set {QUOTES} <i>")
    out = base / "report"
    # --no-clip, but with a tokenizer: the trigger section lists the fused trigger.
    tokenizer = str(tiny_model("clip"))
    args = ["report", str(root), "--no-clip", "--tokenizer", tokenizer, "--trigger", "ohwx", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(html)
    return html, parsed


def test_no_markup_from_the_dataset_reaches_the_page(page: tuple[str, Page]) -> None:
    html, parsed = page
    assert "<script>alert" not in html and "<i>" not in html
    assert html.count("<script") == 1 and parsed.tags.count("script") == 1  # the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Self-contained: nothing is fetched, styles and script are inline.
    assert re.search(r'\b(src|href)="(?!data:image/jpeg;base64,|#)', html) is None and "<link" not in html


@pytest.mark.parametrize(
    ("section", "where", "expected"),
    [
        ("head", "text", f"set {QUOTES} <i>"),  # <title>
        ("header", "text", f"set {QUOTES} <i>"),  # <h1> and the path under it
        ("worst", "text", IMAGE),
        ("worst", "attr", IMAGE),  # the thumbnails' alt
        ("worst", "attr", f"copy {QUOTES}.jpg"),
        ("worst", "text", f"ohwxwoman, {EVIL}, {QUOTES}"),
        ("pairs", "text", IMAGE),
        ("pairs", "text", f"ohwxwoman, {EVIL}, {QUOTES}"),
        ("duplicates", "text", f"copy {QUOTES}.jpg, {IMAGE}"),
        ("trigger", "text", IMAGE),  # fused: "ohwxwoman"
        ("trigger", "text", f"y{QUOTES}.png"),  # without the trigger
        ("tags svg", "text", EVIL),  # the chart of the most frequent tags
        ("tags", "text", EVIL),  # the table of all tags
        ("images", "text", IMAGE),  # a duplicate group's thumbnails: captions and alt
        ("images", "text", f"copy {QUOTES}.jpg"),
        ("images", "attr", IMAGE),
        ("images", "attr", f"copy {QUOTES}.jpg"),
        ("dataset", "text", f"z{EVIL}.png"),  # no caption
        ("dataset", "text", f"o{EVIL}.txt"),  # no image
    ],
)
def test_every_place_shows_the_text_as_written(
    page: tuple[str, Page], section: str, where: str, expected: str
) -> None:
    _, parsed = page
    found = parsed.texts[section] if where == "text" else parsed.attrs[section]
    assert any(expected in value for value in found), f"{expected!r} not shown in #{section}"


def test_chart_labels_are_escaped() -> None:
    parsed = Page()
    parsed.feed(str(row_chart([EVIL, QUOTES], [2, 1], title=QUOTES)))
    assert "script" not in parsed.tags
    assert sum(EVIL in text for text in parsed.texts["head"]) == 2  # the label and its tooltip
    assert QUOTES in parsed.attrs["head"]  # aria-label


def test_a_missing_template_variable_is_an_error() -> None:
    with pytest.raises(UndefinedError):
        page_environment().from_string("<p>{{ nothing }}</p>").render()
