"""report.html: the report's JSON document drawn as one self-contained page.

Everything is inline (CSS, a few lines of JS for sorting and filtering, SVG charts, JPEG thumbnails as
data URIs), so the file can be mailed, attached to a CI run or opened from a USB stick. The page reads
top-down in the order a user fixes things: the captions that disagree with their images, then what the
text encoder will cut, then duplicates, trigger, tags and images.

The markup is in Jinja2 templates (loracap/web/templates), the styles and the script are static files
(loracap/web/static) inlined at render time; this module only picks and shapes the data the page shows.
Autoescaping is on, so a caption or a file name is text wherever it lands. The only markup that passes
unescaped is ours: the static files and the SVG charts (plots.py escapes every label it draws).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from loracap.inputs import ImageDecodeError, load_image, map_ahead
from loracap.quality.plots import column_chart, row_chart

__all__ = ["Cell", "page_environment", "render_html", "static_asset", "thumbnail_uri", "worst_pairs"]

LOW_CLIP = 20.0  # scores below this are drawn red: in CLIP ViT-L/14 terms, a caption about something else
THUMB_SIDE = 160
MAX_DUPLICATE_GROUPS = 24
MAX_GROUP_THUMBS = 6
TOP_TAGS = 30
MAX_SINGLETONS = 300


def thumbnail_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be decoded."""
    try:
        image = load_image(path, min_side=side)
    except ImageDecodeError:
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@cache
def page_environment() -> Environment:
    """The Jinja2 environment of loracap's pages: autoescaped, and a missing variable is an error rather
    than an empty string."""
    env = Environment(
        loader=PackageLoader("loracap", "web/templates"),
        # Every template here is HTML, so escaping is on for all of them, whatever the file is called.
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=_num, dash=_dash, pct=_pct)
    return env


def static_asset(name: str) -> Markup:
    """A file of loracap/web/static, to inline into a <style> or <script> element of a page."""
    text = (files("loracap") / "web" / "static" / name).read_text(encoding="utf-8")
    # Inlined as is, a closing tag would end the element early; our files have none, keep it that way.
    if "</" in text:
        raise ValueError(f"{name}: '</' cannot be inlined into a <style> or <script> element")
    return Markup(text)


def worst_pairs(data: dict[str, Any], thumbnails: int = 24) -> list[dict[str, Any]]:
    """The pairs the page shows first, as tiles ("Captions to check first"): the lowest CLIP scores, or
    without scores the longest captions."""
    if data["clip"]:
        return [p for p in data["pairs"] if p["clip"] is not None][:thumbnails]
    # Without scores the longest captions are the next thing to look at: in tokens when they were
    # counted, else in characters.
    counted = "skipped" not in data["tokens"]
    return sorted(data["pairs"], key=lambda p: -(p["tokens"] if counted else len(p["caption"])))[:thumbnails]


def render_html(data: dict[str, Any], root: Path, *, thumbnails: int = 24, workers: int = 2) -> str:
    """The page for `data` (DatasetReport.data); `root` is where the relative paths in it point."""
    worst = worst_pairs(data, thumbnails)
    groups = (data["images"] or {}).get("duplicate_groups", [])[:MAX_DUPLICATE_GROUPS]
    wanted = list(
        dict.fromkeys([p["path"] for p in worst] + [q for g in groups for q in g["paths"][:MAX_GROUP_THUMBS]])
    )
    thumbs = dict(zip(wanted, map_ahead(lambda rel: thumbnail_uri(root / rel), wanted, workers), strict=True))

    template = page_environment().get_template("report.html.j2")
    return template.render(
        d=data,
        name=Path(data["root"]).name,
        css=static_asset("report.css"),
        js=static_asset("report.js"),
        cards=_cards(data),
        worst=_worst(data, worst, thumbs),
        explain=data.get("explain"),
        pairs=_pair_rows(data),
        tokens=_tokens(data),
        duplicates=_duplicates(data),
        trigger=_trigger(data),
        tags=_tags(data),
        sensitive=_sensitive(data),
        images=_images(data, groups, thumbs),
        files=_files(data),
    )


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, the number the column sorts by (data-v, else the text) and its style."""

    text: str
    sort: float | None = None
    bad: bool = False
    cls: str = ""

    @property
    def classes(self) -> str:
        return " ".join(c for c in (self.cls, "bad" if self.bad else "") if c)


# --- what each section shows -----------------------------------------------------------------------------


def _cards(d: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(label, number, bad) for the cards under the title."""
    c, ds = d["checks"], d["dataset"]
    cards = [
        ("images", ds["images"], False),
        ("captioned", ds["captioned"], False),
        ("no caption", c["missing-caption"], c["missing-caption"] > 0),
        ("caption, no image", c["orphan-caption"], c["orphan-caption"] > 0),
    ]
    if d["clip"] and d["clip"]["mean"] is not None:
        cards.append(("mean CLIP score", f"{d['clip']['mean']:.1f}", d["clip"]["mean"] < LOW_CLIP))
        low = sum(1 for p in d["pairs"] if p["clip"] is not None and p["clip"] < LOW_CLIP)
        cards.append((f"CLIP score < {LOW_CLIP:g}", low, low > 0))
    cards += [
        ("truncated", _dash(c["truncated"]), bool(c["truncated"])),
        ("empty captions", c["empty-caption"], c["empty-caption"] > 0),
        ("duplicate captions", c["duplicate-caption"], c["duplicate-caption"] > 0),
        ("duplicate images", c["duplicate-image"], c["duplicate-image"] > 0),
    ]
    if d["trigger"]:
        cards.append(("fused trigger", _dash(c["fused-trigger"]), bool(c["fused-trigger"])))
        cards.append(("no trigger", c["no-trigger"], c["no-trigger"] > 0))
    if d["images"]:
        cards.append((f"below {d['images']['min_side']} px", c["small-image"], c["small-image"] > 0))
    return [(label, str(value), bad) for label, value, bad in cards]


def _worst(d: dict[str, Any], worst: list[dict[str, Any]], thumbs: dict[str, str | None]) -> dict[str, Any]:
    chart = None
    if d["clip"]:
        hist = d["clip"]["histogram"]
        edges = [i * hist["bin_width"] for i in range(len(hist["counts"]))]
        chart = column_chart(
            [str(e) for e in edges],
            hist["counts"],
            flagged=[e < LOW_CLIP for e in edges],
            title="CLIP score histogram",
        )
    # The explain PNGs (`loracap report --explain-model`), relative to the page.
    explained = {x["path"]: x["file"] for x in (d.get("explain") or {}).get("images", [])}
    tiles = [
        {
            "path": p["path"],
            "caption": p["caption"],
            "uri": thumbs.get(p["path"]),
            "score": "–" if p["clip"] is None else f"{p['clip']:.1f}",
            "bad": p["clip"] is not None and p["clip"] < LOW_CLIP,
            "tokens": p["tokens"],
            "explain": explained.get(p["path"]),
        }
        for p in worst
    ]
    return {"chart": chart, "tiles": tiles}


def _pair_rows(d: dict[str, Any]) -> list[list[Cell]]:
    rows = []
    for p in d["pairs"]:
        flags = []
        if p["truncated"]:
            flags.append("truncated")
        if p["empty"]:
            flags.append("empty")
        if p["trigger"] in ("fused", "missing"):
            flags.append(f"trigger {p['trigger']}")
        if p["clip_error"]:
            flags.append("not scored")
        elif p["itm_error"]:
            flags.append("ITM not scored")
        clip, tokens, itm = p["clip"], p["tokens"], p["itm"]
        match = []  # the ITM column, there only when ITM scoring ran (the template names it then)
        if d["itm"]:
            low = d["itm"]["below"]["threshold"]
            text = "–" if itm is None else f"{itm:.3f}"
            match.append(Cell(text, sort=-1 if itm is None else itm, bad=itm is not None and itm < low))
        rows.append(
            [
                Cell(p["path"]),
                Cell(
                    "–" if clip is None else f"{clip:.1f}",
                    sort=-1 if clip is None else clip,
                    bad=clip is not None and clip < LOW_CLIP,
                ),
                *match,
                Cell(_dash(tokens), sort=-1 if tokens is None else tokens, bad=bool(p["truncated"])),
                Cell(", ".join(flags), bad=bool(flags)),
                Cell(p["caption"], cls="cap"),
            ]
        )
    return rows


def _tokens(d: dict[str, Any]) -> dict[str, Any]:
    t = d["tokens"]
    if "skipped" in t:  # a note, not zeros: nothing was counted
        return {"empty": _column(p["path"] for p in d["pairs"] if p["empty"])}
    chart = None
    counts = list(t["counts"].values())
    if counts:
        width = max(1, -(-max(counts) // 24))  # about 24 bins
        bins = [0] * (max(counts) // width + 1)
        for n in counts:
            bins[n // width] += 1
        chart = column_chart(
            [str(i * width) for i in range(len(bins))],
            bins,
            flagged=[(i + 1) * width - 1 > t["max_length"] for i in range(len(bins))],
            title="tokens per caption",
        )
    return {
        "chart": chart,
        "truncated": _token_rows(t["truncated"]),
        "empty": _column(t["empty"]),
        "t5_truncated": _token_rows(t["t5"]["truncated"]) if t["t5"] else [],
    }


def _duplicates(d: dict[str, Any]) -> dict[str, Any]:
    dup = d["duplicates"]
    exact = [
        [
            Cell(str(len(g["paths"])), sort=len(g["paths"])),
            Cell(", ".join(g["paths"])),
            Cell(g["caption"], cls="cap"),
        ]
        for g in dup["exact"]
    ]
    near = [
        [
            Cell(f"{g['similarity']:.2f}", sort=g["similarity"]),
            Cell(", ".join(g["paths"])),
            Cell(" | ".join(dict.fromkeys(g["captions"])), cls="cap"),
        ]
        for g in dup["near"]
    ]
    return {"exact": exact, "near": near}


def _trigger(d: dict[str, Any]) -> dict[str, Any] | None:
    tr = d["trigger"]
    if not tr:
        return None
    fused = [
        [
            Cell(f["path"]),
            Cell(f["text"], cls="cap"),
            Cell(" ".join(f["tokens"]) or "–"),
            Cell("glued to a word" if f["glued"] else "other tokens", bad=True),
        ]
        for f in tr["fused"]
    ]
    return {
        "positions": ", ".join(f"{k}: {v}" for k, v in sorted(tr["positions"].items())) or "none",
        "fused": fused,
        "without": _column(tr["without"]),
        "case_mismatch": _column(tr["case_mismatch"]),
    }


def _tags(d: dict[str, Any]) -> dict[str, Any]:
    tags = d["tags"]
    unit = "tags" if tags["mode"] == "tags" else "words"
    top = list(tags["counts"].items())[:TOP_TAGS]
    rows = [
        [Cell(t), Cell(str(n), sort=n), Cell(f"{n / max(tags['captions'], 1):.0%}", sort=n)]
        for t, n in tags["counts"].items()
    ]
    return {
        "unit": unit,
        "chart": row_chart([t for t, _ in top], [n for _, n in top], title=f"most frequent {unit}"),
        "shown": len(top),
        "singletons": tags["singletons"][:MAX_SINGLETONS],
        "more_singletons": len(tags["singletons"]) - MAX_SINGLETONS,
        "rows": rows,
    }


def _sensitive(d: dict[str, Any]) -> dict[str, Any]:
    s = d["sensitive"]
    categories = [
        [
            Cell(k),
            Cell(str(v["captions"]), sort=v["captions"]),
            Cell(str(v["occurrences"]), sort=v["occurrences"]),
        ]
        for k, v in s["categories"].items()
    ]
    terms = [
        [
            Cell(t),
            Cell(v["category"]),
            Cell(str(v["captions"]), sort=v["captions"]),
            Cell(str(v["occurrences"]), sort=v["occurrences"]),
        ]
        for t, v in s["terms"].items()
    ]
    return {"categories": categories, "terms": terms}


def _images(
    d: dict[str, Any], groups: list[dict[str, Any]], thumbs: dict[str, str | None]
) -> dict[str, Any] | None:
    im = d["images"]
    if not im:
        return None
    resolution, aspect = im["resolution_histogram"], im["aspect_histogram"]
    return {
        "groups": [_group(g, thumbs) for g in groups],
        "hidden": len(im["duplicate_groups"]) - len(groups),
        "resolution_chart": column_chart(
            [b["label"] for b in resolution], [b["count"] for b in resolution], title="shorter side"
        ),
        "aspect_chart": column_chart(
            [b["label"] for b in aspect], [b["count"] for b in aspect], title="aspect ratio"
        ),
        "buckets": [
            [
                Cell(f"{x['width']}×{x['height']}", sort=x["width"] / x["height"]),
                Cell(str(x["count"]), sort=x["count"], bad=x["count"] == 1),
            ]
            for x in im["buckets"]["buckets"]
        ],
        "small": [
            [Cell(x["path"]), Cell(f"{x['width']}×{x['height']}", sort=min(x["width"], x["height"]))]
            for x in im["small"]
        ],
        "errors": [[Cell(e["path"]), Cell(e["reason"])] for e in im["errors"]],
    }


def _group(g: dict[str, Any], thumbs: dict[str, str | None]) -> dict[str, Any]:
    shown = g["paths"][:MAX_GROUP_THUMBS]
    return {
        "size": len(g["paths"]),
        "kind": "identical files" if g["exact"] else f"up to {g['max_distance']} bits apart",
        "extra": len(g["paths"]) - len(shown),
        "tiles": [{"path": p, "uri": thumbs.get(p), "keep": p == g["keep"]} for p in shown],
    }


def _files(d: dict[str, Any]) -> dict[str, Any]:
    ds = d["dataset"]
    return {
        "missing": _column(ds["missing"]),
        "orphans": _column(ds["orphans"]),
        "problems": [[Cell(p["path"]), Cell(p["reason"])] for p in ds["problems"]],
        "clip_errors": [[Cell(e["path"]), Cell(e["reason"])] for e in (d["clip"] or {}).get("errors", [])],
    }


# --- small helpers ---------------------------------------------------------------------------------------


def _column(texts: Any) -> list[list[Cell]]:
    """Rows of a one-column table."""
    return [[Cell(t)] for t in texts]


def _token_rows(entries: list[dict[str, Any]]) -> list[list[Cell]]:
    return [[Cell(x["path"]), Cell(str(x["tokens"]), sort=x["tokens"])] for x in entries]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _dash(value: int | None) -> str:
    """A count, or "–" where it was not counted (token counts without a tokenizer)."""
    return "–" if value is None else str(value)


def _pct(value: float) -> str:
    return f"{value:.0%}"
